"""Where results go: one CSV row per episode and trial, W&B key names and mode."""

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


def logged_scalars(record: dict[str, torch.Tensor], trial_ids: list[int]) -> dict[str, float]:
    """Mean over trials under each key, and each trial under ``<key>/trial_<i>``.

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
            {f"{key}/trial_{t}": float(v) for t, v, k in zip(trial_ids, values.tolist(), keep) if k}
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
        columns = ["episode", "trial", *[key.replace("/", "_") for key in record]]
        if self.keys is None:
            self.keys = list(record)
        diverged = record.get("meta/diverged", torch.zeros(len(trial_ids))).tolist()
        values = [v.tolist() for v in record.values()]
        for index, trial in enumerate(trial_ids):
            self.rows.append([float(episode), float(trial), *(float(v[index]) for v in values)])
        if self.path is None:
            return
        if self._text is None:
            self._text = self.path.read_text(encoding="utf-8") if self.path and self.path.exists() else ""
        rows = [] if self._text else [columns]
        for index, trial in enumerate(trial_ids):
            cells = [_cell(key, v[index], diverged[index]) for key, v in zip(record, values)]
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
    """``repr`` of the value; the flag as 0/1; ``nan`` for a diverged trial's results."""
    if key == "meta/diverged":
        return str(int(value))
    if diverged and not is_meta_parameter(key):
        return "nan"
    return repr(float(value))


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
