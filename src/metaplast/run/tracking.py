"""Where results go: one CSV row per episode and trial; W&B: key names, mode, the step metric, the
summary, artifacts and run names."""

from __future__ import annotations

import csv
import io
import netrc
import os
import socket
from pathlib import Path

import torch

from metaplast.safety import CheckpointError, write_text


def meta_columns(meta, terms) -> dict[str, torch.Tensor]:
    """Per-trial columns of the meta-parameters: ``theta/<r>`` (Θ shared by all layers),
    ``theta/layer<ℓ>/<r>`` (per layer; per synapse: the mean over the layer's synapses), and a
    plastic pathway's ``psi/<k>`` (Eq. 9's feedback-rule coefficients, not pool terms)."""
    theta = meta.theta
    columns = {}
    if isinstance(theta, torch.nn.ParameterList):
        for layer, values in enumerate(theta):
            mean = values.mean((1, 2))
            columns.update({f"theta/layer{layer}/{r}": mean[:, i] for i, r in enumerate(terms)})
    elif theta.dim() == 2:
        columns.update({f"theta/{r}": theta[:, i] for i, r in enumerate(terms)})
    else:
        for layer in range(theta.shape[1]):
            columns.update({f"theta/layer{layer}/{r}": theta[:, layer, i] for i, r in enumerate(terms)})
    if hasattr(meta, "psi"):
        columns.update({f"psi/{k}": meta.psi[:, k] for k in range(meta.psi.shape[1])})
    for name, value in meta.extra.items():  # a pathway's own: each entry, or the mean when large
        flat = value.reshape(value.shape[0], -1)
        if flat.shape[1] <= 20:
            columns.update({f"{name}/{i}": flat[:, i] for i in range(flat.shape[1])})
        else:
            columns[f"{name}/mean"] = flat.mean(1)
    return columns


def episode_record(meta, terms, metrics: dict[str, torch.Tensor], total_loss: torch.Tensor):
    """Per-trial columns of one episode: meta/loss, meta/acc, the meta-parameters, angle/<l>, orth/<l>,
    and where measured cos/<l> (update-gradient cosine) and fbangle/<l> (∠(W^T, B)).

    Angles are indexed l = 0..L-1 and orthonormality errors l = 1..L, as in the papers.
    Values are ``(trials,)`` tensors.
    """
    record = {"meta/loss": metrics["loss"], "meta/loss_total": total_loss}
    if "acc" in metrics:
        record["meta/acc"] = metrics["acc"]
    record.update(meta_columns(meta, terms))
    record.update({f"angle/{l}": metrics["angle"][:, l] for l in range(metrics["angle"].shape[1])})
    record.update({f"orth/{l + 1}": metrics["orth"][:, l] for l in range(metrics["orth"].shape[1])})
    for name, prefix in (("update_cos", "cos"), ("fb_angle", "fbangle")):  # metaplast.core.metrics
        if name in metrics:
            record.update({f"{prefix}/{l}": metrics[name][:, l] for l in range(metrics[name].shape[1])})
    # A copy: the meta-parameters change in place at the optimizer step, after the record is taken.
    return {key: value.detach().double().cpu().clone() for key, value in record.items()}


#: Key prefixes of results; every other key of an episode record is a meta-parameter.
RESULTS = ("meta/", "angle/", "orth/", "cos/", "fbangle/")


def is_meta_parameter(key: str) -> bool:
    """Keys of meta-parameters (kept for a diverged trial: the values it ran with), not results."""
    return not key.startswith(RESULTS)


def flag_diverged(record: dict[str, torch.Tensor], diverged: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``meta/diverged`` (1.0 or 0.0 per trial) and blank the results of diverged trials.

    A diverged trial's losses, accuracy, angles and orthonormality errors become NaN
    here (they are not results), while its ``theta/<r>`` keep its last finite Θ.
    """
    diverged = diverged.detach().bool().cpu()
    flagged = {"meta/diverged": diverged.double()}
    for key, values in record.items():
        flagged[key] = values if is_meta_parameter(key) else values.masked_fill(diverged, float("nan"))
    return flagged


#: The W&B section of per-trial values: ``trials/<key>/trial_<i>``, apart from the means' panels.
TRIALS = "trials/"


def logged_scalars(record: dict[str, torch.Tensor], trial_ids: list[int]) -> dict[str, float]:
    """Mean over trials under each key (W&B's panels), and each trial under ``trials/<key>/trial_<i>``
    (a section of its own, so 20 trials × every key do not drown the means).

    With a ``meta/diverged`` column the results of diverged trials are left out: the
    means run over the finite trials (a key is dropped when none is left) and a
    diverged trial logs only its flag and its Θ, so no NaN reaches W&B as a result.
    """
    diverged = record.get("meta/diverged", torch.zeros(len(trial_ids))).bool()
    scalars = {}
    for key, values in record.items():
        keep = torch.ones_like(diverged) if key == "meta/diverged" or is_meta_parameter(key) else ~diverged
        if keep.any():
            scalars[key] = float(values[keep].mean())
        scalars.update(
            {f"{TRIALS}{key}/trial_{t}": float(v) for t, v, k in zip(trial_ids, values.tolist(), keep) if k}
        )
    return scalars


class EpisodeCSV:
    """``metrics.csv``: one row per episode and trial, rewritten atomically each episode, resumable.

    The whole file is written to a temporary file and renamed (metaplast.safety), so a
    crash leaves the previous complete file. A diverged trial's row has ``meta_diverged``
    = 1 and ``nan`` in every result cell (no result, marked by the flag); its ``theta_<r>``
    are its last finite Θ.

    The table is also kept as numbers (:attr:`columns`, :attr:`rows`: float64, exact), which a
    checkpoint stores (:meth:`state_dict`): a resumed run rewrites the file from its checkpoint's
    own record (:meth:`restore`), so a damaged, hand-edited or missing file is rebuilt, bit for bit.
    """

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._text: str | None = None  # the file's content, so an episode costs one write, no read
        self.keys: list[str] | None = None  # the episode record's keys, one column each
        self.rows: list[list[float]] = []

    def _file_rows(self) -> list[list[str]]:
        if self.path is None or not self.path.exists():
            return []
        with self.path.open(newline="", encoding="utf-8", errors="replace") as handle:
            return list(csv.reader(handle))

    def truncate_from(self, episode: int) -> None:
        """Drop rows of ``episode`` and later (a resumed run writes them again); a resumed run whose
        checkpoint holds no record of the table (older checkpoints) keeps the file's rows before
        ``episode``, which must be well-formed."""
        rows = self._file_rows()
        if not rows:
            return
        header, kept = rows[0], []
        for number, row in enumerate(rows[1:], start=2):
            try:
                if header[:2] != ["episode", "trial"]:
                    number, row = 1, header
                    raise ValueError
                values = [float(cell) for cell in row]
                if len(row) != len(header):
                    raise ValueError
            except ValueError:
                raise CheckpointError(
                    f"{self.path} line {number} is damaged ({','.join(row)[:80]!r}) and the checkpoint "
                    "holds no record to rebuild it from (it predates that); allowed: metrics.csv as the "
                    "run wrote it (restore it, or start the run afresh with resume=false)"
                ) from None
            if values[0] < episode:
                kept.append(row)
        self._write([header, *kept])

    def _write(self, rows: list[list], append: bool = False) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        text = (self._text if append else "") + buffer.getvalue()
        if self.path is not None:
            write_text(self.path, text)
        self._text = text

    def append(self, episode: int, trial_ids: list[int], record: dict[str, torch.Tensor]) -> None:
        """One episode's rows. A record with keys the table lacks (a run resumed from the checkpoint
        of an older version, which logged fewer columns) widens the table: earlier rows get NaN
        there and the file is rewritten with the new header; a key the record lacks gets NaN."""
        if self.keys is None:
            self.keys = list(record)
        widened = [key for key in record if key not in self.keys]
        if widened:
            self.keys += widened
            self.rows = [row + [float("nan")] * len(widened) for row in self.rows]
        missing = [float("nan")] * len(trial_ids)
        values = [record[key].tolist() if key in record else missing for key in self.keys]
        diverged = record.get("meta/diverged", torch.zeros(len(trial_ids))).tolist()
        for index, trial in enumerate(trial_ids):
            self.rows.append([float(episode), float(trial), *(float(v[index]) for v in values)])
        if self.path is None:
            return
        if widened:
            self._text = self.render()
            write_text(self.path, self._text)
            return
        if self._text is None:
            self._text = self.path.read_text(encoding="utf-8") if self.path and self.path.exists() else ""
        rows = [] if self._text else [["episode", "trial", *[key.replace("/", "_") for key in self.keys]]]
        for index, trial in enumerate(trial_ids):
            cells = [_cell(key, v[index], diverged[index]) for key, v in zip(self.keys, values)]
            rows.append([episode, trial, *cells])
        self._write(rows, append=True)

    # --- the table's own record, kept in checkpoints ---
    def state_dict(self) -> dict:
        """The table as numbers: the record's ``keys`` and ``rows``, float64 (rows, 2 + keys)."""
        rows = torch.tensor(self.rows, dtype=torch.float64) if self.rows else torch.zeros(0, 0)
        return {"keys": list(self.keys or []), "rows": rows}

    def render(self) -> str:
        """The CSV text of the record, exactly as :meth:`append` wrote it."""
        if not self.keys:
            return ""
        flag = self.keys.index("meta/diverged") if "meta/diverged" in self.keys else None
        lines = [["episode", "trial", *[key.replace("/", "_") for key in self.keys]]]
        for row in self.rows:
            diverged = row[2 + flag] if flag is not None else 0.0
            cells = [_cell(key, value, diverged) for key, value in zip(self.keys, row[2:])]
            lines.append([int(row[0]), int(row[1]), *cells])
        buffer = io.StringIO()
        csv.writer(buffer).writerows(lines)
        return buffer.getvalue()

    def restore(self, state: dict, episode: int) -> str | None:
        """Take a checkpoint's record (its rows before ``episode``) and rewrite the file from it.

        Returns None when the file held exactly those rows (later rows, which a resumed run writes
        again, are dropped), else what was wrong with it; the file is rebuilt either way.
        """
        self.keys = list(state["keys"]) or None
        self.rows = [row for row in state["rows"].tolist() if row and row[0] < episode]
        expected = self.render()
        problem = None
        if self.path is not None:
            found = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else None
            if found is None:
                problem = "it is missing" if expected else None
            elif not found.startswith(expected):
                lines, wanted = found.splitlines(), expected.splitlines()
                pairs = zip(lines, wanted)
                line = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(lines), len(wanted)))
                problem = f"line {line + 1} differs from the checkpoint's record"
            write_text(self.path, expected)
        self._text = expected
        return problem


def _cell(key: str, value: float, diverged: float) -> str:
    """``repr`` of the value; the flags as 0/1; ``nan`` for a diverged trial's results."""
    if key == "meta/diverged":
        return str(int(value))
    if diverged and not is_meta_parameter(key):
        return "nan"
    return str(int(value)) if key == "meta/spike" else repr(float(value))


def has_wandb_key(host: str = "api.wandb.ai") -> bool:
    """Whether a W&B API key is at hand: ``WANDB_API_KEY`` or an entry for ``host`` in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str) -> str:
    """``auto``: online with an API key and a reachable W&B host, else offline; never asks to log in."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline" if os.environ["WANDB_MODE"] != "disabled" else "disabled"
    host = "api.wandb.ai"
    if not has_wandb_key(host):
        return "offline"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def late_summary(table: EpisodeCSV, trial_ids: list[int], last: int, final: dict[str, torch.Tensor]) -> dict:
    """A finished run's W&B summary: each result key (``meta/acc``, ``angle/0``, ...) the mean over
    trials of each trial's mean over the last ``last`` episodes (diverged episodes left out, as in
    :func:`metaplast.analysis.results.final_accuracy`); each meta-parameter its ``final`` value (after
    the last Adam step); per trial under ``trials/``."""
    from metaplast.analysis.results import per_trial_mean

    summary: dict[str, float] = {}
    if table.keys and table.rows:
        rows = torch.tensor(table.rows, dtype=torch.float64)
        tail = rows[rows[:, 0] > rows[:, 0].max() - last]
        for index, key in enumerate(table.keys):
            if key in final:  # a meta-parameter: its final value, below
                continue
            columns = [tail[tail[:, 1] == t, 2 + index].tolist() for t in trial_ids]
            depth = max(len(c) for c in columns)
            padded = [c + [float("nan")] * (depth - len(c)) for c in columns]
            means = per_trial_mean(list(zip(*padded))) if depth else []
            finite = [m for m in means if m == m]
            if finite:
                summary[key] = sum(finite) / len(finite)
            summary.update({f"{TRIALS}{key}/trial_{t}": m for t, m in zip(trial_ids, means) if m == m})
    for key, values in final.items():
        summary[key] = float(values.mean())
        summary.update({f"{TRIALS}{key}/trial_{t}": float(v) for t, v in zip(trial_ids, values.tolist())})
    return summary


def log_run_artifact(experiment, kind: str, files: dict[str, Path], metadata: dict) -> None:
    """Log the run's files (those that exist) as one W&B artifact ``<kind>-<run id>`` of type ``kind``."""
    import wandb

    present = {name: Path(path) for name, path in files.items() if Path(path).is_file()}
    if not present:
        return
    artifact = wandb.Artifact(f"{kind}-{experiment.id}", type=kind, metadata=metadata)
    for name, path in present.items():
        artifact.add_file(str(path), name=name)
    experiment.log_artifact(artifact)


#: Config groups that say where results go, not which condition ran: left out of run names.
NOT_IN_NAMES = ("seed", "logger", "trainer")


def run_name(overrides: list[str], varying: set[str] | None = None, limit: int = 128) -> str | None:
    """A short W&B run name: in a sweep the overrides of the keys that vary (``reg.lam=0.001,seed=1``),
    else the chosen config groups' options (``glyphs-ehebb-l1``); None leaves it to W&B."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra")]
    if varying:
        name = ",".join(f"{k}={v}" for k, v in pairs if k in varying)
    else:
        name = "-".join(v for k, v in pairs if "." not in k and "/" not in k and k not in NOT_IN_NAMES)
        seed = [v for k, v in pairs if k == "seed"]
        if seed:
            name = f"{name}-seed{seed[0]}" if name else f"seed{seed[0]}"
    return name[:limit] or None


def sweep_varying(sweep_dir: str | Path, params) -> set[str]:
    """The keys a sweep varies: the sweeper's ``params`` and the command line's sweeps (``a=1,2``,
    ``range()``, ``choice()``) as the launcher saved them in ``<sweep dir>/multirun.yaml``."""
    keys = {str(k) for k in (params or {})}
    saved = Path(sweep_dir) / "multirun.yaml"
    if saved.is_file():
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        try:
            task = list(OmegaConf.load(saved).hydra.overrides.task)
            parsed = OverridesParser.create().parse_overrides(task)
            keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
        except Exception:  # an unreadable record only costs the short name
            pass
    return keys


def short_name(name: str | None) -> str | None:
    """The W&B run name: ``logger.name``, else in a sweep the overrides that vary, else the chosen groups."""
    from hydra.core.hydra_config import HydraConfig

    from metaplast.run.resume import multirun

    if name or not HydraConfig.initialized():
        return name
    hydra = HydraConfig.get()
    varying = sweep_varying(hydra.sweep.dir, hydra.sweeper.get("params")) if multirun() else None
    return run_name(list(hydra.overrides.task), varying)


def wandb_config(cfg) -> dict:
    """The W&B run's config: the resolved, nested Hydra config and the code version."""
    from omegaconf import OmegaConf

    from metaplast.run.resume import code_version

    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config["code_version"] = code_version()
    return config


def online_columns(table) -> dict[str, str]:
    """W&B keys of ``online.csv``'s result columns: ``acc`` -> ``online/acc``, ``angle_0`` -> ``angle/0``."""
    keys = {}
    for column in table.columns:
        if column in ("sample", "trial", "diverged") or not str(table[column].dtype).startswith(
            ("float", "int")
        ):
            continue
        head, _, tail = column.rpartition("_")
        keys[column] = f"{head}/{tail}" if head and tail.isdigit() else f"online/{column}"
    return keys


def log_evaluation(cfg, out_dir: Path, table) -> str | None:
    """An online evaluation as a W&B run (``job_type`` evaluate), after the pass: ``sample`` as the step
    metric, the means over the trials that have not diverged as panels, each trial under ``trials/``,
    the summary at the last sample, ``online.csv`` and ``theta.json`` as an artifact. Returns the mode,
    or None when ``logger`` says no W&B."""
    from metaplast.run.resume import sweep_name

    logger = cfg.logger
    mode = wandb_mode(logger.mode.value) if logger.wandb else "disabled"
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=logger.group or sweep_name(),
        name=short_name(logger.name),
        tags=[*logger.tags, f"feedback:{cfg.feedback.kind.value}"[:64], f"dataset:{cfg.dataset.name}"[:64]],
        job_type="evaluate",
        dir=str(out_dir),
        mode=mode,
        config=wandb_config(cfg),
    )
    try:
        run.define_metric("sample", hidden=True)
        run.define_metric("*", step_metric="sample", step_sync=True)
        keys = online_columns(table)
        scored = table[table["diverged"] == 0] if "diverged" in table else table
        for sample, rows in table.groupby("sample", sort=True):
            finite = scored[scored["sample"] == sample]
            logged = {"sample": int(sample)}
            logged.update({key: float(finite[c].mean()) for c, key in keys.items() if len(finite)})
            for _, row in finite.iterrows():
                logged.update(
                    {f"{TRIALS}{key}/trial_{int(row['trial'])}": float(row[c]) for c, key in keys.items()}
                )
            if "diverged" in rows:
                logged["online/diverged"] = float(rows["diverged"].mean())
            run.log(logged)
        last = scored[scored["sample"] == table["sample"].max()]
        run.summary.update({"final/test_acc": float(last["acc"].mean()), "final/trials": int(len(last))})
        files = {p.name: p for p in sorted(Path(out_dir).iterdir()) if p.suffix in (".csv", ".json")}
        log_run_artifact(run, "evaluate", files, {"final_test_acc": float(last["acc"].mean())})
    finally:
        run.finish()
    return mode


def episode_logger(**kwargs):
    """Lightning's W&B logger with ``episode`` as the step metric, the nested config as given (Lightning's
    flat ``save_hyperparameters`` copy is not logged) and no constant ``epoch`` panel."""
    from lightning.pytorch.loggers import WandbLogger

    class EpisodeWandbLogger(WandbLogger):
        def __init__(self, **options):
            super().__init__(**options)
            self._wandb_init.pop("anonymous", None)  # deprecated in wandb; it only warns

        @property
        def experiment(self):
            if self._experiment is None:
                import wandb

                self._experiment = wandb.init(**self._wandb_init)
                self._experiment.define_metric("episode", hidden=True)
                self._experiment.define_metric("*", step_metric="episode", step_sync=True)
            return self._experiment

        def log_hyperparams(self, params) -> None:
            """The resolved Hydra config went to ``wandb.init``; Lightning's flat copy would overwrite it."""

        def log_metrics(self, metrics, step=None) -> None:
            logged = {key: value for key, value in metrics.items() if key != "epoch"}
            if step is not None:
                logged["episode"] = int(step)  # Lightning's step here is the episode (metrics.csv's)
            self.experiment.log(logged)

    return EpisodeWandbLogger(**kwargs)
