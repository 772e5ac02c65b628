"""Pictures of measurements (`eventful-fx run/bench --plot`): per frame over a clip, and against the budget.

matplotlib is an optional extra (`pip install eventful_fx[viz]`); `require_matplotlib` says so
in one line where it is missing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .measure import Measurement


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("plots need matplotlib: pip install 'eventful_fx[viz]'")


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_frames(rows: list[Measurement], path: str | Path) -> None:
    """Per incremental frame, one line per budget: MAC fraction, wall-clock (the fastest dense model dashed),
    error against the dense model (all outputs; every output token too where the model returns them)."""
    plt = _pyplot()
    fig, (macs, times, errors) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for row in rows:
        frames = [r["frame"] for r in row.records]
        line, = macs.plot(frames, [r["mac_fraction"] for r in row.records], "-o", ms=3, label=f"budget {row.budget}")
        times.plot(frames, [r["eventful_ms"] for r in row.records], "-o", ms=3, color=line.get_color())
        errors.plot(frames, [r.get("token_error", r["error"]) for r in row.records], "-o", ms=3, color=line.get_color())
    if rows:
        row = rows[0]
        times.plot([r["frame"] for r in row.records], [r["dense_ms"].get(row.baseline) for r in row.records], "k--",
                   label=f"dense ({row.baseline}, fastest)")
    macs.set_ylabel("MACs / dense")
    times.set_ylabel("ms per frame")
    errors.set_ylabel("rel. error" + (" (all output tokens)" if rows and rows[0].token_error is not None else ""))
    errors.set_yscale("log")
    errors.set_xlabel("frame")
    macs.legend(fontsize=8)
    times.legend(fontsize=8)
    for ax in (macs, times, errors):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{rows[0].model if rows else ''}: per frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budgets(rows: list[Measurement], path: str | Path) -> None:
    """Against the budget: error (all outputs, output tokens and logits where measured) and speedup against the
    fastest dense model (and against eager), with the dense model's 1x marked."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r.budget)
    budgets = [r.budget for r in rows]
    fig, (errors, speed) = plt.subplots(1, 2, figsize=(10, 4))
    errors.plot(budgets, [r.rel_error for r in rows], "-o", label="all outputs")
    if all(r.token_error is not None for r in rows):
        errors.plot(budgets, [r.token_error for r in rows], "-s", label="output tokens")
        errors.plot(budgets, [r.logit_error for r in rows], "-^", label="logits")
    errors.set_yscale("log")
    errors.set_ylabel("rel. error vs dense (mean over frames)")
    speed.plot(budgets, [r.speedup for r in rows], "-o", label="vs the fastest dense model")
    speed.plot(budgets, [r.speedup_vs_eager for r in rows], "--o", label="vs eager")
    speed.axhline(1.0, color="k", lw=0.8, label="dense")
    speed.set_ylabel("speedup")
    for ax in (errors, speed):
        ax.set_xlabel("budget (fraction of dense MACs)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0].model if rows else ''}: error and speed against the budget")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
