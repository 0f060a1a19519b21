"""Figures of the issue-12 sine runs: Fig. 2B (forgetting per block), Fig. 2C (update-gradient cosine
over the stream), meta-training curves. python outputs/flp/plot.py OUTDIR"""

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

root, out = Path("outputs/flp"), Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)  # noqa: E501
RUNS = {
    "flp3p": ("FLP (3), α ≥ 0", "C0"),
    "flp3": ("FLP (3), α free", "C9"),
    "grad3": ("gradient-based (3)", "C3"),
    "fa3": ("FA + F⁰ (3)", "C2"),
    "flp1p": ("feature reuse (1)", "C7"),
}


def load(name):
    p = root / name / "meta_test.json"
    return json.loads(p.read_text()) if p.exists() else None


fig, ax = plt.subplots(figsize=(5, 3.5))
for key, (label, color) in RUNS.items():
    r = load(f"{key}_continual")
    if r and "forgetting" in r:
        blocks = np.array(r["forgetting"]["per_block"], dtype=float)
        ax.plot(np.arange(1, len(blocks) + 1)[1:], blocks[1:], "o-", label=label, color=color)
ax.set_yscale("log")
ax.set_xlabel("functions encountered")
ax.set_ylabel("mean sq. change of outputs\non earlier functions")
ax.set_title("Fig. 2B analogue: forgetting (continual, meta-test)")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "forgetting.png", dpi=110)

fig, axes = plt.subplots(2, 3, figsize=(11, 5), sharex="row", sharey=True)
for row, order in enumerate(("continual", "iid")):
    for col, layer in enumerate((2, 3, 4)):
        ax = axes[row, col]
        for key in ("flp3p", "grad3", "fa3"):
            r = load(f"{key}_{order}")
            if r:
                cos = np.array(r["update_cos"]["per_step"][layer], dtype=float)
                ax.plot(cos, lw=0.8, label=RUNS[key][0], color=RUNS[key][1])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{order}, W_{layer},{layer + 1}", fontsize=9)  # noqa: E501
        if col == 0:
            ax.set_ylabel("cos(ΔW, −∇L)")
        if row == 1:
            ax.set_xlabel("step (batch of 32)")
axes[0, 0].legend(fontsize=7)
fig.suptitle(
    "Fig. 2C analogue: update-gradient cosine over the stream (meta-test, mean of episodes and networks)"
)
fig.tight_layout()
fig.savefig(out / "update_gradient_cosine.png", dpi=110)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
for ax, order in zip(axes, ("iid", "continual")):
    for key, (label, color) in RUNS.items():
        p = root / f"{key}_{order}" / "metrics.csv"
        if not p.exists():
            continue
        rows = list(csv.DictReader(open(p)))
        eps = sorted({int(r["episode"]) for r in rows})
        if len(eps) < 20:  # a run still starting
            continue
        loss = np.array([[float(r["meta_loss"]) for r in rows if int(r["episode"]) == e] for e in eps])
        med = np.nanmedian(loss, 1)
        k = 10
        smooth = np.convolve(np.nan_to_num(med, nan=np.nanmedian(med)), np.ones(k) / k, mode="valid")
        ax.plot(eps[k - 1 :], smooth, label=label, color=color)
    ax.axhline(4.3, color="k", lw=0.6, ls="--", label="predicting 0")
    ax.set_yscale("log")
    ax.set_title(f"meta-training, {order}: median over networks, 10-episode mean", fontsize=9)
    ax.set_xlabel("episode")
axes[0].set_ylabel("query MSE")
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "meta_training.png", dpi=110)
print("written", sorted(p.name for p in out.iterdir()))
