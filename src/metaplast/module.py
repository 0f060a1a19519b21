"""The LightningModule of Algorithm 1: it owns Θ and Adam; one training step is one episode."""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from metaplast.data import TaskSampler, stack_tasks, stream_seed, trial_generators
from metaplast.episode import Rule, inner_loop, query_loss, regulariser
from metaplast.feedback import init_feedback
from metaplast.metrics import episode_metrics
from metaplast.network import init_weights
from metaplast.safety import CheckpointError, DivergenceError
from metaplast.tracking import EpisodeCSV, episode_record, flag_diverged, logged_scalars

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*that ended before the epoch ended.*")


class MetaPlasticity(L.LightningModule):
    """Meta-learns Θ of shape ``(trials, R)``; trial ``i`` has its own W, B and task stream.

    The meta-loss of all trials is summed, so each row of Θ gets exactly the
    Adam step it would get alone (Adam is element-wise). With ``term_scale`` (one
    ``s_r`` per column, :mod:`metaplast.term_scale`) Adam runs on ``s_r θ_r``.
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
        term_scale: list[float] | None = None,
        sampling: str = "fresh",
        backtrack: float = 0.5,
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
        self.term_scale = None if term_scale is None else torch.tensor(term_scale, dtype=initial.dtype)
        self.init_generators = trial_generators(seed, self.trial_ids, 0)
        self.samplers = [
            TaskSampler(images, labels, M, K, Q, stream_seed(seed, t, 1), remap_labels, sampling)
            for t in self.trial_ids
        ]
        self.csv = EpisodeCSV(csv_path) if csv_path else None
        self.diverged_streak = [0] * trials  # consecutive diverged episodes of each trial
        # Θ of each trial's last finite episode (the target of a backtracking step); before any,
        # Θ = 0: the rule that changes nothing, whose inner loop is always finite.
        self.theta_anchor = torch.zeros_like(initial)
        self.anchored = torch.zeros(trials, dtype=torch.bool)

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

    # --- per-term step scaling: Adam on s_r θ_r (metaplast.term_scale) ---
    def on_before_optimizer_step(self, optimizer):
        """Called after the backward pass: hand Adam ``φ = s θ`` and ``dL/dφ = dL/dθ / s``."""
        if self.term_scale is not None and self.theta.grad is not None:
            scale = self.term_scale.to(self.theta.device)
            with torch.no_grad():
                self.theta.mul_(scale)
                self.theta.grad.div_(scale)

    # --- divergence: a diverged trial backtracks towards its last finite Θ; stop on a streak ---
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Adam's step; then each diverged trial takes a backtracking step instead.

        A trial whose episode diverged with Θ moves to ``Θ_a + ρ (Θ - Θ_a)``, where Θ_a is the
        Θ of its last finite episode (0 before any) and ρ = ``meta.backtrack``, and the first
        moment of its Adam state is multiplied by ρ (its second moment is kept), so it neither
        re-runs the Θ that diverged nor loses its progress; consecutive divergences halve the
        distance again and again. Adam's step count is one scalar for all rows and advances.
        """
        state = getattr(optimizer, "optimizer", optimizer).state
        before = {k: v.clone() for k, v in state.get(self.theta, {}).items() if torch.is_tensor(v)}
        theta_before = self.theta.detach().clone()
        optimizer.step(closure=optimizer_closure)
        if self.term_scale is not None:
            with torch.no_grad():
                self.theta.div_(self.term_scale.to(self.theta.device))
        episode, record, finite = self._episode
        finite = finite & self.theta.detach().isfinite().all(1)
        if self.theta.grad is not None:
            finite &= self.theta.grad.isfinite().all(1)
        diverged = ~finite
        rho = self.hparams.backtrack
        with torch.no_grad():
            if diverged.any():
                anchor = self.theta_anchor.to(theta_before)[diverged]
                self.theta[diverged] = anchor + rho * (theta_before[diverged] - anchor)
                for key, value in state[self.theta].items():
                    if torch.is_tensor(value) and value.shape == self.theta.shape:
                        value[diverged] = before[key][diverged] if key in before else 0
                if "exp_avg" in state[self.theta]:
                    state[self.theta]["exp_avg"][diverged] *= rho
            finite = finite.cpu()
            self.theta_anchor[finite] = theta_before[finite].cpu().to(self.theta_anchor.dtype)
            self.anchored |= finite
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
        for index, (trial, streak) in enumerate(zip(self.trial_ids, self.diverged_streak)):
            if streak >= self.hparams.max_diverged:
                if self.anchored[index]:
                    where, row = "its Θ in its last finite episode", self.theta_anchor[index]
                else:
                    where, row = "it never had a finite episode; its last Θ", record_theta(record, index)
                theta = ", ".join(f"theta_{r}={v:.6g}" for r, v in zip(self.rule.terms, row.tolist()))
                raise DivergenceError(
                    f"trial {trial} diverged (non-finite weights, activations or meta-loss) in {streak} "
                    f"consecutive episodes, the last being episode {episode} "
                    f"(meta.max_diverged={self.hparams.max_diverged}); {where}: {theta}"
                )

    def on_save_checkpoint(self, checkpoint):
        checkpoint["metaplast_streams"] = {
            "init": [g.get_state() for g in self.init_generators],
            "tasks": [s.state_dict() for s in self.samplers],
        }
        checkpoint["metaplast_diverged_streak"] = list(self.diverged_streak)
        checkpoint["metaplast_backtrack"] = {"anchor": self.theta_anchor.clone(), "anchored": self.anchored}
        if self.term_scale is not None:
            checkpoint["metaplast_term_scale"] = self.term_scale.tolist()

    def on_load_checkpoint(self, checkpoint):
        streams = checkpoint["metaplast_streams"]
        for generator, state in zip(self.init_generators, streams["init"]):
            generator.set_state(state)
        for sampler, state in zip(self.samplers, streams["tasks"]):
            sampler.load_state_dict(state)
        self.diverged_streak = list(checkpoint.get("metaplast_diverged_streak", self.diverged_streak))
        if "metaplast_backtrack" in checkpoint:
            self.theta_anchor = checkpoint["metaplast_backtrack"]["anchor"].clone()
            self.anchored = checkpoint["metaplast_backtrack"]["anchored"].clone()
        saved = checkpoint.get("metaplast_term_scale")
        current = None if self.term_scale is None else self.term_scale.tolist()
        if saved != current:
            raise CheckpointError(
                f"the checkpoint was made with rule.term_scale scales {saved}, this run has {current}; "
                "resume with the checkpoint's own setting"
            )


def record_theta(record: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """The Θ row of trial ``index`` in an episode record (the Θ that episode used)."""
    return torch.stack([value[index] for key, value in record.items() if key.startswith("theta/")])
