"""The LightningModule of Algorithm 1: it owns the meta-parameters and Adam; one step is one episode."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from metaplast.core.inner_loop import inner_loop
from metaplast.core.learner import State
from metaplast.core.meta import MetaParameters, regulariser
from metaplast.core.metrics import episode_metrics, follow_stream, forgetting, readout_fit, stream_blocks
from metaplast.data import LabelledImages, TaskSampler, stack_tasks, stream_seed, trial_generators
from metaplast.data.sampler import split_classes
from metaplast.data.sine import SineTaskSampler
from metaplast.run.config import Config, build_learner, build_rule, hidden_sizes, theta_init_row
from metaplast.run.tracking import RESULTS, EpisodeCSV, episode_record, flag_diverged, logged_scalars
from metaplast.safety import CheckpointError, DivergenceError, write_text

log = logging.getLogger("metaplast")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*that ended before the epoch ended.*")

#: Random streams of a trial (metaplast.data.stream_seed): 0 weights and feedback of each episode,
#: 1 tasks, 4 the starting values of meta-learned matrices and weights, 5 and 6 the tasks and the
#: fresh weights of the meta-test episodes.
STREAM_INIT, STREAM_TASKS, STREAM_LEARNED, STREAM_TEST_TASKS, STREAM_TEST_INIT = 0, 1, 4, 5, 6
#: The meta-test's results, next to result.json.
META_TEST = "meta_test.json"


def task_family(cfg) -> str:
    task = getattr(cfg, "task", None)
    return "classify" if task is None else getattr(task.family, "value", task.family)


def split_data(cfg, data: LabelledImages):
    """``(train, test)``: the (images, labels) of the meta-training and the held-out meta-testing
    classes (``task.test_classes``; none held out: both are the whole dataset); None for sine."""
    if task_family(cfg) == "sine":
        return None, None
    held_out = cfg.task.test_classes if getattr(cfg, "task", None) is not None else 0
    if not held_out:
        return (data.images, data.labels), (data.images, data.labels)
    train_classes, test_classes = split_classes(data.labels, held_out, cfg.task.split_seed)
    parts = []
    for classes in (train_classes, test_classes):
        mask = torch.isin(data.labels, classes)
        parts.append((data.images[mask], data.labels[mask]))
    return tuple(parts)


def build_samplers(cfg, part, trial_ids, stream: int) -> list:
    """One task sampler per trial: the sine task, or few-shot tasks from ``part`` = (images, labels)."""
    meta = cfg.meta
    order = cfg.task.order.value if getattr(cfg, "task", None) is not None else "iid"
    if task_family(cfg) == "sine":
        task = cfg.task
        return [
            SineTaskSampler(
                task.functions, task.batches, meta.batch, task.query, order, stream_seed(cfg.seed, t, stream)
            )
            for t in trial_ids
        ]
    images, labels = part
    return [
        TaskSampler(
            images,
            labels,
            meta.M,
            meta.K,
            meta.Q,
            stream_seed(cfg.seed, t, stream),
            cfg.model.remap_labels,
            meta.sampling.value,
            order,
        )
        for t in trial_ids
    ]


class MetaPlasticity(L.LightningModule):
    """Meta-learns the meta-parameters of ``trials`` independent trials (the leading dimension).

    Trial ``i`` has its own W, B and task stream. The meta-loss of all trials is summed, so
    each trial's rows get exactly the Adam step they would get alone (Adam is element-wise).
    With ``term_scale`` (one ``s_r`` per column of Θ, :mod:`metaplast.core.meta`) Adam runs on
    ``s_r θ_r``.
    """

    def __init__(
        self,
        cfg: Config,
        data: LabelledImages,
        term_scale: list[float] | None = None,
        csv_path: str | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
        meta = cfg.meta
        self.rule = build_rule(cfg)
        output = meta.M if cfg.model.remap_labels and task_family(cfg) == "classify" else data.num_classes
        self.learner = build_learner(cfg, data.images.shape[1], output, self.rule)
        self.trial_ids = list(range(meta.first_trial, meta.first_trial + meta.trials))
        learned = trial_generators(cfg.seed, self.trial_ids, STREAM_LEARNED)
        sizes = self.learner.network.sizes
        feedback = self.learner.pathway.init_feedback(sizes, learned, cfg.feedback.init.value)
        weights = self.learner.network.init_weights(learned)
        self.meta = MetaParameters(
            self.learner,
            meta.trials,
            theta_init_row(cfg, self.rule),
            cfg.feedback.psi_init,
            feedback if cfg.feedback.learn else None,
            {layer: weights[layer] for layer in cfg.model.learn_init or []},
            self.learner.network.init_biases(meta.trials) if cfg.model.learn_bias else None,
        )
        self.term_scale = None if term_scale is None else torch.tensor(term_scale)
        self.init_generators = trial_generators(cfg.seed, self.trial_ids, STREAM_INIT)
        self.train_part, self.test_part = split_data(cfg, data)
        self.samplers = build_samplers(cfg, self.train_part, self.trial_ids, STREAM_TASKS)
        # The episode table: kept as numbers for checkpoints, written to metrics.csv when csv_path.
        self.table = EpisodeCSV(csv_path)
        self.csv = self.table if csv_path else None
        self._saved_table = None  # the record of the checkpoint a resumed run starts from
        self.diverged_streak = [0] * meta.trials  # consecutive diverged episodes of each trial
        # The meta-parameters of each trial's last finite episode (the target of a backtracking
        # step); before any, zeros: Θ = 0 is the rule that changes nothing, always finite.
        self.anchor = [torch.zeros_like(p) for p in self.meta.parameters()]
        self.anchored = torch.zeros(meta.trials, dtype=torch.bool)

    @property
    def theta(self) -> torch.Tensor:
        """Θ per trial, ``(trials, R)``: exact when Θ is shared by all layers; with ``rule.share``
        ``layer`` or ``synapse``, its mean over layers (and synapses) — the summary result.json holds."""
        theta = self.meta.theta
        if isinstance(theta, torch.nn.ParameterList):
            return torch.stack([t.mean((1, 2)) for t in theta], 1).mean(1)
        return theta if theta.dim() == 2 else theta.mean(1)

    def train_dataloader(self):
        # The tasks are drawn in training_step from the samplers the checkpoint restores;
        # the loader only paces the episodes.
        return DataLoader(range(self.cfg.meta.episodes), batch_size=None)

    def configure_optimizers(self):
        lr = self.cfg.meta.lr
        rates = {"theta": lr, "psi": self.cfg.feedback.lr, "feedback": self.cfg.feedback.lr}
        rates["init"] = rates["bias"] = self.cfg.model.init_lr  # initial weights and biases
        rates.update({name: self.cfg.feedback.lr for name in self.meta.extra})  # the pathway's own
        groups = [
            {"params": params, "lr": rates.get(name) or lr, "name": name}
            for name, params in self.meta.groups().items()
        ]
        return torch.optim.Adam(groups, lr=lr)

    def on_train_start(self):
        """A resumed run rewrites metrics.csv from its checkpoint's record (a damaged file is rebuilt);
        a fresh run starts a new file."""
        if self._saved_table is not None:
            problem = self.table.restore(self._saved_table, self.global_step)
            if problem and self.csv is not None:
                log.warning(
                    "%s: %s; rebuilt from the checkpoint's own record (episodes 0..%d)",
                    self.csv.path,
                    problem,
                    self.global_step - 1,
                )
        elif self.csv is not None:
            if self.global_step == 0:
                self.csv.path.unlink(missing_ok=True)
            else:  # a checkpoint without a record (older metaplast): keep the file's earlier rows
                self.csv.truncate_from(self.global_step)

    def regularisation(self) -> torch.Tensor:
        """λ R(Θ) (Eq. 6, Eq. S.16) plus the regularisers of the other meta-parameter groups, per trial."""
        cfg, groups = self.cfg, self.meta.groups()
        total = cfg.reg.lam * regulariser(groups["theta"], cfg.reg.kind.value)
        if "feedback" in groups:
            total = total + cfg.feedback.lam * regulariser(groups["feedback"], cfg.feedback.reg.value)
        if "init" in groups:
            total = total + cfg.model.init_lam * regulariser(groups["init"], cfg.model.init_reg.value)
        return total

    def training_step(self, batch, batch_idx):
        cfg, like = self.cfg, self.meta.groups()["theta"][0]
        task = stack_tasks([sampler.sample() for sampler in self.samplers])
        x_train, x_query = (x.to(like) for x in (task.x_train, task.x_query))
        y_train, y_query = task.y_train.to(like.device), task.y_query.to(like.device)
        meta = self.meta.as_meta()
        state = self.learner.init_state(self.init_generators, cfg.feedback.init.value, meta, like=like)
        adapted = inner_loop(
            self.learner,
            state,
            meta,
            x_train,
            y_train,
            cfg.meta.gradient.value,
            cfg.meta.batch,
            cfg.meta.truncate,
            cfg.trainer.recompute_segment,
            cfg.trainer.compile,
        )
        loss = self.learner.query_loss(adapted, x_query, y_query) + self.regularisation()
        metrics = episode_metrics(self.learner, adapted.detach(), x_query, y_query, meta)
        record = episode_record(self.meta, self.rule.terms, metrics, loss)
        # Divergence: non-finite activations show in the weights, the loss or the metrics.
        finite = loss.detach().isfinite()
        for value in [*adapted.weights, *adapted.feedback, *metrics.values()]:
            finite &= finite_rows(value, len(finite))
        self._episode = (self.global_step, record, finite)  # logged in on_train_batch_end
        self._task = (state.detach(), x_train, y_train)  # for a diverged or spiking trial's surrogate
        return torch.where(finite, loss, torch.zeros_like(loss)).sum()

    # --- per-term step scaling: Adam on s_r θ_r (metaplast.core.meta) ---
    def _scale_theta(self, multiply: bool, with_grad: bool = False) -> None:
        if self.term_scale is None:
            return
        with torch.no_grad():
            for theta in self.meta.groups()["theta"]:
                scale = self.term_scale.to(theta)
                theta.mul_(scale) if multiply else theta.div_(scale)
                if with_grad and theta.grad is not None:
                    theta.grad.div_(scale)

    def _step_scale(self, p: torch.Tensor) -> torch.Tensor | None:
        """s of Adam's φ = s θ for a Θ parameter under ``rule.term_scale``; None otherwise."""
        if self.term_scale is None or not any(p is t for t in self.meta.groups()["theta"]):
            return None
        return self.term_scale

    def on_before_optimizer_step(self, optimizer):
        """Called after the backward pass: hand Adam ``φ = s θ`` and ``dL/dφ = dL/dθ / s``, and
        give each diverged or spiking trial its surrogate gradient (:meth:`optimizer_step`)."""
        _, record, finite = self._episode
        params = list(self.meta.parameters())
        record["meta/grad_norm"] = meta_gradient_norm(params, len(finite))
        for p in params:
            finite = finite & finite_rows(p, len(finite))
            if p.grad is not None:
                finite &= finite_rows(p.grad, len(finite))
        state = getattr(optimizer, "optimizer", optimizer).state
        b2 = optimizer.param_groups[0]["betas"][1]
        spiking = torch.zeros_like(finite)
        if self.cfg.meta.spike_limit is not None:
            spiking = finite & self._spiking(params, state, b2, self.cfg.meta.spike_limit)
        record["meta/spike"] = spiking.double().cpu()
        self._finite, self._spiking_now = finite, spiking
        bad = ~finite | spiking
        growths = self._growth(bad, finite) if bad.any() else None  # θ's units, before the scaling
        self._scale_theta(multiply=True, with_grad=True)
        if self.cfg.meta.spike_clip is not None:
            clip_spikes(params, state, b2, self.cfg.meta.spike_clip)
        if growths is None:
            return
        with torch.no_grad():
            for p, anchor, growth in zip(params, self.anchor, growths):
                if (scale := self._step_scale(p)) is not None:
                    scale = scale.to(p)
                    anchor, growth = anchor.to(p) * scale, growth / scale  # into Adam's φ = s θ
                toward_anchor = torch.sign(p - anchor.to(p))  # when the growth says nothing
                direction = torch.where(
                    growth.abs().sum(tuple(range(1, p.dim())), keepdim=True) > 0, growth, toward_anchor
                )
                moments = state.get(p, {})
                if self.cfg.meta.restart_momentum and "exp_avg" in moments:
                    moments["exp_avg"][bad] = 0  # the momentum that carried it to the blow-up
                rows = direction[bad].reshape(int(bad.sum()), -1)
                rows = rows / rows.abs().amax(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
                unit = rows / rows.pow(2).mean(1, keepdim=True).sqrt().clamp_min(torch.finfo(p.dtype).tiny)
                if "exp_avg_sq" in moments and int(moments["step"]) > 0:
                    v_hat = adam_v_hat(moments, b2)
                    rms = v_hat[bad].reshape(len(unit), -1).double().mean(1, keepdim=True).sqrt()
                    unit = unit * rms.clamp_max(torch.finfo(p.dtype).max ** 0.5).to(unit)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad[bad] = unit.reshape(p[bad].shape)

    def _growth(self, bad: torch.Tensor, finite: torch.Tensor) -> list[torch.Tensor]:
        """:func:`growth_gradients` of this episode for the trials in ``bad`` (Θ in its own units)."""
        state, x_train, y_train = self._task
        params, batch = list(self.meta.parameters()), self.cfg.meta.batch
        with torch.enable_grad():
            meta = self.meta.as_meta()
            estimator = self.cfg.meta.gradient.value
            return growth_gradients(
                self.learner, state, meta, params, x_train, y_train, batch, bad, finite, estimator
            )

    def _spiking(self, params, state, b2: float, kappa: float) -> torch.Tensor:
        """``meta.spike_limit``: trials whose meta-gradient, in Adam's units, is larger than κ times
        its running RMS, ``‖g‖ > κ (Σ v̂)^½`` over all their meta-parameters (none before Adam's
        first step). Such a gradient comes from an episode on the edge of blowing up (its norm
        grows from ~1e3 to 1e10..1e14 within a few episodes, measured on FashionMNIST)."""
        trials = len(self.trial_ids)
        square, reference = torch.zeros(trials, dtype=torch.float64), torch.zeros(trials, dtype=torch.float64)
        for p in params:
            moments = state.get(p, {})
            if p.grad is None or "exp_avg_sq" not in moments or int(moments["step"]) == 0:
                continue
            grad = p.grad.detach().double()
            if (scale := self._step_scale(p)) is not None:
                grad = grad / scale.to(grad)  # dL/dφ, φ = s θ
            square += sum_squares_rows(grad, trials)
            reference += adam_v_hat(moments, b2).double().reshape(trials, -1).sum(1).cpu()
        spiking = (reference > 0) & (square > kappa**2 * reference)
        return spiking.to(params[0].device)

    # --- divergence: the optimiser learns from it ---
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Adam's step; a diverged trial steps back, and Adam learns which way the blow-up was.

        A trial whose episode diverged with meta-parameters P gets, instead of the meta-loss's
        (non-finite) gradient, the gradient of a bounded surrogate: the growth of its weights,
        ``S(P) = log Σ_ℓ ‖W_ℓ‖²`` at the last step of the same episode whose weights were all
        finite (:func:`growth_gradients`), rescaled to the size of its recent gradients (Adam's
        √v̂). Its descent direction is the one that slows the blow-up, term by term, so Adam's
        momentum learns to keep away from it. (Where S is flat — a divergence at the very first
        step — the direction is back towards P_a.) The trial's position moves to
        ``P_a + ρ (P - P_a)``, P_a its meta-parameters in its last finite episode (0 before any:
        the rule that changes nothing), ρ = ``meta.backtrack``: it neither re-runs the P that
        diverged nor loses its progress, and consecutive divergences shrink the distance
        geometrically. With ``meta.spike_limit`` a finite episode whose meta-gradient spiked is
        handled the same way (its S over the whole episode; P_a: the last healthy episode's).
        With ``meta.restart_momentum`` such a trial's Adam momentum restarts from 0 before the
        surrogate enters it, so the momentum that carried it to the edge does not carry it back.
        A step that left a trial's P or Adam moments non-finite is undone for that trial.
        """
        params = list(self.meta.parameters())
        values = [p.detach().clone() for p in params]
        state = getattr(optimizer, "optimizer", optimizer).state
        moments = [{k: v.clone() for k, v in state.get(p, {}).items() if k != "step"} for p in params]
        optimizer.step(closure=optimizer_closure)
        undo_nonfinite_steps(params, values, state, moments, len(self._finite))
        self._scale_theta(multiply=False)
        if self.cfg.rule.nonnegative:  # projected Adam: Θ stays in θ >= 0
            with torch.no_grad():
                for theta in self.meta.groups()["theta"]:
                    theta.clamp_(min=0)
        episode, record, _ = self._episode
        finite = self._finite
        diverged = ~finite
        back = diverged | self._spiking_now  # both step back towards the last healthy Θ
        healthy = ~back
        rho = self.cfg.meta.backtrack
        with torch.no_grad():
            for p, value, anchor in zip(params, values, self.anchor):
                if back.any():
                    target = anchor.to(value)[back]
                    p[back] = target + rho * (value[back] - target)
                anchor[healthy.to(anchor.device)] = value[healthy].to(anchor)
            self.anchored |= healthy.cpu()
        self.diverged_streak = [n + 1 if d else 0 for n, d in zip(self.diverged_streak, diverged.tolist())]
        self._episode = (episode, flag_diverged(record, diverged), diverged.cpu())
        # The table gets the episode now, before the checkpoint callbacks of this step (they run
        # before on_train_batch_end), so a checkpoint of episode n holds the rows of 0..n-1.
        self.table.append(episode, self.trial_ids, self._episode[1])

    def episode_table(self) -> pd.DataFrame | None:
        """The run's episodes as ``metrics.csv`` holds them (None before any), from the module's own
        record: also without the file (``logger.csv=false``) and in a run resumed from a checkpoint
        of its last episode, which trains no episode and so never restores the record itself."""
        table = self.table
        if not table.rows and self._saved_table is not None:
            table = EpisodeCSV(None)
            table.restore(self._saved_table, self.global_step)
        text = table.render()
        return pd.read_csv(io.StringIO(text)) if text else None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Log the episode; stop when a trial diverged ``max_diverged`` times in a row."""
        episode, record, diverged = self._episode
        scalars = logged_scalars(record, self.trial_ids)
        # Straight to the loggers, at the step Lightning's own logging would use: ``self.log_dict``
        # of ~750 scalars (20 trials) cost 0.6 s per episode on a CPU, 1.15 s on a GPU (issue 15).
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in self.loggers:
            logger.log_metrics(scalars, step=step)
        if "meta/acc" in record and not diverged.all():
            acc = record["meta/acc"][~diverged].mean().item()
            self.log("acc", acc, prog_bar=True, logger=False, batch_size=1)
        limit = self.cfg.meta.max_diverged
        for index, (trial, streak) in enumerate(zip(self.trial_ids, self.diverged_streak)):
            if streak >= limit:
                self._mark_stopped(scalars, trial, episode)
                if self.anchored[index]:
                    where, row = (
                        "its Θ in its last finite episode",
                        self.anchor[0][index].reshape(-1, len(self.rule.terms))[0],
                    )
                else:
                    where, row = "it never had a finite episode; its last Θ", record_theta(record, index)
                theta = ", ".join(f"theta_{r}={v:.6g}" for r, v in zip(self.rule.terms, row.tolist()))
                raise DivergenceError(
                    f"trial {trial} diverged (non-finite weights, activations or meta-loss) in {streak} "
                    f"consecutive episodes, the last being episode {episode} "
                    f"(meta.max_diverged={limit}); {where}: {theta}"
                )

    def _mark_stopped(self, scalars: dict[str, float], trial: int, episode: int) -> None:
        """Before a divergence stops the run (its last episode already logged): leave no stale
        result in the W&B summary, and say where it stopped."""
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                summary = logger.experiment.summary
                for key in list(summary.keys()):
                    if key.removeprefix("trials/").startswith(RESULTS) and key not in scalars:
                        del summary[key]  # a result of an earlier episode, not of the last one
                summary.update({"stopped/diverged_trial": trial, "stopped/episode": episode})

    def on_train_end(self):
        """Meta-test after training (``task.test_episodes`` > 0): :func:`meta_test` into meta_test.json."""
        episodes = self.cfg.task.test_episodes
        if (
            not episodes
            or not self.trainer.is_global_zero
            or self.trainer.global_step < self.cfg.meta.episodes
        ):
            return
        result = meta_test(self, episodes)
        path = Path(self.trainer.default_root_dir) / META_TEST
        write_text(path, json.dumps(result, indent=1))
        log.info("meta-test (%d episodes): loss %.4g; written to %s", episodes, result["loss"]["mean"], path)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["metaplast_streams"] = {
            "init": [g.get_state() for g in self.init_generators],
            "tasks": [s.state_dict() for s in self.samplers],
        }
        checkpoint["metaplast_diverged_streak"] = list(self.diverged_streak)
        checkpoint["metaplast_backtrack"] = {
            "anchor": [a.clone() for a in self.anchor],
            "anchored": self.anchored,
        }
        if self.term_scale is not None:
            checkpoint["metaplast_term_scale"] = self.term_scale.tolist()
        checkpoint["metaplast_metrics"] = self.table.state_dict()  # rebuilds metrics.csv on resume

    def on_load_checkpoint(self, checkpoint):
        streams = checkpoint["metaplast_streams"]
        for generator, state in zip(self.init_generators, streams["init"]):
            generator.set_state(state)
        for sampler, state in zip(self.samplers, streams["tasks"]):
            sampler.load_state_dict(state)
        self.diverged_streak = list(checkpoint.get("metaplast_diverged_streak", self.diverged_streak))
        self._saved_table = checkpoint.get("metaplast_metrics")
        if "metaplast_backtrack" in checkpoint:
            self.anchor = [a.clone() for a in checkpoint["metaplast_backtrack"]["anchor"]]
            self.anchored = checkpoint["metaplast_backtrack"]["anchored"].clone()
        saved = checkpoint.get("metaplast_term_scale")
        current = None if self.term_scale is None else self.term_scale.tolist()
        if saved != current:
            raise CheckpointError(
                f"the checkpoint was made with rule.term_scale scales {saved}, this run has {current}; "
                "resume with the checkpoint's own setting"
            )


def summary(values: torch.Tensor) -> dict:
    """Per-trial values ``(T,)``: each, their mean and standard error over the trials with a finite
    value (SE: n-1 std / √n), and ``n`` such trials."""
    values = values.double().cpu()
    finite = values[values.isfinite()]
    n = len(finite)
    se = float(finite.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
    mean = float(finite.mean()) if n else float("nan")
    return {"trials": values.tolist(), "mean": mean, "se": se, "n": n}


def episode_mean(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per trial the mean over the ``kept`` episodes (``values (E, T, ...)``, ``kept (E, T)``); NaN
    for a trial with none."""
    kept = kept.reshape(*kept.shape, *[1] * (values.dim() - 2))
    count = kept.sum(0)
    total = torch.where(kept, values, torch.zeros_like(values)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@torch.no_grad()
def meta_test(module: MetaPlasticity, episodes: int) -> dict:
    """Fresh episodes on functions never drawn in meta-training (sine) or on the held-out classes
    (``task.test_classes``), each trial with its meta-learned parameters; no meta-update.

    Per trial, over the episodes: the query ``loss`` (and ``acc``, ``error`` of a classifier); the
    update-gradient cosine per layer over the stream (``update_cos``, and its mean per step, Fig. 2C);
    the size of each layer's update ``update_norm`` (Fig. 2D); the frozen-features control
    ``readout`` (the initial network's features, its readout fitted to the whole stream: Fig. 2A);
    for a continual stream the ``forgetting`` per block (Fig. 2B) and its mean over blocks 1...
    """
    cfg, learner = module.cfg, module.learner
    like = module.meta.groups()["theta"][0]
    sine = task_family(cfg) == "sine"
    samplers = build_samplers(cfg, module.test_part, module.trial_ids, STREAM_TEST_TASKS)
    generators = trial_generators(cfg.seed, module.trial_ids, STREAM_TEST_INIT)
    meta = module.meta.as_meta()
    totals: dict[str, list[torch.Tensor]] = {}
    batch = cfg.meta.batch
    for _ in range(episodes):
        task = stack_tasks([sampler.sample() for sampler in samplers])
        x_train, x_query = (x.to(like) for x in (task.x_train, task.x_query))
        y_train, y_query = task.y_train.to(like.device), task.y_query.to(like.device)
        if sine:
            groups, query_groups = x_train[..., 1:].argmax(-1), x_query[..., 1:].argmax(-1)
        else:
            groups, query_groups = y_train, y_query
        state = learner.init_state(generators, cfg.feedback.init.value, meta, like=like)
        continual = cfg.task.order.value == "continual"
        blocks = stream_blocks(groups, batch) if continual else []
        followed = follow_stream(learner, state, meta, x_train, y_train, batch, x_query, blocks)
        adapted = followed["state"]
        found = {"loss": learner.query_loss(adapted, x_query, y_query)}
        if not sine:
            _, zs = learner.network.forward(adapted.weights, x_query, adapted.biases)
            found["acc"] = (zs[-1].argmax(-1) == y_query).to(like.dtype).mean(1)
            found["error"] = 1 - found["acc"]
        found["readout"] = readout_fit(learner, state, x_train, y_train, x_query, y_query)
        found["update_cos"] = followed["cos"]
        found["update_norm"] = followed["update_norm"]
        if continual:
            found["forgetting"] = forgetting(followed["outputs"], blocks, groups, query_groups, batch)
        for key, value in found.items():
            totals.setdefault(key, []).append(value.double().cpu())
    result: dict = {
        "episodes": episodes,
        "family": "sine" if sine else "classify",
        "order": cfg.task.order.value,
    }
    result["trial_ids"] = module.trial_ids
    # An episode whose network diverged (non-finite query loss) is counted, not averaged.
    kept = torch.stack(totals["loss"]).isfinite()  # (E, T)
    result["diverged_episodes"] = (~kept).sum(0).tolist()
    for key in ("loss", "acc", "error"):
        if key in totals:
            result[key] = summary(episode_mean(torch.stack(totals[key]), kept))
    result["readout"] = summary(torch.stack(totals["readout"]).mean(0))
    cos = episode_mean(torch.stack(totals["update_cos"]), kept)  # (T, steps, L)
    result["update_cos"] = {
        "per_layer": [summary(cos[:, :, layer].mean(1)) for layer in range(cos.shape[2])],
        "per_step": cos.nanmean(0).T.tolist(),  # [layer][step], mean over trials and episodes
    }
    norm = episode_mean(torch.stack(totals["update_norm"]), kept)
    result["update_norm"] = {
        "per_layer": [summary(norm[:, :, layer].mean(1)) for layer in range(norm.shape[2])]
    }
    if "forgetting" in totals:
        forgot = episode_mean(torch.stack(totals["forgetting"]), kept)  # (T, blocks)
        result["forgetting"] = {
            "mean": summary(forgot[:, 1:].mean(1)),
            "per_block": forgot.nanmean(0).tolist(),
        }
    return result


def meta_test_run(run_dir, episodes: int | None = None) -> dict:
    """Meta-test a finished run again from its directory (``.hydra/config.yaml`` and
    ``checkpoints/last.ckpt``), ``episodes`` (default ``task.test_episodes``) fresh episodes; writes
    and returns its meta_test.json (the same streams as the meta-test at the end of training)."""
    from metaplast.run.config import typed
    from metaplast.run.data import load_data

    run_dir = Path(run_dir)
    cfg = typed(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    module = MetaPlasticity(cfg, load_data(cfg))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    result = meta_test(module, episodes or cfg.task.test_episodes)
    write_text(run_dir / META_TEST, json.dumps(result, indent=1))
    return result


def record_theta(record: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """The shared Θ row of trial ``index`` in an episode record (the Θ that episode used)."""
    return torch.stack(
        [value[index] for key, value in record.items() if key.count("/") == 1 and key.startswith("theta/")]
    )


#: Settings a checkpoint must share with the run that resumes from it: they fix the shapes of the
#: meta-parameters, the task and weight streams and the network (the others, e.g. meta.episodes,
#: meta.lr or the logger, may change on resume).
MUST_MATCH = (
    "seed",
    "dataset.name",
    "dataset.split",
    "dataset.per_class",
    "dataset.seed",
    "meta.trials",
    "meta.first_trial",
    "meta.M",
    "meta.K",
    "meta.Q",
    "meta.batch",
    "meta.sampling",
    "model.activation",
    "model.bias",
    "model.loss",
    "model.remap_labels",
    "model.learn_init",
    "rule.share",
    "feedback.kind",
    "feedback.learn",
    "trainer.precision",
)


PRECISION_NAMES = {"32": "32-true", "64": "64-true"}


def _select(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_checkpoint(module: MetaPlasticity, checkpoint: dict, path, episodes: int) -> None:
    """Refuse a checkpoint this run cannot continue from, naming what differs (CheckpointError).

    Its structure (what Lightning and the module restore), its settings against the run's
    (:data:`MUST_MATCH`, the network's sizes and the rule's terms), the shapes of its tensors
    against the module's, finite values, and its episode against ``meta.episodes``.
    """
    from metaplast.safety import non_finite_tensors

    def refuse(problem: str, allowed: str) -> None:
        raise CheckpointError(f"checkpoint {path}: {problem}; allowed: {allowed}")

    need = {"state_dict": dict, "optimizer_states": list, "global_step": int, "loops": dict}
    need["metaplast_streams"] = dict
    for key, kind in need.items():
        if not isinstance(checkpoint.get(key), kind):
            refuse(
                f"{key} is {'missing' if key not in checkpoint else type(checkpoint[key]).__name__}",
                "a checkpoint written by metaplast-train (checkpoints/*.ckpt)",
            )
    step = checkpoint["global_step"]
    if not 0 <= step <= episodes:
        refuse(f"it is at episode {step}, past meta.episodes={episodes}", f"meta.episodes >= {step}")
    cfg = OmegaConf.to_container(OmegaConf.structured(module.cfg), enum_to_str=True)
    saved = checkpoint.get("hyper_parameters")
    if isinstance(saved, dict):
        for key in MUST_MATCH:
            then, now = _select(saved, key), _select(cfg, key)
            if key == "trainer.precision":
                then, now = (PRECISION_NAMES.get(str(v), v) for v in (then, now))
            if then is not _MISSING and then != now:
                refuse(f"it was made with {key}={then!r}, this run has {key}={now!r}", f"{key}={then!r}")
        try:
            then_sizes = hidden_sizes(OmegaConf.create(saved["model"]))
            then_rule = build_rule(OmegaConf.create(saved))
        except (KeyError, TypeError, ValueError, OmegaConfBaseException):
            then_sizes = then_rule = None
        if then_sizes is not None and then_sizes != hidden_sizes(module.cfg.model):
            now = hidden_sizes(module.cfg.model)
            refuse(
                f"its network has hidden widths {then_sizes}, this run's {now}", f"model.hidden={then_sizes}"
            )
        if then_rule is not None and then_rule != module.rule:
            refuse(
                f"it was made with the rule {then_rule.label} (terms per layer "
                f"{list(then_rule.layer_terms)}), this run's is {module.rule.label}",
                "the checkpoint's rule.terms/rule.per_layer",
            )
    state, own = checkpoint["state_dict"], module.state_dict()
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        refuse(
            f"its state_dict lacks {missing} and has {extra} beyond this run's", "a checkpoint of this run"
        )
    for key, value in state.items():
        if not torch.is_tensor(value) or value.shape != own[key].shape:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            refuse(
                f"{key} has shape {shape}, this run's {tuple(own[key].shape)} "
                f"(meta.trials={module.cfg.meta.trials}, {len(module.rule.terms)} rule terms)",
                "a checkpoint of the same trials, rule and network",
            )
    bad = non_finite_tensors(state) + non_finite_tensors(
        checkpoint.get("metaplast_backtrack", {}), "backtrack"
    )
    if bad:
        refuse(f"{', '.join(bad[:3])} hold NaN or infinite values", "finite meta-parameters (Θ)")
    streams = checkpoint["metaplast_streams"]
    trials = module.cfg.meta.trials
    for name in ("init", "tasks"):
        if not isinstance(streams.get(name), list) or len(streams[name]) != trials:
            refuse(f"its random streams ({name}) are not one per trial", f"{trials} per stream")
    optimizers = checkpoint["optimizer_states"]
    groups = module.configure_optimizers().param_groups
    if len(optimizers) != 1 or not isinstance(optimizers[0], dict):
        refuse(f"it holds {len(optimizers)} optimizer states", "one (Adam's)")
    saved_groups = optimizers[0].get("param_groups")
    if not isinstance(saved_groups, list) or [len(g.get("params", [])) for g in saved_groups] != [
        len(g["params"]) for g in groups
    ]:
        refuse("its Adam parameter groups differ from this run's meta-parameters", "a checkpoint of this run")
    params = [p for group in groups for p in group["params"]]
    for index, moments in (optimizers[0].get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(moments, dict):
            refuse(f"its Adam state has an entry {index!r}", "a checkpoint of this run")
        for name, moment in moments.items():
            if torch.is_tensor(moment) and moment.dim() and moment.shape != params[index].shape:
                refuse(
                    f"its Adam {name} of parameter {index} has shape {tuple(moment.shape)}",
                    "this run's shapes",
                )


def _trials(value, rows: torch.Tensor):
    """Some trials' rows (indices ``rows``) of a meta-parameter or state part (a tensor, a list of
    them, or a dict of them); differentiable."""
    if isinstance(value, dict):
        return {k: _trials(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_trials(v, rows) for v in value]
    return value[rows.to(value.device)]


def log_sum_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``log Σ ‖t‖²`` without overflow (each tensor scaled by its largest entry first)."""
    logs = []
    for t in tensors:
        top = t.detach().abs().max().clamp_min(torch.finfo(t.dtype).tiny)
        logs.append(2 * torch.log(top) + torch.log((t / top).pow(2).sum()))
    return torch.logsumexp(torch.stack(logs), 0)


@torch.no_grad()
def undo_nonfinite_steps(params, values, state, moments, trials: int) -> None:
    """A trial whose Adam step left a non-finite meta-parameter or moment (a gradient beyond the
    float range) gets its step undone: parameters and moments as before the step (moments zero
    where Adam had none). Otherwise a NaN in Adam's moments would make that trial's Θ NaN on
    every later episode (seen once in 600 episodes: a trial 'diverged' for its last 349)."""
    bad = torch.zeros(trials, dtype=torch.bool, device=params[0].device)
    for p in params:
        rows = [p, *(v for k, v in state.get(p, {}).items() if k != "step")]
        for t in rows:
            bad |= ~finite_rows(t, trials)
    if not bad.any():
        return
    for p, value, before in zip(params, values, moments):
        p[bad] = value[bad]
        for key, moment in state.get(p, {}).items():
            if key != "step":
                moment[bad] = before[key][bad] if key in before else 0


@torch.no_grad()
def meta_gradient_norm(params, trials: int) -> torch.Tensor:
    """‖dL/dP‖ per trial over all meta-parameters, in their own units (before any step scaling or
    clipping): ~1e3 on a healthy pool trial, 1e9..1e14 at the edge of chaos (``meta.spike_limit``)."""
    squares = torch.zeros(trials, dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            squares += sum_squares_rows(p.grad, trials)
    return squares.sqrt()


def sum_squares_rows(t: torch.Tensor, trials: int) -> torch.Tensor:
    """Σ t² over each trial's row (the leading axis), in float64 on the CPU."""
    return t.detach().double().reshape(trials, -1).pow(2).sum(1).cpu()


def finite_rows(t: torch.Tensor, trials: int) -> torch.Tensor:
    """Per trial (the leading axis): whether all of its entries of ``t`` are finite."""
    return t.detach().reshape(trials, -1).isfinite().all(1)


def adam_v_hat(moments: dict, b2: float) -> torch.Tensor:
    """Adam's bias-corrected second moment v̂ of one parameter (its optimizer state, step ≥ 1)."""
    return moments["exp_avg_sq"] / (1 - b2 ** int(moments["step"]))


@torch.no_grad()
def clip_spikes(params, state, b2: float, kappa: float) -> None:
    """``meta.spike_clip``: clip each finite meta-gradient entry to ±κ √v̂, Adam's running RMS of
    that entry (bias-corrected), once Adam has one. A single finite but huge meta-gradient (an
    episode on the edge of blowing up: up to 1e18 here) would otherwise raise √v̂ by its size,
    and with β_2 = 0.999 Adam's steps on that trial stay ~0 for thousands of episodes: its Θ
    freezes and the regulariser's gradient λ no longer moves it. With the clip v̂ grows at most
    by β_2 + (1 - β_2) κ² per episode."""
    for p in params:
        moments = state.get(p, {})
        if p.grad is None or "exp_avg_sq" not in moments or int(moments["step"]) == 0:
            continue
        limit = kappa * adam_v_hat(moments, b2).sqrt()
        finite = p.grad.isfinite()
        p.grad.copy_(torch.where(finite, torch.minimum(torch.maximum(p.grad, -limit), limit), p.grad))


def growth_gradients(
    learner, state, meta, params, x_train, y_train, batch, diverged, finite=None, estimator="auto"
) -> list[torch.Tensor]:
    """For each diverged trial, ``∂S/∂P`` of ``S = log Σ_ℓ ‖W_ℓ‖²`` at the last inner step whose
    weights are all finite (zeros for the other trials): which way each meta-parameter drives
    the growth that ended in the blow-up. Rows of ``params``' shapes. The diverged trials run
    batched, as trials do in an episode: one pass without gradient finds each one's last finite
    step (skipped for trials whose whole episode is known to be ``finite``: a spike), then one
    differentiated pass per distinct last finite step, with the meta-gradient ``estimator``
    (``fused`` where it applies: as fast as an episode). Trials never mix, so each row is what the
    trial alone gives (tested); batched, k spiking trials cost about one episode, not k."""
    grads = [torch.zeros_like(p) for p in params]
    steps = -(-x_train.shape[1] // batch)
    bad = diverged.nonzero().flatten().cpu()
    known = torch.zeros(len(bad), dtype=torch.bool) if finite is None else finite.cpu()[bad]
    finite_steps = torch.where(known, steps, 0)
    search = bad[~known]
    if len(search):
        probe, probe_meta = _trials_state(state, search), _trials(meta, search)
        alive = torch.ones(len(search), dtype=torch.bool)
        found = torch.zeros(len(search), dtype=torch.long)
        on_device = search.to(x_train.device)
        with torch.no_grad():
            for i in range(steps):
                rows = on_device, slice(i * batch, (i + 1) * batch)
                probe = learner.step(probe, probe_meta, x_train[rows], y_train[rows])
                alive &= torch.stack([finite_rows(w, len(search)) for w in probe.weights]).all(0).cpu()
                if not alive.any():
                    break
                found[alive] = i + 1
        finite_steps[~known] = found
    for count in finite_steps.unique().tolist():
        if count == 0:
            continue
        group = bad[finite_steps == count]
        with torch.enable_grad():
            seen = group.to(x_train.device), slice(0, count * batch)
            grown = inner_loop(
                learner,
                _trials_state(state, group),
                _trials(meta, group),
                x_train[seen],
                y_train[seen],
                estimator,
                batch,
            )
            growth = sum(log_sum_squares([w[row] for w in grown.weights]) for row in range(len(group)))
            found_grads = torch.autograd.grad(growth, params, allow_unused=True)
        for grad, g in zip(grads, found_grads):
            if g is not None:
                rows = group.to(g.device)
                rows = rows[finite_rows(g[rows], len(rows))]  # a non-finite row keeps its zeros
                grad[rows] = g[rows]
    return grads


def _trials_state(state: State, rows: torch.Tensor) -> State:
    """Some trials' rows of an episode's starting :class:`State`."""
    return State(*(_trials(part, rows) for part in (state.weights, state.feedback, state.biases)))
