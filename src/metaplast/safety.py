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


class OutputError(ValueError):
    """An output directory that cannot be used: not a directory, not writable, or in use by another run."""


#: The lock file of a run directory (see :class:`DirectoryLock`).
LOCK_NAME = ".metaplast.lock"
_held: dict[Path, list] = {}  # lock file -> [fd, count]: locks this process holds (re-entrant)


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and check that it is a writable directory; ``what`` names the setting.

    Raises :class:`OutputError` naming the path and the problem (not a directory, read-only, ...).
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise OutputError(
                f"{what}={str(path)!r}: {str(parent)!r} is a file; allowed: a writable directory"
            )
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(
            f"{what}={str(path)!r} cannot be written ({error.strerror or error}); "
            "allowed: a writable directory"
        ) from None
    return path


class DirectoryLock:
    """An exclusive lock on a run directory for as long as a run writes into it.

    ``fcntl.flock`` on ``<directory>/.metaplast.lock``: the operating system releases it when the
    process ends, however it ends (SIGKILL included), so a stale lock never blocks a rerun. A
    second process asking for it gets :class:`OutputError`; the same process may take it again
    (re-entrant). The file holds the pid of the holder, for the message.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "output directory"):
        self.directory, self.what = Path(directory), what
        self.path = (self.directory / LOCK_NAME).resolve()

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        if self.path in _held:
            _held[self.path][1] += 1
            return
        check_output_dir(self.directory, self.what)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(
                f"{self.what} {str(self.directory)!r} cannot be locked ({error.strerror or error}); "
                "allowed: a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"{self.what} {str(self.directory)!r} is in use by another run (pid {holder}); "
                "allowed: a directory no running job writes to (wait for it, or choose another)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[self.path] = [fd, 1]

    def release(self) -> None:
        entry = _held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            os.close(entry[0])  # closing the descriptor releases the flock

    @staticmethod
    def in_use(directory: str | os.PathLike) -> bool:
        """Whether another process holds the lock of ``directory`` (this process's own locks: False)."""
        import fcntl

        path = (Path(directory) / LOCK_NAME).resolve()
        if path in _held or not path.exists():
            return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)


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
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem.

    Refused with :class:`CheckpointError`: a missing, empty, truncated or corrupt file, one
    that is not a ``torch.save`` archive, one that holds pickled objects other than plain data,
    and one whose content is not a dict (a checkpoint is a dict of plain data).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; allowed: a checkpoint file (*.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        size = path.stat().st_size
        archive = zipfile.is_zipfile(path)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes); resume from an earlier one (checkpoints/episode-*.ckpt)"
        )
    if not archive:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a torch.save archive, {size} bytes); "
            "resume from an earlier one (checkpoints/episode-*.ckpt)"
        )
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise CheckpointError(
            f"checkpoint {path} holds something other than tensors, numbers, strings, lists and dicts; "
            "metaplast loads checkpoints with weights_only=True and refuses to unpickle it "
            f"({detail.strip()})"
        ) from None
    except Exception as error:  # RuntimeError, EOFError, BadZipFile, OSError, ... of a damaged archive
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({reason}); "
            "resume from an earlier one (checkpoints/episode-*.ckpt)"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not a checkpoint (a dict with "
            "state_dict, global_step, optimizer_states, ...)"
        )
    return loaded


def non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """The names of the floating-point tensors in a nested dict/list that hold NaN or ±inf."""
    if torch.is_tensor(tree):
        return [prefix or "tensor"] if tree.is_floating_point() and not tree.isfinite().all() else []
    if isinstance(tree, dict):
        items = tree.items()
    else:
        items = enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    found = []
    for key, value in items:
        found += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with fsync'd atomic saves and ``weights_only=True`` loads.

    ``on_saved(path)``, when given, is called once a checkpoint is complete on disk (the
    auto-resume index points at a run directory only from then on).
    """

    def __init__(self, on_saved=None):
        super().__init__()
        self.on_saved = on_saved

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        save_torch(checkpoint, path)
        if self.on_saved is not None:
            self.on_saved(Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise CheckpointError(
                f"checkpoint {path}: metaplast only loads checkpoints with weights_only=True"
            )
        return load_checkpoint(path, map_location if map_location is not None else "cpu")
