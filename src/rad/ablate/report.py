"""`kl_curves.png` and `report.md` of an ablation, from what ablate.json holds (an `AblateSummary`)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from rad.ablate.config import AblateConfig
from rad.ablate.results import AblateSummary, ArmResult, ArmSummary
from rad.evaluate.inputs import TASK_TITLES
from rad.evaluate.runner import TaskScore
from rad.utils.atomic import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

_COLOURS = {("searched", "rad"): "C3", ("searched", "mil"): "C1", ("searched", "random"): "C5",
            ("searched", "rad-zero-in-proj"): "C6", ("uniform", "rad-zero-in-proj"): "C7",
            ("uniform", "rad"): "C2", ("uniform", "mil"): "C0", ("uniform", "random"): "C4"}
_STYLES = {"mixers": "-", "mixers+mlp": ":", "all": "--"}


def draw_kl_curve(ax, arm: ArmResult, label: str, is_baseline: bool) -> list[float]:
    """One arm's held-out KL line on `ax` (the baseline black and thick; colour by layers and init, line style
    by trainable set); returns the KL values drawn."""
    steps = [p.step for p in arm.curve]
    kls = [p.eval_kl for p in arm.curve]
    if is_baseline:
        ax.plot(steps, kls, "o-", color="black", linewidth=2.6, markersize=4, zorder=5, label=f"{label} (baseline)")
    else:
        ax.plot(steps, kls, marker="o", markersize=3, linewidth=1.5, linestyle=_STYLES.get(arm.train, "-"),
                color=_COLOURS.get((arm.layer_set, arm.init)), label=label)
    return kls


def plot_kl_curves(summary: AblateSummary, path: Path) -> Path | None:
    """One held-out KL line per arm (the baseline black and thick), a dashed line at the baseline's final KL."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[plot]'); kl_curves.png is skipped.")
        return None
    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    baseline = summary.baseline
    values = []
    for name in summary.order:
        arm = summary.arms[name]
        if arm.same_as:
            continue  # drawn under the arm it coincides with
        twins = [n for n in summary.order if summary.arms[n].same_as == name]
        label = " = ".join([name, *twins])
        values += draw_kl_curve(ax, arm, label, is_baseline=name == baseline)
    target = summary.baseline_final_kl
    ax.axhline(target, color="0.4", linestyle=(0, (4, 3)), linewidth=1,
               label=f"baseline final KL {target:.4g}")
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 3:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out KL(teacher ‖ student)")
    ax.set_title(f"{_model_name(summary.model)}: {summary.k} of {summary.num_layers} attention layers -> Mamba2")
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())


def _model_name(spec: str) -> str:
    path = Path(spec)
    return path.name if path.exists() else spec


def _speedup(arm: ArmSummary) -> str:
    if arm.speedup is not None:
        return f"{arm.speedup:.2f}x"
    if arm.reached_at_init:
        return "at init"
    return "never" if arm.steps_to_baseline_kl is None else "–"


def _score(s: TaskScore | None) -> str:
    if not s:
        return "–"
    return f"{100 * s.accuracy:.1f}% ({s.correct}/{s.total})"


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def write_report(summary: AblateSummary, config: AblateConfig, root: Path) -> Path:
    d = config.distill
    sets = summary.layer_sets
    arms = summary.arms
    tasks = list(dict.fromkeys([*summary.teacher_scores, *(t for a in arms.values() for t in a.scores)]))
    lines = [
        f"# RAD ablation: {summary.model}",
        "",
        f"Every arm converts {summary.k} of {summary.num_layers} attention layers to Mamba2 mixers and is "
        f"distilled from the same teacher ({summary.model}, self-distillation) with the same data, steps and "
        "seed; arms differ only in the layer set, the mixer init and what trains.",
        "",
        f"- searched layers: **{', '.join(map(str, sets['searched']))}** ({summary.searched_source})",
        f"- uniform layers: **{', '.join(map(str, sets['uniform']))}** (evenly spaced, MambaInLlama's choice)",
    ]
    if summary.layer_sets_coincide:
        lines.append("- **The searched layers are the uniform layers**, so each searched arm is the same run as "
                     "its uniform twin: it was run once and is listed as 'same as'.")
    used_lr = {a.train: a.lr for a in arms.values()}
    data = next((a.data for a in arms.values() if a.data), d.data or "GSM8K train")
    lines += [
        f"- distillation: {d.steps} steps, batch {d.micro_batch} x {d.grad_accum} x {d.seq_len} tokens, "
        f"lr {', '.join(f'{k} {v:g}' for k, v in used_lr.items())} (cosine, warm-up ratio {d.warmup_ratio:g}), "
        f"loss KL x {d.kl_weight:g} + CE x {d.ce_weight:g} + alignment x {d.align_weight:g}, seed "
        f"{config.seed}, data {data}",
        f"- held-out KL every {d.eval_every} steps (and at step 0, before training) on {d.eval_sequences} "
        "held-out sequences, the same for every arm",
        f"- baseline: **{summary.baseline}**; its final KL **{summary.baseline_final_kl:.4g}** is the target "
        f"(first reached at step {summary.baseline_steps})",
        "",
        "## Held-out KL curves",
        "",
        "![held-out KL per arm](kl_curves.png)",
        "",
        "## Results",
        "",
    ]
    header = ["arm", "layers", "init", "trains", "lr", "trainable", "KL step 0", "final KL",
              "steps to baseline KL", "speed-up", *tasks]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * (len(header) - 4)]
    for name in summary.order:
        a = arms[name]
        label = f"**{name}** (baseline)" if name == summary.baseline else name
        if a.same_as:
            label += f" (same as {a.same_as})"
        kl0 = "–" if a.kl_at_init is None else f"{a.kl_at_init:.4g}"
        steps = "never" if a.steps_to_baseline_kl is None else str(a.steps_to_baseline_kl)
        row = [label, a.layer_set, a.init, a.train, f"{a.lr:g}", _params(a.trainable_parameters),
               kl0, f"{a.final_kl:.4g}", steps, _speedup(a), *(_score(a.scores.get(t)) for t in tasks)]
        lines.append("| " + " | ".join(row) + " |")
    if summary.teacher_scores:
        row = ["teacher", "–", "–", "–", "–", "–", "0", "0", "–", "–",
               *(_score(summary.teacher_scores.get(t)) for t in tasks)]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Steps to baseline KL: the first evaluated step whose held-out KL is at most the baseline's final KL "
        f"(so it is only as fine as the evaluation interval, {d.eval_every} steps). Speed-up: the baseline's "
        "steps by the same rule divided by the arm's ('at init': the arm starts below the target; 'never': it "
        "does not reach it within the run).",
    ]
    for task, why in summary.dropped_tasks.items():
        lines.append(f"{TASK_TITLES.get(task, task)}: not scored. {why[0].upper() + why[1:]}.")
    if tasks:
        lines.append(f"Task scores: zero-shot, greedy, first {config.eval.limit} items of each task (accuracy and count); "
                     "with so few items the 95% intervals are wide (see eval/<arm>/results.json).")
    lines += ["Per-arm training curves: `arms/<arm>/distill/curves.png`.", "", "## Time", "",
              "| arm | convert s | align s | distill s | eval s |", "|---|---:|---:|---:|---:|"]
    for name in summary.order:
        a = arms[name]
        if a.same_as:
            continue
        t = a.timings
        lines.append(f"| {name} | " + " | ".join("–" if t.get(k) is None else f"{t[k]:.0f}"
                                                   for k in ("convert_s", "align_s", "distill_s", "eval_s")) + " |")
    lines += ["", f"Total {summary.timings['total_s']:.0f} s in the last invocation (arms done earlier are "
              "skipped and keep the times of the run that made them).", "",
              "## Reproduce", "", "```bash", summary.command, "```", "",
              f"`{root / 'config.yaml'}` holds every setting; `--out NEW` reruns it elsewhere, "
              f"`--set searched_layers=[{','.join(map(str, sets['searched']))}]` pins the searched layers.", ""]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
