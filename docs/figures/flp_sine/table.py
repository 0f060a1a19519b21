"""Markdown tables of the issue-12 runs from their meta_test.json files (mean ± SE over networks)."""

import json
import sys
from pathlib import Path

args = [a for a in sys.argv[1:] if not a.startswith("--")]
root = Path(args[0] if args else "outputs/flp")
CLASSIFY = "--classify" in sys.argv
NAMES = {
    "flp1p": "Feature reuse (1): FLP rule in the readout only, α ≥ 0",
    "flp3p": "FLP (3), α ≥ 0 (rule.nonnegative)",
    "flp3": "FLP (3), α unconstrained",
    "grad3": "Gradient-based (3)",
    "fa3": "metaplast FA + F^0 (3), one θ_0",
    "cls_flp2": "FLP (2), glyphs",
    "cls_grad2": "Gradient-based (2), glyphs",
}


def fmt(s):
    return f"{s['mean']:.3g} ± {s['se']:.2g}" if s else "—"


def load(name):
    path = root / name / "meta_test.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_tail(name, last=10):
    """Mean ± SE over networks of each network's meta-loss over its last 10 meta-training episodes."""
    import csv

    path = root / name / "metrics.csv"
    if not path.exists():
        return "—"
    rows = list(csv.DictReader(open(path)))
    top = max(int(r["episode"]) for r in rows)
    per = {}
    for r in rows:
        if int(r["episode"]) > top - last and r["meta_loss"] not in ("nan", ""):
            per.setdefault(r["trial"], []).append(float(r["meta_loss"]))
    means = [sum(v) / len(v) for v in per.values()]
    m = sum(means) / len(means)
    se = (sum((x - m) ** 2 for x in means) / (len(means) - 1)) ** 0.5 / len(means) ** 0.5
    return f"{m:.3g} ± {se:.2g}"


if not CLASSIFY:
    rows = []
    for key, label in NAMES.items():
        if key.startswith("cls_"):
            continue
        iid, cont = load(f"{key}_iid"), load(f"{key}_continual")
        if not iid and not cont:
            continue
        cells = []
        for r in (iid, cont):
            cells.append(fmt(r["loss"]) if r else "—")  # noqa: E501
        for r in (iid, cont):
            cells.append(fmt(r["readout"]) if r else "—")
        cells.append(fmt(cont["forgetting"]["mean"]) if cont else "—")
        cells += [train_tail(f"{key}_iid"), train_tail(f"{key}_continual")]
        n = len((iid or cont)["loss"]["trials"])
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
    print(
        "| method (plastic layers) | MSE i.i.d. | MSE continual | frozen-features readout MSE, i.i.d. | readout, continual | forgetting (continual) | meta-train loss, last 10 episodes, i.i.d. | same, continual | networks |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| method | order | update-gradient cosine per layer (0 = input layer) | ‖ΔW‖ per step per layer |")
    print("|---|---|---|---|")
    for key, label in NAMES.items():  # noqa: E501
        for order in ("iid", "continual"):
            r = load(f"{key}_{order}")
            if r:
                cos = ", ".join(f"{l['mean']:+.2f}" for l in r["update_cos"]["per_layer"])
                norm = ", ".join(f"{l['mean']:.2g}" for l in r["update_norm"]["per_layer"])
                print(f"| {label} | {order} | {cos} | {norm} |")

else:
    print(
        "| method | error i.i.d. | error continual | frozen-features readout error i.i.d. | readout, continual | forgetting (continual) | networks |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|---|")
    for key, label in NAMES.items():
        if not key.startswith("cls_"):
            continue
        iid, cont = load(f"{key}_iid"), load(f"{key}_continual")
        if not iid and not cont:
            continue
        cells = [fmt(r["error"]) if r else "—" for r in (iid, cont)]
        cells += [fmt(r["readout"]) if r else "—" for r in (iid, cont)]
        cells.append(fmt(cont["forgetting"]["mean"]) if cont else "—")
        n = len((iid or cont)["loss"]["trials"])
        print(f"| {label} | " + " | ".join(cells) + f" | {n} |")
