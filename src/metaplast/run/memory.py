"""What an episode needs at least, in bytes, from the sizes of a config; refuse what cannot fit.

The estimate is a lower bound (the dominant tensors only), so a refusal is certain: a config
refused here could not run on this machine. It counts, per trial, the weight sets the
meta-gradient keeps (``W_t`` of every inner step with autograd; with the fused estimator and
``trainer.recompute_segment=k``, about ``steps/k + k`` of them), the feedback matrices, and
the task's images; against the memory of the device the run uses (the RAM of the machine or
its container limit, or the GPU's memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from metaplast.core.fused import RECOMPUTE_SEGMENT

GiB = 2**30


class TooLarge(ValueError):
    """A configuration whose least memory exceeds the device's; the message names the sizes."""


def _cgroup_limit() -> int | None:
    """The container's memory limit in bytes (cgroup v2 or v1), None when unlimited or unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def device_memory(device: str = "cpu") -> int | None:
    """Bytes of memory of ``device`` ("cpu": physical RAM, or the container's limit if lower; "cuda":
    the GPU's total memory); None when unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = None
    limit = _cgroup_limit()
    known = [m for m in (physical, limit) if m]
    return min(known) if known else None


def weight_count(sizes: Sequence[int]) -> int:
    """Entries of the weight matrices of a network with layer widths ``sizes`` (Python ints, exact)."""
    return sum(int(a) * int(b) for a, b in zip(sizes[:-1], sizes[1:]))


def kept_weight_sets(steps: int, estimator: str, recompute_segment: int) -> int:
    """Weight sets ``W_t`` the meta-gradient keeps alive in one episode of ``steps`` inner steps:
    with recomputation, each segment's first and the adapted one (the steps inside a segment are
    low-rank factors, :mod:`metaplast.core.fused`)."""
    if estimator == "autograd" or recompute_segment <= 0 or recompute_segment >= steps:
        return steps + 1
    return math.ceil(steps / recompute_segment) + 1


@dataclass(frozen=True)
class Estimate:
    """The least bytes of one episode and the sizes it comes from (for the message)."""

    bytes: int
    detail: str


def episode_estimate(
    sizes: Sequence[int],
    trials: int,
    steps: int,
    query: int,
    estimator: str = "auto",
    recompute_segment: int = RECOMPUTE_SEGMENT,
    element_bytes: int = 4,
) -> Estimate:
    """The least memory of one meta-training episode: per trial, the kept weight sets, the feedback
    matrices and the task's ``steps + query`` images of ``sizes[0]`` pixels."""
    weights = weight_count(sizes)
    kept = kept_weight_sets(steps, estimator, recompute_segment)
    per_trial = (kept + 1) * weights + (steps + query) * int(sizes[0])
    total = int(trials) * per_trial * element_bytes
    detail = (
        f"{trials} trial(s) x ({kept} kept weight sets + feedback) x {weights:,} weights of the "
        f"{'-'.join(map(str, sizes))} network x {element_bytes} bytes"
    )
    return Estimate(total, detail)


def online_estimate(
    sizes: Sequence[int], trials: int, test_images: int, chunk: int, element_bytes: int = 4
) -> Estimate:
    """The least memory of online evaluation: per trial, the weights and feedback (twice: before
    and after a step) and the activations of every test image in every layer."""
    weights = weight_count(sizes)
    activations = int(test_images) * sum(int(n) for n in sizes[1:])
    per_trial = 4 * weights + activations + int(chunk) * int(sizes[0])
    total = int(trials) * per_trial * element_bytes
    detail = (
        f"{trials} trial(s) x ({weights:,} weights of the {'-'.join(map(str, sizes))} network x 4 "
        f"+ {activations:,} activations of {test_images} test images) x {element_bytes} bytes"
    )
    return Estimate(total, detail)


def describe_bytes(n: int) -> str:
    if n >= 2**40:
        return f"{n / 2**40:,.1f} TiB"
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def check_fits(estimate: Estimate, device: str, what: str, advice: str) -> None:
    """Raise :class:`TooLarge` when ``estimate`` exceeds the memory of ``device``."""
    available = device_memory(device)
    if available is None or estimate.bytes <= available:
        return
    where = "GPU" if device.startswith("cuda") else "machine"
    raise TooLarge(
        f"{what} needs at least {describe_bytes(estimate.bytes)} ({estimate.detail}) but this {where} "
        f"has {describe_bytes(available)}; allowed: a configuration that fits ({advice})"
    )
