"""`gemma-mlx bench --plot`: decode speed against context depth as a PNG (matplotlib, the `plot`
extra; imported only here, so the rest of the command line works without it)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


class PlotUnavailable(RuntimeError):
    """matplotlib is missing: the message names the extra that provides it."""


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the non-interactive Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'gemma-mlx[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_decode(report: dict, path: Path, title: str) -> Path:
    """Decode tok/s against context depth from a `bench_report`, with the MTP row as a marker."""
    plt = pyplot()
    depths = [r["depth"] for r in report["decode"]]
    tps = [r["decode_tps"] for r in report["decode"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(depths, tps, marker="o", label="decode")
    if "draft" in report:
        d = report["draft"]
        ax.plot([d["depth"]], [d["decode_tps"]], marker="*", markersize=12, linestyle="", label="MTP decode")
    if len(depths) > 1 and min(depths) > 0 and max(depths) / min(depths) >= 16:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{title} on {report['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
