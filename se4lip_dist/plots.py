"""Matplotlib figures shared by the stages (Agg backend, PNG files written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

from se4lip_dist import storage


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed, safe in Ray workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@overload
def save_figure(fig: Any, path: Path, dpi: int = ...) -> Path: ...


@overload
def save_figure(fig: Any, path: str, dpi: int = ...) -> str: ...


def save_figure(fig: Any, path: str | Path, dpi: int = 80) -> Path | str:
    """Write ``fig`` as PNG to ``path`` (local or URL) atomically, then close it.

    A reader never sees a half-written PNG (:func:`se4lip_dist.storage.write_atomic_with`).

    Returns:
        ``path`` as given (a ``Path`` stays a ``Path``).
    """
    try:
        storage.write_atomic_with(str(path), lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
    return path


def offset_curve_figure(distances: Sequence[float], title: str, *, predicted: int | None = None,
                        expected: int | None = None) -> Any:
    """Mean embedding distance vs audio shift (frames; + = audio later), syncnet-style."""
    plt = pyplot()
    m = (len(distances) - 1) // 2
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(-m, m + 1), distances, marker=".")
    if expected is not None:
        ax.axvline(expected, color="grey", lw=0.8, ls="--", label=f"expected {expected}")
    else:
        ax.axvline(0, color="grey", lw=0.5)
    if predicted is not None:
        ax.axvline(predicted, color="red", lw=0.8, label=f"predicted {predicted}")
    ax.set_xlabel("audio shift (frames; + = audio later)")
    ax.set_ylabel("mean embedding distance")
    ax.set_title(title)
    if expected is not None or predicted is not None:
        ax.legend()
    fig.tight_layout()
    return fig


def pareto_figure(points: Sequence[tuple[float, float, bool]], metric: str, cost: str,
                  title: str) -> Any:
    """Score against cost of every trial, ``(cost, score, on the front)``; the front joined."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([c for c, _, f in points if not f], [m for _, m, f in points if not f],
               color="grey", label="dominated")
    front = sorted((c, m) for c, m, f in points if f)
    ax.plot([c for c, _ in front], [m for _, m in front], marker="o", color="C1",
            drawstyle="steps-post", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"{cost} (lower is cheaper)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


__all__ = ["offset_curve_figure", "pareto_figure", "pyplot", "save_figure"]
