"""Plots (PNG, matplotlib without a display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy_vs_bits(rows: list[dict], path: Path, title: str) -> Path:
    """Accuracy per weight/activation bit-width pair (W8A8, W4A8, W4A4, …: most bits first) for each method, with the
    float accuracy as a line."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in rows:
        if row["method"] == "float":
            ax.axhline(row["accuracy"], color="k", linestyle="--", label="float")
    pairs = sorted({(r["weight_bits"], r["act_bits"]) for r in rows if r["method"] != "float"}, reverse=True)
    for method, marker in (("ptq", "s"), ("qat", "o")):
        pts = sorted((pairs.index((r["weight_bits"], r["act_bits"])), r["accuracy"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method.upper())
    ax.set_xticks(range(len(pairs)), [f"W{w}A{a}" for w, a in pairs])
    ax.set_xlabel("bits (weights, activations)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
