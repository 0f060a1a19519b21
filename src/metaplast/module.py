"""The LightningModule of Algorithm 1: it owns Θ and Adam; one training step is one episode."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from metaplast.data import TaskSampler, stack_tasks
from metaplast.episode import Rule, inner_loop, query_loss, regulariser
from metaplast.feedback import init_feedback
from metaplast.metrics import episode_metrics
from metaplast.network import init_weights
from metaplast.safety import DivergenceError
from metaplast.tracking import EpisodeCSV, episode_record, flag_diverged, logged_scalars

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*that ended before the epoch ended.*")


def stream_seed(seed: int, trial: int, stream: int) -> int:
    """Independent seed of one random stream (0: weights and feedback, 1: tasks) of one trial."""
    return int(np.random.SeedSequence([seed, trial, stream]).generate_state(1, np.uint64)[0] >> 1)


def trial_generators(seed: int, trials, stream: int) -> list[torch.Generator]:
    """One generator per trial id, seeded with :func:`stream_seed`."""
    return [torch.Generator().manual_seed(stream_seed(seed, t, stream)) for t in trials]


class MetaPlasticity(L.LightningModule):
    """Meta-learns Θ of shape ``(trials, R)``; trial ``i`` has its own W, B and task stream.

    The meta-loss of all trials is summed, so each row of Θ gets exactly the
    Adam step it would get alone (Adam is element-wise).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sizes: list[int],
        rule: Rule,
        feedback: str = "fa",
        feedback_init: str = "xavier_uniform",
        grad_through_b: bool = True,
        reg: str = "none",
        lam: float = 0.0,
        lr: float = 1e-3,
        episodes: int = 600,
        M: int = 5,
        K: int = 50,
        Q: int = 10,
        trials: int = 20,
        first_trial: int = 0,
        seed: int = 0,
        theta0_init: float = 1e-3,
        theta_init: float = 0.0,
        beta: float = 10.0,
        remap_labels: bool = False,
        csv_path: str | None = None,
        max_diverged: int = 10,
        recompute_segment: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["images", "labels", "csv_path", "rule"])
        self.hparams["layer_terms"] = [list(terms) for terms in rule.layer_terms]
        self.rule = rule
        self.trial_ids = list(range(first_trial, first_trial + trials))
        initial = torch.full((trials, len(rule.terms)), float(theta_init))
        if 0 in rule.terms:
            initial[:, rule.terms.index(0)] = theta0_init
        self.theta = torch.nn.Parameter(initial)
        self.init_generators = trial_generators(seed, self.trial_ids, 0)
        self.samplers = [
            TaskSampler(images, labels, M, K, Q, seed=stream_seed(seed, t, 1), remap_labels=remap_labels)
            for t in self.trial_ids
        ]
        self.csv = EpisodeCSV(csv_path) if csv_path else None
        self.diverged_streak = [0] * trials  # consecutive diverged episodes of each trial

    def train_dataloader(self):
        # The tasks are drawn in training_step from the samplers the checkpoint restores;
        # the loader only paces the episodes.
        return DataLoader(range(self.hparams.episodes), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.Adam([self.theta], lr=self.hparams.lr)

    def on_train_start(self):
        if self.csv is not None:
            self.csv.truncate_from(self.global_step)

    def training_step(self, batch, batch_idx):
        hp, dtype, device = self.hparams, self.theta.dtype, self.theta.device
        task = stack_tasks([sampler.sample() for sampler in self.samplers])
        x_train, x_query = (x.to(device=device, dtype=dtype) for x in (task.x_train, task.x_query))
        y_train, y_query = task.y_train.to(device), task.y_query.to(device)
        to = dict(device=device, dtype=dtype)
        weights = [w.to(**to) for w in init_weights(hp.sizes, self.init_generators)]
        feedback = [
            b.to(**to) for b in init_feedback(hp.feedback, hp.sizes, self.init_generators, hp.feedback_init)
        ]
        adapted = inner_loop(
            self.theta,
            self.rule,
            weights,
            feedback,
            hp.feedback,
            x_train,
            y_train,
            hp.beta,
            hp.grad_through_b,
            hp.recompute_segment,
        )
        loss = query_loss(adapted, x_query, y_query, hp.beta) + hp.lam * regulariser(self.theta, hp.reg)
        metrics = episode_metrics(
            [w.detach() for w in adapted], feedback, hp.feedback, x_query, y_query, hp.beta
        )
        record = episode_record(self.theta, self.rule.terms, metrics, loss)
        # Divergence (issue 6): non-finite activations show in the weights, the loss or the metrics.
        finite = loss.detach().isfinite()
        for value in [*adapted, *metrics.values()]:
            finite &= value.detach().reshape(len(finite), -1).isfinite().all(1)
        self._episode = (self.global_step, record, finite)  # logged in on_train_batch_end
        return torch.where(finite, loss, torch.zeros_like(loss)).sum()

    # --- divergence (issue 6): freeze diverged trials, flag them, stop on a streak ---
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Adam's step, after which each diverged trial gets back its Θ row and Adam moments.

        Adam moves a row even where its gradient is zero (momentum), so rows are restored
        rather than masked. Adam's step count is one scalar for all rows and still advances.
        """
        state = getattr(optimizer, "optimizer", optimizer).state
        before = {k: v.clone() for k, v in state.get(self.theta, {}).items() if torch.is_tensor(v)}
        theta_before = self.theta.detach().clone()
        optimizer.step(closure=optimizer_closure)
        episode, record, finite = self._episode
        finite = finite & self.theta.detach().isfinite().all(1)
        if self.theta.grad is not None:
            finite &= self.theta.grad.isfinite().all(1)
        diverged = ~finite
        if diverged.any():
            with torch.no_grad():
                self.theta[diverged] = theta_before[diverged]
                for key, value in state[self.theta].items():
                    if torch.is_tensor(value) and value.shape == self.theta.shape:
                        value[diverged] = before[key][diverged] if key in before else 0
        self.diverged_streak = [n + 1 if d else 0 for n, d in zip(self.diverged_streak, diverged.tolist())]
        self._episode = (episode, flag_diverged(record, diverged), diverged.cpu())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Log and write the episode; stop when a trial diverged ``max_diverged`` times in a row."""
        episode, record, diverged = self._episode
        self.log_dict(logged_scalars(record, self.trial_ids), on_step=True, on_epoch=False, batch_size=1)
        if not diverged.all():
            acc = record["meta/acc"][~diverged].mean().item()
            self.log("acc", acc, prog_bar=True, logger=False, batch_size=1)
        if self.csv is not None:
            self.csv.append(episode, self.trial_ids, record)
        for trial, streak, row in zip(self.trial_ids, self.diverged_streak, self.theta.detach().cpu()):
            if streak >= self.hparams.max_diverged:
                theta = ", ".join(f"theta_{r}={v:.6g}" for r, v in zip(self.rule.terms, row.tolist()))
                raise DivergenceError(
                    f"trial {trial} diverged (non-finite weights, activations or meta-loss) in {streak} "
                    f"consecutive episodes, the last being episode {episode} "
                    f"(meta.max_diverged={self.hparams.max_diverged}); its last finite Θ: {theta}"
                )

    def on_save_checkpoint(self, checkpoint):
        checkpoint["metaplast_streams"] = {
            "init": [g.get_state() for g in self.init_generators],
            "tasks": [s.state_dict() for s in self.samplers],
        }
        checkpoint["metaplast_diverged_streak"] = list(self.diverged_streak)

    def on_load_checkpoint(self, checkpoint):
        streams = checkpoint["metaplast_streams"]
        for generator, state in zip(self.init_generators, streams["init"]):
            generator.set_state(state)
        for sampler, state in zip(self.samplers, streams["tasks"]):
            sampler.load_state_dict(state)
        self.diverged_streak = list(checkpoint.get("metaplast_diverged_streak", self.diverged_streak))
