"""Read an offline W&B run file (``run-*.wandb``) without the W&B service, for tests.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version),
then 32 KiB blocks of records, each with a 7-byte header (crc32, little-endian
length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf ``Record``.
"""

from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768


def records(path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pieces, out = 7, [], []
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            pieces = [payload]
        elif kind == 3:
            pieces.append(payload)
        elif kind == 4:
            out.append(b"".join([*pieces, payload]))
    return [wandb_internal_pb2.Record.FromString(p) for p in out]


def summary(path) -> dict:
    """The run's final summary: key -> JSON text of the value."""
    result = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                result[item.key or "/".join(item.nested_key)] = item.value_json
    return result


def offline_run_file(run_dir) -> Path:
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    return path
