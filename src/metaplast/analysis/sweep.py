"""``metaplast-sweep DIR [DIR ...] --out OUT``: one table and two plots per sweep
(:mod:`metaplast.analysis.sweeps`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from metaplast.analysis.rundir import RunError
from metaplast.analysis.sweeps import (
    SweepError,
    check_threshold,
    markdown,
    online_grid_markdown,
    online_grid_report,
    online_jobs,
    report,
)

PROG = "metaplast.sweep"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def fail(message: str, code: int = 2):
    """Print ``message`` as one line to stderr and exit with ``code``."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def check_out(out: Path) -> Path:
    """``out`` as an output directory: not an existing file; created with its parents."""
    if str(out).strip() == "":
        raise SweepError("--out is empty; allowed: a directory path")
    if out.exists() and not out.is_dir():
        raise SweepError(
            f"--out {str(out)!r} exists and is not a directory; allowed: a new or existing directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SweepError(f"--out {str(out)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SweepError(f"--out {str(out)!r} is not writable")
    return out


def main(argv=None) -> None:
    parser = _Parser(prog="python -m metaplast.sweep", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("dirs", nargs="+", type=Path, help="Hydra multirun (or run) directories")
    parser.add_argument("--out", type=Path, help="output directory (default: DIR/summary of the first DIR)")
    parser.add_argument(
        "--threshold", type=float, help="|θ| above which a term survives (default: the jobs')"
    )
    parser.add_argument(
        "--last",
        type=int,
        help="final accuracy: episodes averaged per trial (default: the jobs' objective.last)",
    )
    parser.add_argument("--verbose", action="store_true", help="warnings, and a traceback on an error")
    args = parser.parse_args(argv)
    verbose = args.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            check_threshold(args.threshold)
            if args.last is not None and args.last < 1:
                raise SweepError(f"--last={args.last} is not allowed; allowed: an integer >= 1")
            for directory in args.dirs:
                if not directory.is_dir():
                    raise SweepError(f"{str(directory)!r} is not a directory")
            out = check_out(args.out or args.dirs[0] / "summary")
            if online_jobs(args.dirs):  # a grid search of online evaluations (+eval_experiment=oja_grid)
                grid = online_grid_report(args.dirs, out)
                print(online_grid_markdown(grid))
                print(f"wrote {out}/grid.csv, grid.md")
                return
            table = report(args.dirs, out, args.threshold, args.last)
    except (SweepError, RunError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"{error.filename or ''}: {error.strerror or error}".lstrip(": "))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as error:  # the last resort: one line, unless --verbose
        if verbose:
            raise
        fail(f"unexpected {type(error).__name__}: {error} (rerun with --verbose for the traceback)")
    print(markdown(table))
    print(f"wrote {out}/sweep.csv, sweep.md, trials.csv, lambda_accuracy.png, lambda_surviving.png")


if __name__ == "__main__":
    main()
