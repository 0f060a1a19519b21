"""``metaplast-sweep DIR [DIR ...] --out OUT``: one table and two plots per sweep
(:mod:`metaplast.analysis.sweeps`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from metaplast.analysis.sweeps import markdown, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metaplast.sweep", description=__doc__.split("\n")[0].replace("``", "")
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="Hydra multirun (or run) directories")
    parser.add_argument("--out", type=Path, help="output directory (default: DIR/summary of the first DIR)")
    parser.add_argument(
        "--threshold", type=float, help="|θ| above which a term survives (default: the jobs')"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or args.dirs[0] / "summary"
    table = report(args.dirs, out, args.threshold)
    print(markdown(table))
    print(f"wrote {out}/sweep.csv, sweep.md, trials.csv, lambda_accuracy.png, lambda_surviving.png")


if __name__ == "__main__":
    main()
