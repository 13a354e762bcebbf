"""PNG curves of a distillation run (matplotlib is optional: without it, only the JSON logs)."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def plot_curves(history: list[dict], evals: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping the PNG curves.")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if history:
        axes[0].plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
        axes[0].plot([r["step"] for r in history], [r["kl"] for r in history], label="train KL", alpha=0.7)
    if evals:
        steps = [r["step"] for r in evals]
        axes[0].plot(steps, [r["eval_kl"] for r in evals], "o-", label="held-out KL")
        axes[1].plot(steps, [r["eval_ppl"] for r in evals], "o-", label="student")
        axes[1].plot(steps, [r["teacher_ppl"] for r in evals], "--", label="teacher")
        axes[2].plot(steps, [r["eval_top1_agreement"] for r in evals], "o-")
    axes[0].set(xlabel="step", title="loss / KL(teacher || student)")
    axes[1].set(xlabel="step", title="held-out perplexity")
    axes[2].set(xlabel="step", title="top-1 agreement with teacher")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:  # a run without held-out evaluations draws nothing on the second
            ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
