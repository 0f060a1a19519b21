"""Read and write IDX files, the format of MNIST, FashionMNIST and EMNIST (plain or gzipped)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

# IDX type code -> big-endian numpy dtype (the format's byte order).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TORCH_TO_IDX = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says where and why."""


#: The largest IDX payload read (decompressed), 4 GiB: EMNIST's largest split is 0.55 GB.
MAX_IDX_BYTES = 4 * 2**30
_GZIP_MAGIC = b"\x1f\x8b"


def _open(path: Path):
    """The file as a stream of its (decompressed) bytes; gzip is recognised by its magic, not its name."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError as err:
        raise DataError(f"IDX file {path} does not exist") from err
    except IsADirectoryError as err:
        raise DataError(f"IDX file {path} is a directory; allowed: an IDX file (plain or gzip)") from err
    except OSError as err:
        raise DataError(f"IDX file {path} cannot be read ({err.strerror or err})") from err
    if handle.read(2) == _GZIP_MAGIC:
        handle.seek(0)
        return gzip.GzipFile(fileobj=handle, mode="rb"), handle, True
    handle.seek(0)
    return handle, handle, False


def _read(stream, n: int, path: Path) -> bytes:
    """Up to ``n`` bytes of the stream (fewer at its end); a damaged gzip stream names the file."""
    try:
        return stream.read(n)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {path}: cannot decompress ({err})") from err


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> torch.Tensor:
    """Read an IDX file (plain or gzip) into a tensor of its stored dtype and shape.

    The header is read first; the payload size it declares is checked against ``max_bytes``
    before any of the payload is read or decompressed, and no more than the declared size
    (plus one byte, to detect a longer file) is ever decompressed: a gzip bomb stops early.
    """
    path = Path(path)
    stream, handle, gzipped = _open(path)
    with handle:
        head = _read(stream, 4, path)
        if len(head) < 4:
            raise DataError(f"IDX file {path}: expected a 4-byte header, found {len(head)} bytes")
        zero, type_code, ndim = struct.unpack(">HBB", head)
        if zero != 0 or type_code not in IDX_DTYPES:
            raise DataError(
                f"IDX file {path}: bad magic number 0x{head.hex()}; expected 0x0000TTDD with "
                f"type TT in {{{', '.join(f'{c:02X}' for c in IDX_DTYPES)}}}"
            )
        header_len = 4 + 4 * ndim
        sizes = _read(stream, 4 * ndim, path)
        if len(sizes) < 4 * ndim:
            raise DataError(
                f"IDX file {path}: expected {ndim} dimension sizes ({header_len} header bytes), "
                f"found {4 + len(sizes)} bytes"
            )
        dims = struct.unpack(f">{ndim}I", sizes)
        dtype = IDX_DTYPES[type_code]
        expected = math.prod(dims) * dtype.itemsize
        if expected > max_bytes:
            raise DataError(
                f"IDX file {path}: its header declares shape {tuple(dims)} of {dtype.name}, "
                f"{expected:,} bytes{' decompressed' if gzipped else ''}; allowed: at most {max_bytes:,} "
                "bytes (not decompressed: the file is refused before reading its payload)"
            )
        if not gzipped:
            found = os.fstat(handle.fileno()).st_size - header_len
            if found != expected:
                raise DataError(
                    f"IDX file {path}: shape {tuple(dims)} of {dtype.name} needs {expected} payload bytes, "
                    f"found {found} (truncated or wrong size)"
                )
        payload = _read(stream, expected + 1, path)
        if len(payload) != expected:
            found = f"{len(payload)}" if len(payload) < expected else f"more than {expected}"
            raise DataError(
                f"IDX file {path}: shape {tuple(dims)} of {dtype.name} needs {expected} payload bytes, "
                f"found {found} (truncated or wrong size)"
            )
    array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | os.PathLike, tensor: torch.Tensor) -> None:
    """Write a tensor as an IDX file, gzipped when the path ends with .gz."""
    if tensor.dtype not in _TORCH_TO_IDX:
        raise DataError(f"write_idx: dtype {tensor.dtype} has no IDX type code")
    type_code = _TORCH_TO_IDX[tensor.dtype]
    header = struct.pack(f">HBB{tensor.dim()}I", 0, type_code, tensor.dim(), *tensor.shape)
    payload = tensor.detach().cpu().contiguous().numpy().astype(IDX_DTYPES[type_code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + payload)


def load_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read matching image and label IDX files; their first dimensions must agree."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if labels.is_floating_point():
        raise DataError(
            f"label file {labels_path}: labels of type {labels.dtype} (IDX type 0D/0E); allowed: integer "
            "class ids (IDX types 08, 09, 0B, 0C), a float label would be truncated"
        )
    if labels.dim() != 1:
        raise DataError(f"label file {labels_path}: expected 1 dimension, found {labels.dim()}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images.shape[0]} images in {images_path} but {labels.shape[0]} labels in "
            f"{labels_path}; the counts must be equal"
        )
    return images, labels
