"""Crash-safe files and safe checkpoints.

Every result file is written to a temporary file beside it, flushed to disk
(``fsync``) and then renamed over the old one, so a crash at any moment leaves
either the previous complete version or the new one, never a torn file.
Checkpoints are loaded with ``torch.load(weights_only=True)``: plain dicts,
lists, tensors, numbers and strings only; nothing else is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or holds objects other than plain data."""


class DivergenceError(RuntimeError):
    """A trial diverged in ``meta.max_diverged`` consecutive episodes; the message names it."""


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    Text mode writes UTF-8 with ``newline=""`` (as the csv module wants).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode {mode!r} is not allowed; allowed: 'wb', 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)
        text = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``path.write_bytes(data)``, atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def save_figure(fig, path: str | os.PathLike, **savefig) -> None:
    """``fig.savefig(path)``, atomically (the format comes from the file name)."""
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", **savefig)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise CheckpointError(
            f"checkpoint {path} holds something other than tensors, numbers, strings, lists and dicts; "
            "metaplast loads checkpoints with weights_only=True and refuses to unpickle it "
            f"({detail.strip()})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({str(error).splitlines()[0]}); "
            "resume from an earlier one (checkpoints/episode-*.ckpt)"
        ) from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with fsync'd atomic saves and ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise CheckpointError(
                f"checkpoint {path}: metaplast only loads checkpoints with weights_only=True"
            )
        return load_checkpoint(path, map_location if map_location is not None else "cpu")
