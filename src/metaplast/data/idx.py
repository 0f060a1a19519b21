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


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            return gzip.decompress(raw)
        return raw
    except FileNotFoundError as err:
        raise DataError(f"IDX file {path} does not exist") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {path}: cannot decompress ({err})") from err


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (plain or .gz) into a tensor of its stored dtype and shape."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"IDX file {path}: expected a 4-byte header, found {len(data)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_DTYPES:
        raise DataError(
            f"IDX file {path}: bad magic number 0x{data[:4].hex()}; expected 0x0000TTDD with "
            f"type TT in {{{', '.join(f'{c:02X}' for c in IDX_DTYPES)}}}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"IDX file {path}: expected {ndim} dimension sizes ({header_len} header bytes), "
            f"found {len(data)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        raise DataError(
            f"IDX file {path}: shape {tuple(dims)} of {dtype.name} needs {expected} payload bytes, "
            f"found {found} (truncated or wrong size)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
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
    if labels.dim() != 1:
        raise DataError(f"label file {labels_path}: expected 1 dimension, found {labels.dim()}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images.shape[0]} images in {images_path} but {labels.shape[0]} labels in "
            f"{labels_path}; the counts must be equal"
        )
    return images, labels
