"""``python -m metaplast.report RUN_DIR [RUN_DIR ...] --out DIR``: the papers' figures and tables.

A run directory is a meta-training run (``metrics.csv``, ``.hydra/``, ``checkpoints/``) or an online
evaluation (``online.csv``, ``theta.json``); a directory that holds run directories (a Hydra multirun)
stands for all of them. Curves are the mean over trials with a shaded 98 % bootstrap CI from 500
resamples (:mod:`metaplast.analysis.stats`), smoothed by a moving average; everything lands in ``DIR`` with an
``index.html`` that shows it all.
"""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from metaplast.analysis.rundir import (  # noqa: E402
    SOURCES,
    FinalTheta,
    RunDir,
    RunError,
    expand,
    theta_columns,
    theta_layer_columns,
)
from metaplast.analysis.stats import bootstrap_ci, mann_whitney_per_episode, summarise  # noqa: E402
from metaplast.core.terms import TERM_FORMULAS  # noqa: E402
from metaplast.safety import save_figure, write_text  # noqa: E402

#: Table 1 of the paper (3 layers; α_0, α_1, α_2 in degrees), keyed by which layers use eHebb.
TABLE1_PAPER = {
    (False, False, False): (89.89, 76.69, 82.04),
    (False, True, False): (89.95, 59.95, 72.14),
    (False, False, True): (90.03, 75.18, 29.02),
    (True, True, False): (75.29, 61.23, 72.56),
    (False, True, True): (90.2, 49.4, 27.9),
    (True, False, True): (84.86, 74.25, 30.33),
    (True, True, True): (77.93, 49.93, 28.4),
}


class ReportError(ValueError):
    """A run directory or option the report cannot use; the message names it."""


def load_runs(paths) -> list[RunDir]:
    """The run directories of ``paths`` (:func:`metaplast.analysis.rundir.expand`), each with rows."""
    try:
        runs = expand(paths)
    except RunError as error:
        raise ReportError(str(error)) from None
    for run in runs:
        if run.table.empty:
            raise ReportError(f"{str(run.path)!r}: its {run.kind} table has no rows yet")
    return runs


def _unique_labels(runs: list[RunDir]) -> None:
    counts = pd.Series([r.label for r in runs]).value_counts()
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"


def _dataset_note(runs: list[RunDir]) -> str:
    """The datasets of the runs for titles; glyphs are marked SYNTHETIC, IDX sets by their directory."""
    names = set()
    for run in runs:
        dataset = run.config.get("dataset", {})
        name = str(dataset.get("name", "?"))
        if name == "idx" and dataset.get("root"):
            name = f"idx: {Path(dataset['root']).name}"
        names.add("glyphs (SYNTHETIC)" if name == "glyphs" else name)
    return ", ".join(sorted(names))


# ---------------------------------------------------------------- text: the discovered rule


def rule_equation(theta: dict[int, float], keep: float = 0.1) -> str:
    """The rule as an equation (Eq. 7 style): the terms with |θ_r| >= ``keep`` × max |θ|.

    ``{0: 0.0098, 2: -0.0236}`` gives ``ΔW_{l-1,l} = 9.80e-03 (-e_l y_{l-1}^T) - 2.36e-02 (-e_l e_{l-1}^T)``.
    """
    if not theta:
        raise ReportError("rule_equation needs at least one θ_r")
    largest = max(abs(v) for v in theta.values())
    kept = [(r, v) for r, v in sorted(theta.items()) if largest > 0 and abs(v) >= keep * largest]
    if not kept:
        return "ΔW_{l-1,l} = 0"
    text = "ΔW_{l-1,l} ="
    for i, (r, v) in enumerate(kept):
        sign = "-" if v < 0 else ("" if i == 0 else "+")
        text += (
            f" {sign} {abs(v):.2e} ({TERM_FORMULAS[r]})" if sign else f" {abs(v):.2e} ({TERM_FORMULAS[r]})"
        )
    return text


def final_theta(run: RunDir) -> FinalTheta:
    """Θ of every trial after the last Adam step: ``result.json``'s once the run finished, else the
    last checkpoint's, else the last episode's rows of ``metrics.csv`` (:data:`SOURCES`)."""
    try:
        return run.final(SOURCES)
    except RunError as error:
        raise ReportError(str(error)) from None


def final_rules(run: RunDir, keep: float) -> list[str]:
    """The discovered rule as equations (:func:`rule_equation`) of the final Θ's trial mean; one per
    layer (``W<ℓ>: ...``) when Θ is per layer (``mean over layers: ...`` where only that is known)."""
    final = final_theta(run)
    mean = final.mean()
    if not final.per_layer:
        prefix = "" if final.share == "all" else "mean over layers: "
        return [prefix + rule_equation(dict(zip(final.terms, mean.tolist())), keep)]
    return [
        f"W{l}: {rule_equation(dict(zip(final.terms, row.tolist())), keep)}" for l, row in enumerate(mean)
    ]


# ---------------------------------------------------------------- figures


def _band(ax, table: pd.DataFrame, x: str, label: str, color=None) -> None:
    ax.plot(table[x], table["mean"], label=label, color=color)
    ax.fill_between(table[x], table["low"], table["high"], alpha=0.25, color=ax.lines[-1].get_color())


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    save_figure(fig, out / name, dpi=110)
    plt.close(fig)
    return name


def curves_figure(runs, column, ylabel, out, name, by="episode", window=1, title="") -> str:
    """One panel, every run overlaid: mean over trials and 98 % bootstrap CI (moving average)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs:
        _band(ax, summarise(run.table, column, by=by, window=window), by, run.label)
    ax.set(xlabel="episode" if by == "episode" else "training samples", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def _indexed_columns(table: pd.DataFrame, prefix: str) -> list[tuple[str, str]]:
    """``(index, column)`` of the columns ``prefix<i>`` of a table, by i; for ``theta_`` the Θ
    columns: ``theta_<r>`` (index ``r``), or per layer ``theta_layer<ℓ>_<r>`` (index ``r,W<ℓ>``)."""
    if prefix == "theta_":
        shared = [(str(r), c) for r, c in theta_columns(table).items()]
        return shared or [(f"{r},W{l}", c) for (l, r), c in theta_layer_columns(table).items()]
    found = [(m.group(1), c) for c in table.columns if (m := re.match(rf"^{prefix}(\d+)$", c))]
    return sorted(found, key=lambda item: int(item[0]))


def per_column_figure(run, prefix, ylabel, out, name, by="episode", window=1, symbol="") -> str:
    """One curve per column ``prefix<i>`` of one run (θ_r, α_ℓ or E_W,ℓ), mean and CI over trials."""
    columns = _indexed_columns(run.table, prefix)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    palette = sns.color_palette("tab10" if prefix == "theta_" else "viridis", len(columns))
    for (index, column), color in zip(columns, palette):
        _band(ax, summarise(run.table, column, by=by, window=window), by, f"{symbol}{index}", color)
    ax.set(xlabel=by if by == "episode" else "training samples", ylabel=ylabel, title=run.label)
    if prefix == "orth_":
        ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out, name)


def mann_whitney_figure(runs, out, name, column="meta_acc") -> tuple[str, pd.DataFrame]:
    """Supp. Fig. S7: p-value per episode that each run's trials beat the first run's (one-sided)."""
    base, frames = runs[0], []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs[1:]:
        table = mann_whitney_per_episode(run.table, base.table, column, "greater")
        table.insert(0, "run", run.label)
        table.insert(1, "baseline", base.label)
        frames.append(table)
        ax.plot(table["episode"], table["p"], label=f"{run.label} > {base.label}")
    ax.axhline(0.05, color="grey", linestyle="--", linewidth=1, label="p = 0.05")
    ax.set(xlabel="episode", ylabel="one-sided Mann–Whitney U p-value", yscale="log", title=column)
    ax.legend(fontsize=8)
    return _save(fig, out, name), pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- tables


def summary_table(runs: list[RunDir], last: int) -> pd.DataFrame:
    """Per meta run: meta-accuracy and loss over the last ``last`` episodes per trial; CI over trials."""
    rows = []
    for run in runs:
        table = run.table
        tail = table[table["episode"] > table["episode"].max() - last]
        per_trial = tail.groupby("trial")[["meta_acc", "meta_loss"]].mean().dropna()  # diverged: NaN
        row = {"run": run.label, "dir": str(run.path), "episodes": int(table["episode"].max()) + 1}
        row["trials"] = len(per_trial)
        if "meta_diverged" in table:
            row["trials diverged"] = int(table.groupby("trial")["meta_diverged"].max().sum())
        for column in ("meta_acc", "meta_loss"):
            low, high = bootstrap_ci(per_trial[column].to_numpy())
            row.update({column: per_trial[column].mean(), f"{column}_low": low, f"{column}_high": high})
        row.update({f"α_{l}": tail[c].mean() for l, c in _indexed_columns(table, "angle_")})
        rows.append(row)
    return pd.DataFrame(rows)


def _source(final: FinalTheta) -> str:
    """Where a final Θ was read, for tables: ``result.json``, ``last.ckpt`` or ``metrics.csv``."""
    name = {"result": "result.json", "checkpoint": "last.ckpt", "csv": "metrics.csv"}[final.source]
    return name if final.per_layer or final.share == "all" else f"{name} (mean over layers)"


def theta_table(runs: list[RunDir]) -> pd.DataFrame:
    """Table S1 style: final θ_r per run (after the last Adam step, :func:`final_theta`; ``source``
    says where it was read), mean over trials and 98 % bootstrap CI; per-layer Θ: one row per layer."""
    rows = []
    for run in runs:
        final = final_theta(run)
        values = final.values if final.per_layer else final.values[:, None, :]
        means = final.mean().reshape(values.shape[1:])  # as result.json's theta_mean, bit for bit
        for layer in range(values.shape[1]):
            for index, term in enumerate(final.terms):
                low, high = bootstrap_ci(values[:, layer, index])
                row = {"run": run.label, "term": term, "mean": means[layer, index], "low": low, "high": high}
                if final.per_layer:
                    row["layer"] = layer
                rows.append({**row, "source": _source(final)})
    columns = ["run", "term", "mean", "low", "high", "source"]
    if any("layer" in row for row in rows):
        columns.insert(1, "layer")
    return pd.DataFrame(rows, columns=columns)


def online_table(runs: list[RunDir]) -> pd.DataFrame:
    """Per online run: test accuracy (mean [98 % CI] over trials) at fixed stream points and the end."""
    ends = {int(run.table["sample"].max()) for run in runs}
    marks = sorted({0, 500, 1000, 2000, 5000, *ends} & {int(s) for r in runs for s in r.table["sample"]})
    rows = []
    for run in runs:
        row = {"run": run.label, "dir": str(run.path), "trials": run.table["trial"].nunique()}
        for mark in marks:
            values = run.table.loc[run.table["sample"] == mark, "acc"].to_numpy()
            if values.size:
                low, high = bootstrap_ci(values)
                row[f"acc@{mark}"] = f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"
            else:
                row[f"acc@{mark}"] = ""
        rows.append(row)
    return pd.DataFrame(rows)


def table1(runs: list[RunDir], burn_in: int) -> pd.DataFrame:
    """Table 1: α_0, α_1, α_2 after ``burn_in`` episodes, mean over episodes and trials, with the paper's."""
    rows = []
    for run in runs:
        uses = tuple(2 in terms for terms in run.rule.layer_terms)
        later = run.table[run.table["episode"] >= burn_in]
        if later.empty:
            raise ReportError(
                f"{str(run.path)!r} has {run.table['episode'].max() + 1} episodes, none after the burn-in "
                f"of {burn_in}; pass a smaller --burn-in"
            )
        names = ["W0,1", "W1,2", "W2,3"]
        row = {
            "eHebb in": "+".join(n for n, u in zip(names, uses) if u) or "none",
            "trials": later["trial"].nunique(),
        }
        for l in range(3):
            row[f"α_{l}"] = later[f"angle_{l}"].mean()
        for l, value in enumerate(TABLE1_PAPER.get(uses, (np.nan,) * 3)):
            row[f"paper α_{l}"] = value
        row["meta_acc"] = later["meta_acc"].mean()
        rows.append(row)
    order = list(TABLE1_PAPER)
    return pd.DataFrame(rows).iloc[
        np.argsort([order.index(tuple(2 in t for t in r.rule.layer_terms)) for r in runs], kind="stable")
    ]


def _is_table1(run: RunDir) -> bool:
    return (
        run.kind == "meta"
        and run.rule is not None
        and len(run.rule.layer_terms) == 3
        and all(tuple(t) in ((0,), (0, 2)) for t in run.rule.layer_terms)
        and bool((run.config.get("rule") or {}).get("per_layer"))
    )


def _write_table(table: pd.DataFrame, out: Path, stem: str, floatfmt=".4g") -> tuple[str, str]:
    write_text(out / f"{stem}.csv", table.to_csv(index=False))
    write_text(out / f"{stem}.md", table.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    return f"{stem}.csv", f"{stem}.md"


# ---------------------------------------------------------------- the report


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def write_report(
    runs: list[RunDir], out: Path, window: int = 5, burn_in: int = 100, last: int = 10, keep: float = 0.1
):
    """Every figure and table for ``runs`` under ``out``, and ``index.html``; returns the written names."""
    out.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="paper")
    _unique_labels(runs)
    meta = [r for r in runs if r.kind == "meta"]
    online = [r for r in runs if r.kind == "online"]
    data = _dataset_note(runs)
    sections: list[tuple[str, list]] = []  # (title, [("img"|"table"|"text", payload)])

    if meta:
        items = [
            (
                "img",
                curves_figure(
                    meta, "meta_acc", "meta-accuracy", out, "meta_acc.png", window=window, title=data
                ),
            ),
            (
                "img",
                curves_figure(
                    meta, "meta_loss", "meta-loss", out, "meta_loss.png", window=window, title=data
                ),
            ),
        ]
        csv_name, md_name = _write_table(summary_table(meta, last), out, "summary")
        items.append(
            ("table", (f"Last {last} episodes per trial, 98 % bootstrap CI over trials", csv_name, md_name))
        )
        sections.append(("Meta-training", items))
        rules = []
        for run in meta:
            slug = _slug(run.label)
            run_items = [
                (
                    "img",
                    per_column_figure(
                        run, "theta_", "θ_r", out, f"theta_{slug}.png", window=window, symbol="θ_"
                    ),
                ),
                (
                    "img",
                    per_column_figure(
                        run, "angle_", "α_ℓ (degrees)", out, f"angle_{slug}.png", window=window, symbol="α_"
                    ),
                ),
                (
                    "img",
                    per_column_figure(
                        run, "orth_", "E_W,ℓ", out, f"orth_{slug}.png", window=window, symbol="E_"
                    ),
                ),
            ]
            for equation in final_rules(run, keep):
                rules.append(f"{run.label}: {equation}")
                run_items.append(
                    (
                        "text",
                        f"Discovered rule (final Θ, trial mean; |θ_r| ≥ {keep} max|θ|): {equation}",
                    )
                )
            sections.append((run.label, run_items))
        write_text(out / "rules.txt", "\n".join(rules) + "\n")
        csv_name, md_name = _write_table(theta_table(meta), out, "theta_final")
        sections.append(
            (
                "Final Θ (Table S1 style)",
                [("table", ("mean over trials, 98 % bootstrap CI", csv_name, md_name))],
            )
        )
        if len(meta) >= 2:
            name, p_values = mann_whitney_figure(meta, out, "mann_whitney.png")
            write_text(out / "mann_whitney.csv", p_values.to_csv(index=False))
            sections.append(("Mann–Whitney U (Supp. Fig. S7)", [("img", name)]))
        table1_runs = [r for r in meta if _is_table1(r)]
        if table1_runs:
            csv_name, md_name = _write_table(table1(table1_runs, burn_in), out, "table1", ".2f")
            sections.append(
                (
                    "Table 1",
                    [("table", (f"α_ℓ averaged after a burn-in of {burn_in} episodes", csv_name, md_name))],
                )
            )
    if online:
        items = [
            (
                "img",
                curves_figure(
                    online, "acc", "test accuracy", out, "online_acc.png", by="sample", window=1, title=data
                ),
            )
        ]
        csv_name, md_name = _write_table(online_table(online), out, "online")
        items.append(("table", ("test accuracy, mean [98 % CI] over trials", csv_name, md_name)))
        for run in online:
            items.append(
                (
                    "img",
                    per_column_figure(
                        run,
                        "angle_",
                        "α_ℓ (degrees)",
                        out,
                        f"online_angle_{_slug(run.label)}.png",
                        by="sample",
                        symbol="α_",
                    ),
                )
            )
        sections.append(("Online evaluation", items))
    _write_index(out, sections, runs)
    return sorted(p.name for p in out.iterdir())


def _write_index(out: Path, sections, runs) -> None:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>metaplast report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:49%}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
        "</head><body><h1>metaplast report</h1><ul>",
    ]
    parts += [f"<li>{html.escape(r.label)}: <code>{html.escape(str(r.path))}</code></li>" for r in runs]
    parts.append("</ul>")
    for title, items in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for kind, payload in items:
            if kind == "img":
                parts.append(f"<img src='{payload}' alt='{payload}'>")
            elif kind == "text":
                parts.append(f"<p><code>{html.escape(payload)}</code></p>")
            else:
                caption, csv_name, md_name = payload
                table = pd.read_csv(out / csv_name)
                links = f"(<a href='{csv_name}'>CSV</a>, <a href='{md_name}'>Markdown</a>)"
                parts.append(f"<p>{html.escape(caption)} {links}</p>")
                parts.append(table.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    parts.append("</body></html>")
    write_text(out / "index.html", "\n".join(parts))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metaplast.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or multirun directories holding them)")
    parser.add_argument("--out", required=True, help="output directory for figures, tables and index.html")
    parser.add_argument("--window", type=int, default=5, help="moving-average window in episodes (default 5)")
    parser.add_argument(
        "--burn-in", type=int, default=100, help="Table 1: episodes dropped before averaging α"
    )
    parser.add_argument(
        "--last", type=int, default=10, help="summary: episodes averaged at the end (default 10)"
    )
    parser.add_argument("--keep", type=float, default=0.1, help="rule text: keep |θ_r| >= keep × max|θ|")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        for name in ("window", "last"):
            if getattr(args, name) < 1:
                raise ReportError(f"--{name}={getattr(args, name)} is not allowed; allowed: an integer >= 1")
        runs = load_runs(args.runs)
        written = write_report(runs, Path(args.out), args.window, args.burn_in, args.last, args.keep)
    except ReportError as error:
        raise SystemExit(f"metaplast: error: {error}") from None
    print(f"wrote {len(written)} files to {args.out}: open {Path(args.out) / 'index.html'}")
    sweeps = [Path(path) for path in args.runs if (Path(path) / "multirun.yaml").exists()]
    if sweeps:  # Hydra multirun directories: also one table over all their jobs (metaplast.sweep)
        from metaplast.analysis.sweeps import report as sweep_report

        sweep_report(sweeps, Path(args.out) / "sweep")
        print(f"wrote the sweep table and λ plots to {Path(args.out) / 'sweep'}: sweep.md, sweep.csv")


if __name__ == "__main__":
    main()
