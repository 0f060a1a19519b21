"""Where results go: one CSV row per episode and trial, W&B key names and mode."""

from __future__ import annotations

import csv
import netrc
import os
import socket
from pathlib import Path

import torch


def episode_record(theta: torch.Tensor, terms, metrics: dict[str, torch.Tensor], total_loss: torch.Tensor):
    """Per-trial columns of one episode: meta/loss, meta/acc, theta/<r>, angle/<l>, orth/<l>.

    Angles are indexed l = 0..L-1 and orthonormality errors l = 1..L, as in the papers.
    Values are ``(trials,)`` tensors.
    """
    record = {
        "meta/loss": metrics["loss"],
        "meta/loss_total": total_loss,
        "meta/acc": metrics["acc"],
    }
    record.update({f"theta/{r}": theta[:, i] for i, r in enumerate(terms)})
    record.update({f"angle/{l}": metrics["angle"][:, l] for l in range(metrics["angle"].shape[1])})
    record.update({f"orth/{l + 1}": metrics["orth"][:, l] for l in range(metrics["orth"].shape[1])})
    return {key: value.detach().double().cpu() for key, value in record.items()}


def logged_scalars(record: dict[str, torch.Tensor], trial_ids: list[int]) -> dict[str, float]:
    """Mean over trials under each key, and each trial under ``<key>/trial_<i>``."""
    scalars = {}
    for key, values in record.items():
        scalars[key] = float(values.mean())
        scalars.update({f"{key}/trial_{t}": float(v) for t, v in zip(trial_ids, values.tolist())})
    return scalars


class EpisodeCSV:
    """``metrics.csv``: one row per episode and trial, flushed each episode, resumable."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_from(self, episode: int) -> None:
        """Drop rows of ``episode`` and later (a resumed run writes them again)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [row for row in rows if int(row["episode"]) < episode]
        if rows:
            self._write_atomically(list(rows[0].keys()), kept)

    def _write_atomically(self, columns, rows) -> None:
        temporary = self.path.with_suffix(".csv.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.path)

    def append(self, episode: int, trial_ids: list[int], record: dict[str, torch.Tensor]) -> None:
        columns = ["episode", "trial", *[key.replace("/", "_") for key in record]]
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if fresh:
                writer.writerow(columns)
            values = [v.tolist() for v in record.values()]
            for index, trial in enumerate(trial_ids):
                writer.writerow([episode, trial, *[repr(float(v[index])) for v in values]])


def wandb_mode(requested: str) -> str:
    """``auto``: online with an API key and a reachable W&B host, else offline; never asks to log in."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline" if os.environ["WANDB_MODE"] != "disabled" else "disabled"
    host = "api.wandb.ai"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if not has_key:
        return "offline"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"
