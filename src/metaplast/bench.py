"""Benchmark: one meta-training episode of metaplast against the papers' original formulation.

``python -m metaplast.bench`` times one episode (the inner loop of Algorithm 1 over
``--steps`` online samples, the query loss, and the meta-gradient through the whole
unrolled loop) for each rule × trial count × recomputation setting, and, side by
side in the same process on the same inputs (W, B, tasks, Θ), the baseline of
:mod:`metaplast.reference`: one trial at a time, every term built as its literal
dense matrix, plain autograd with every ``W`` kept alive. Before timing it checks
that both give the same adapted weights and meta-gradient.

Beside the ratio it reports how far an episode is from the machine's physical limits: its
arithmetic (matrix-product FLOPs counted by ``torch.utils.flop_counter`` in an untimed run) per
second against a GEMM measured in the same run, and its *one-pass traffic* per second against
a STREAM-like copy measured in the same run (:func:`machine_peaks`, :func:`one_pass_bytes`).

Peak memory is the peak resident set size (``VmHWM`` of ``/proc/self/status``)
of a fresh subprocess that builds the same inputs and runs one episode of the
configuration; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from math import nan
from pathlib import Path

import torch

from metaplast import reference
from metaplast.core.fused import RECOMPUTE_SEGMENT
from metaplast.core.inner_loop import inner_loop
from metaplast.core.learner import Learner, State
from metaplast.core.networks import BETA, MLP
from metaplast.core.pathways import make_pathway
from metaplast.core.rules import Rule

#: The pathways the benchmark (and the literal baseline of :mod:`metaplast.reference`) covers.
FEEDBACK_KINDS = ("bp", "fa", "dfa")

PAPER_SIZES = [784, 170, 130, 100, 70, 47]
#: Θ of the benchmark: the paper's surviving values (Table S1) for θ_0, θ_2, θ_9, 1e-3 elsewhere.
THETA_VALUES = {0: 1e-2, 2: -2.36e-2, 9: 4.2e-3}


def sparse_images(trials, count, pixels, generator):
    """Synthetic inputs in [0, 1] with about 75 % zero pixels, like character images."""
    values = torch.rand(trials, count, pixels, generator=generator)
    return values * (torch.rand(trials, count, pixels, generator=generator) < 0.25)


def make_inputs(sizes, rule_spec, kind, trials, steps, query, seed=0, dtype=torch.float32, device="cpu"):
    """Fresh W, B, one task per trial (``steps`` training and ``query`` query samples) and Θ."""
    rule = Rule.build(rule_spec, len(sizes) - 1)
    learner = Learner(MLP(tuple(sizes)), make_pathway(kind), rule)
    generators = [torch.Generator().manual_seed(seed * 1000 + t) for t in range(trials)]
    g = torch.Generator().manual_seed(seed)
    ways = min(5, sizes[-1])  # 5-way tasks, labels keep their class ids
    classes = torch.stack([torch.randperm(sizes[-1], generator=g)[:ways] for _ in range(trials)])
    pick = lambda n: classes.gather(1, torch.randint(0, ways, (trials, n), generator=g))  # noqa: E731
    theta = torch.tensor([[THETA_VALUES.get(r, 1e-3) for r in rule.terms]]).repeat(trials, 1)
    to = dict(dtype=dtype, device=device)
    state = learner.init_state(generators)
    return dict(
        rule=rule,
        kind=kind,
        learner=learner,
        weights=[w.to(**to) for w in state.weights],
        feedback=[b.to(**to) for b in state.feedback],
        x=sparse_images(trials, steps, sizes[0], g).to(**to),
        y=pick(steps).to(device),
        xq=sparse_images(trials, query, sizes[0], g).to(**to),
        yq=pick(query).to(device),
        theta=theta.to(**to),
    )


#: Passes over a trial's weight-sized arrays per inner step of an ideal fused episode: forward
#: (read W, read B, write W) and meta-gradient backward (read W_t, read B, read and write W's adjoint).
ONE_PASS = 3 + 4


def one_pass_bytes(sizes, trials, steps, element) -> int:
    """Bytes an episode moves if every inner step touches each trial's W, B and W's adjoint once
    (:data:`ONE_PASS` passes): the traffic floor of the fused step that issue 15 aims at."""
    weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return ONE_PASS * weights * element * trials * steps


def _best_seconds(fn, device, repeats):
    fn()  # warm-up
    return fastest(fn, device, repeats)[1]


def machine_peaks(device, dtype=torch.float32, copy_mib=256, gemm=None, repeats=5) -> dict:
    """This machine's memory bandwidth (a STREAM-like copy of ``copy_mib`` MiB: read + write) and
    matrix-product throughput (a ``gemm``³ product: 2 n³ FLOPs; default 1024 on a CPU, 4096 on a
    GPU, where a smaller one measures the launch), best of ``repeats``, with the current thread count."""
    gemm = gemm or (4096 if str(device).startswith("cuda") else 1024)
    element = torch.empty((), dtype=dtype).element_size()
    source = torch.rand(copy_mib * 2**20 // element, dtype=dtype, device=device)
    target = torch.empty_like(source)
    copy_s = _best_seconds(lambda: target.copy_(source), device, repeats)
    a = torch.rand(gemm, gemm, dtype=dtype, device=device)
    gemm_s = _best_seconds(lambda: a @ a, device, repeats)
    return dict(
        peak_gb_s=2 * source.numel() * element / copy_s / 1e9, peak_gflop_s=2 * gemm**3 / gemm_s / 1e9
    )


def episode_flops(inputs, recompute_segment) -> int:
    """Matrix-product FLOPs of one metaplast episode (all trials), counted in an untimed run."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_metaplast(inputs, recompute_segment)
    return counter.get_total_flops()


def run_metaplast(inputs, recompute_segment=0, compile=False):
    """Adapted weights and meta-gradient dΣ_trials L_query/dΘ of all trials at once."""
    theta = inputs["theta"].clone().requires_grad_()
    learner = inputs["learner"]
    state = State(inputs["weights"], inputs["feedback"])
    adapted = inner_loop(
        learner,
        state,
        {"theta": theta},
        inputs["x"],
        inputs["y"],
        "fused",
        recompute_segment=recompute_segment,
        compile=compile,
    )
    (grad,) = torch.autograd.grad(learner.query_loss(adapted, inputs["xq"], inputs["yq"]).sum(), theta)
    return [w.detach() for w in adapted.weights], grad


def run_baseline(inputs, trial):
    """The same episode of one trial in the original formulation (:mod:`metaplast.reference`)."""
    rule = inputs["rule"]
    theta = inputs["theta"][trial].clone().requires_grad_()
    coefficients = reference.layer_coefficients(theta, rule.terms, rule.layer_terms)
    loss, adapted = reference.episode(
        [w[trial] for w in inputs["weights"]],
        [b[trial] for b in inputs["feedback"]],
        inputs["kind"],
        coefficients,
        inputs["x"][trial],
        inputs["y"][trial],
        inputs["xq"][trial],
        inputs["yq"][trial],
        BETA,
    )
    (grad,) = torch.autograd.grad(loss, theta)
    return [w.detach() for w in adapted], grad


def timed(fn, device):
    """``(result, wall seconds, process CPU seconds)`` of ``fn()``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def fastest(fn, device, repeats):
    """``(result of the last call, least wall seconds, least CPU seconds)`` of ``repeats`` timed
    calls of ``fn``."""
    runs = [timed(fn, device) for _ in range(repeats)]
    return runs[-1][0], min(wall for _, wall, _ in runs), min(cpu for _, _, cpu in runs)


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


def time_baseline(inputs, trials, device, repeats=1):
    """The baseline on the first ``trials`` trials, one after the other, after an untimed warm-up
    episode as metaplast gets (a process's first baseline episode runs 1.4-2.2x slower: the
    allocator's first pass over its hundreds of W-sized tensors); the fastest of ``repeats``
    passes: results and seconds per trial."""
    run_baseline(inputs, 0)
    results, wall, cpu = fastest(lambda: [run_baseline(inputs, t) for t in range(trials)], device, repeats)
    return dict(results=results, s_per_trial=wall / trials, cpu_s_per_trial=cpu / trials)


def compare(inputs, recompute_segment, baseline, device, compile=False, repeats=1):
    """Time metaplast on all trials (after a warm-up run, which compiles with ``compile``; the
    fastest of ``repeats`` episodes) and compare it with ``baseline``."""
    episode = lambda: run_metaplast(inputs, recompute_segment, compile)  # noqa: E731
    _, warm_up, _ = timed(episode, device)
    (adapted, grad), wall, cpu = fastest(episode, device, repeats)
    trials = inputs["theta"].shape[0]
    w_err = g_err = 0.0
    for t, (b_adapted, b_grad) in enumerate(baseline["results"]):
        w_err = max([relative_error(a[t], b) for a, b in zip(adapted, b_adapted)] + [w_err])
        g_err = max(relative_error(grad[t], b_grad), g_err)
    return dict(
        s_per_trial=wall / trials,
        cpu_s_per_trial=cpu / trials,
        baseline_s_per_trial=baseline["s_per_trial"],
        baseline_cpu_s_per_trial=baseline["cpu_s_per_trial"],
        seconds=wall,
        speedup=baseline["s_per_trial"] / (wall / trials),
        cpu_speedup=baseline["cpu_s_per_trial"] / (cpu / trials),
        baseline_trials_timed=len(baseline["results"]),
        warm_up_s=warm_up,
        weights_rel_err=w_err,
        grad_rel_err=g_err,
    )


def probe(config: dict) -> dict:
    """Run one episode of ``config`` in this (fresh) process; report its peak memory in MiB."""
    torch.set_num_threads(config["threads"])
    device = config["device"]
    inputs = make_inputs(**{k: config[k] for k in ("sizes", "trials", "steps", "query")}, **_common(config))
    before = current_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    if config["which"] == "baseline":
        run_baseline(inputs, 0)
    else:
        run_metaplast(inputs, config["recompute_segment"], config.get("compile", False))
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = max(peak_rss_mib(), current_rss_mib())
    return dict(peak_mib=peak, before_mib=before)


def _status_mib(key: str) -> float:
    """A ``/proc/self/status`` entry in MiB (Linux); elsewhere ``ru_maxrss``, the peak so far."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def current_rss_mib() -> float:
    """Resident set size now (``VmRSS``)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size of this process image (``VmHWM``; unlike ``ru_maxrss`` it does not
    carry over the parent's size across fork and exec)."""
    return _status_mib("VmHWM")


def _common(config):
    dtype = getattr(torch, config["dtype"])
    return dict(rule_spec=config["rule"], kind=config["feedback"], dtype=dtype, device=config["device"])


def peak_memory(config: dict) -> dict:
    """:func:`probe` in a fresh interpreter (so the peak RSS is this configuration's alone)."""
    out = subprocess.run(
        [sys.executable, "-m", "metaplast.bench", "--probe", json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_rates(row: dict, inputs, segment, peaks: dict) -> None:
    """The row's achieved GFLOP/s and one-pass GB/s, and their fractions of the machine's peaks."""
    element = inputs["theta"].element_size()
    steps = inputs["x"].shape[1]
    row["gflop_s"] = episode_flops(inputs, segment) / row["seconds"] / 1e9
    row["gb_s"] = one_pass_bytes(row["sizes"], row["trials"], steps, element) / row["seconds"] / 1e9
    row["flop_fraction"] = row["gflop_s"] / peaks["peak_gflop_s"]
    row["bandwidth_fraction"] = row["gb_s"] / peaks["peak_gb_s"]


def benchmark(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    peaks = None
    if not args.memory_only:
        peaks = machine_peaks(args.device, getattr(torch, args.dtype))
        print(
            f"machine peaks ({args.threads} thread(s), {args.dtype}): copy {peaks['peak_gb_s']:.1f} GB/s, "
            f"GEMM {peaks['peak_gflop_s']:.1f} GFLOP/s",
            flush=True,
        )
        print(HEADER, flush=True)
    for rule in args.rule:
        for trials in args.trials:
            base = dict(
                sizes=args.sizes,
                rule=rule,
                feedback=args.feedback,
                steps=args.steps,
                query=args.query,
                dtype=args.dtype,
                device=args.device,
                threads=args.threads,
            )
            inputs = make_inputs(
                args.sizes, trials=trials, steps=args.steps, query=args.query, **_common(base)
            )
            baseline_memory = (
                None if args.no_memory else peak_memory({**base, "trials": 1, "which": "baseline"})
            )
            if not args.memory_only:
                baseline = time_baseline(inputs, min(args.baseline_trials, trials), args.device, args.repeats)
            for segment, compile in itertools.product(args.recompute, map(bool, args.compile)):
                row = dict(base, trials=trials, recompute_segment=segment, compile=compile)
                if args.memory_only:
                    row.update(s_per_trial=nan, baseline_s_per_trial=nan, speedup=nan, cpu_speedup=nan)
                    row.update(weights_rel_err=0.0, grad_rel_err=0.0)
                else:
                    row.update(compare(inputs, segment, baseline, args.device, compile, args.repeats))
                    add_rates(row, inputs, segment, peaks)
                    row.update(peaks)
                if not args.no_memory:
                    metaplast = {"which": "metaplast", "recompute_segment": segment, "compile": compile}
                    memory = peak_memory({**base, "trials": trials, **metaplast})
                    row.update(
                        peak_mib=memory["peak_mib"],
                        episode_mib=memory["peak_mib"] - memory["before_mib"],
                        baseline_peak_mib=baseline_memory["peak_mib"],
                        baseline_episode_mib=baseline_memory["peak_mib"] - baseline_memory["before_mib"],
                    )
                if not max(row["weights_rel_err"], row["grad_rel_err"]) <= args.tolerance:  # NaN fails too
                    raise SystemExit(f"metaplast and the baseline disagree: {row}")
                rows.append(row)
                print(format_row(row), flush=True)
                if args.profile:
                    print(profile_table(inputs, segment, args.profile, compile), flush=True)
    return rows


def profile_table(inputs, recompute_segment, rows, compile=False):
    """torch.profiler's table of one metaplast episode: the ``rows`` operators with most own time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_metaplast(inputs, recompute_segment, compile)
    averages = prof.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=24)


HEADER = (
    f"{'rule':<6}{'trials':>7}{'recomp':>7}{'comp':>5}{'s/trial':>9}{'base s/trial':>13}{'ratio':>7}"
    f"{'cpu ratio':>10}{'peak MiB':>10}{'episode MiB':>12}{'base peak':>10}{'max rel err':>12}"
    f"{'GFLOP/s':>9}{'%GEMM':>7}{'GB/s 1-pass':>12}{'%copy':>7}"
)


def format_row(row: dict) -> str:
    memory = (
        f"{row['peak_mib']:>10.0f}{row['episode_mib']:>12.0f}{row['baseline_peak_mib']:>10.0f}"
        if "peak_mib" in row
        else f"{'-':>10}{'-':>12}{'-':>10}"
    )
    return (
        f"{row['rule']:<6}{row['trials']:>7}{row['recompute_segment']:>7}"
        f"{'yes' if row.get('compile') else 'no':>5}{row['s_per_trial']:>9.3f}"
        f"{row['baseline_s_per_trial']:>13.3f}{row['speedup']:>7.1f}{row['cpu_speedup']:>10.1f}"
        f"{memory}{max(row['weights_rel_err'], row['grad_rel_err']):>12.1e}"
        f"{row.get('gflop_s', nan):>9.2f}{100 * row.get('flop_fraction', nan):>7.1f}"
        f"{row.get('gb_s', nan):>12.2f}{100 * row.get('bandwidth_fraction', nan):>7.1f}"
    )


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``metaplast: error: ...``, with exit code 2."""

    def error(self, message):
        print(f"metaplast: error: {message} (see python -m metaplast.bench --help)", file=sys.stderr)
        raise SystemExit(2)


def _device_problem(device: str) -> str | None:
    """Why ``--device`` cannot be used here, or None."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device; allowed: cpu, cuda, cuda:<index>"
    if parsed.type == "cpu":
        return None
    if parsed.type != "cuda":
        return f"--device {device!r} is not allowed; allowed: cpu, cuda, cuda:<index>"
    if not torch.cuda.is_available():
        return f"--device {device!r} needs CUDA, which this machine does not have; allowed: cpu"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"--device {device!r}: this machine has {torch.cuda.device_count()} GPU(s); allowed: cuda:0.."
    return None


def check_args(args) -> str | None:
    """Every value of the command line in range, the output writable, each episode within memory;
    returns what is wrong (one line naming the value and what is allowed), or None."""
    from metaplast.core.rules import resolve_rule
    from metaplast.run.memory import TooLarge, check_fits, episode_estimate

    limit = 2**31 - 1
    if len(args.sizes) < 2 or any(not 1 <= n <= limit for n in args.sizes):
        return f"--sizes {' '.join(map(str, args.sizes))} is not allowed; allowed: two or more widths >= 1"
    for name, values, low in (("--trials", args.trials, 1), ("--recompute", args.recompute, 0)):
        bad = [v for v in values if not low <= v <= limit]
        if bad:
            return f"{name} {bad[0]} is not allowed; allowed: integers >= {low}"
    at_least = {"steps": 1, "query": 1, "baseline_trials": 1, "repeats": 1, "threads": 1, "profile": 0}
    for name, low in at_least.items():
        value = getattr(args, name)
        if not low <= value <= limit:
            return f"--{name.replace('_', '-')} {value} is not allowed; allowed: an integer >= {low}"
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        return f"--tolerance {args.tolerance} is not allowed; allowed: a finite number >= 0"
    for rule in args.rule:
        try:
            resolve_rule(rule)
        except ValueError as error:
            return f"--rule {rule!r}: {error}"
    problem = _device_problem(args.device)
    if problem:
        return problem
    if args.json and args.json != "-":
        path = Path(args.json)
        if path.is_dir():
            return f"--json {args.json!r} is a directory; allowed: a file path ('-': stdout)"
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            return (
                f"--json {args.json!r}: {str(parent)!r} is not a writable directory; allowed: a writable path"
            )
    element = 8 if args.dtype == "float64" else 4
    for trials in args.trials:
        for segment in args.recompute:
            estimate = episode_estimate(args.sizes, trials, args.steps, args.query, "fused", segment, element)
            try:
                check_fits(
                    estimate, args.device, "a benchmark episode", "fewer --trials, smaller --sizes/--steps"
                )
            except TooLarge as error:
                return str(error)
    return None


def parse_args(argv=None):
    parser = _Parser(prog="python -m metaplast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=PAPER_SIZES, help="layer widths")
    parser.add_argument("--rule", nargs="+", default=["f0", "bio", "pool"], help="named rules")
    parser.add_argument("--feedback", choices=FEEDBACK_KINDS, default="fa")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--steps", type=int, default=250, help="inner steps (M·K)")
    parser.add_argument("--query", type=int, default=50, help="query samples (M·Q)")
    parser.add_argument(
        "--recompute",
        type=int,
        nargs="+",
        default=[0, RECOMPUTE_SEGMENT],
        help=f"inner steps per recomputation segment (0: none; {RECOMPUTE_SEGMENT}: the default of training)",
    )
    parser.add_argument(
        "--compile",
        type=int,
        nargs="+",
        choices=[0, 1],
        default=[0],
        help="1: the step under torch.compile (trainer.compile); '0 1' times both",
    )
    parser.add_argument("--baseline-trials", type=int, default=1, help="baseline trials timed (one by one)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed episodes per row, both sides: the fastest counts"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max relative error vs the baseline")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print a profile per row")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    if not args.probe:
        problem = check_args(args)
        if problem:
            parser.error(problem)
    return args


def main(argv=None):
    """The ``metaplast-bench`` command: a failure is one line with exit code 2 (``--verbose`` or
    ``HYDRA_FULL_ERROR=1``: the traceback)."""
    from metaplast.run.cli import describe

    args = parse_args(argv)
    try:
        return _main(args)
    except Exception as error:
        if args.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"metaplast: error: {describe(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(args):
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    print(
        f"metaplast.bench: sizes {'-'.join(map(str, args.sizes))}, {args.steps} inner steps, "
        f"feedback={args.feedback}, {args.dtype}, {args.device}, {args.threads} thread(s); "
        f"seconds per episode per trial (forward + meta-gradient); ratio = baseline / metaplast; "
        f"GFLOP/s and one-pass GB/s (every step touching W, B and W's adjoint once) against this "
        f"machine's GEMM and copy, measured below"
    )
    if args.memory_only:
        print(HEADER, flush=True)
    rows = benchmark(args)
    if args.json:
        text = json.dumps(rows, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")


if __name__ == "__main__":
    main()
