"""PNG plots for the per-layer report: output error across depth, activation profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_layer_error", "plot_activation_profiles"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_layer_error(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Output SQNR (dB) of every quantized linear across depth, one line per linear kind."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    kinds = sorted({r["kind"] for r in rows})
    for kind in kinds:
        pts = sorted((r["layer"], r["output SQNR dB"]) for r in rows if r["kind"] == kind and r["layer"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("output SQNR on calibration data (dB, higher is better)")
    ax.set_title(title or "Per-layer output error of the quantized linears")
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_activation_profiles(profiles: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Per-channel input abs-max of a few linears, with the chosen outlier channels marked."""
    plt = _pyplot()
    n = max(len(profiles), 1)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 2.4 * nrows + 0.6), dpi=100, squeeze=False)
    # column-major: with 3 profiled layers, each column is one layer
    flat = [axes[r, c] for c in range(ncols) for r in range(nrows)]
    for ax in flat[len(profiles):]:
        ax.axis("off")
    for ax, (module, prof) in zip(flat, profiles.items()):
        vals = prof["absmax"]
        ax.plot(range(len(vals)), vals, lw=0.7, color="tab:blue")
        out = prof.get("outliers") or []
        if out:
            ax.scatter(out, [vals[i] for i in out], color="tab:red", s=10, zorder=3,
                       label=f"{len(out)} fp16 outlier channels")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_yscale("log")
        ax.set_title(f"input of {module}", fontsize=8)
        ax.set_ylabel("max |x| (log)", fontsize=7)
        ax.set_xlabel("input channel", fontsize=7)
        ax.tick_params(labelsize=7)
    marked = any(p.get("outliers") for p in profiles.values())
    fig.suptitle(title or "Per-channel activation magnitude over the calibration set"
                 + (" (red: fp16 outlier channels)" if marked else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
