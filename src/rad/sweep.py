"""`rad sweep`: `rad run` at several k (attention layers replaced), and the table that answers "how many layers can
I replace before accuracy drops, and how much better is RAD than the baseline at each k?".

Each k is a complete run (`rad.stages.run.run_stages`, what `rad run` is) in OUT/k<K> (search for k layers, both
students with the same data, token budget and seed, evaluation of teacher / draft / RAD / baseline, speed and cache bytes at the configured contexts), so every
stage and every evaluation item resumes as `rad run`'s do. The teacher does not depend on k: it is scored once, in
OUT/teacher-eval. `max_minutes` stops the sweep before a stage or between evaluation batches once that much time has
passed (exit status 75), so a long sweep runs as invocations of bounded length, each continuing where the last
stopped; a stage already running finishes first (size distillation so one student fits, docs/results.md). The summary
(`claims.json`, `report.md`, two plots) pairs every model's per-item results with exact McNemar tests; a sweep that
stops at its time limit writes it for the k already complete and lists the others as pending.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import field
from pathlib import Path

from rad.config import load_settings, preset_file, settings, to_yaml
from rad.errors import RadError, TimeLimitReached
from rad.evaluate.runner import EvalResults, model_slug, paired_test
from rad.evaluate.stats import wilson_interval
from rad.models.convert import ConversionRecord
from rad.models.loading import load_model
from rad.outputs import RUN, SWEEP, check_output
from rad.stages.roles import BASELINE, DRAFT, RAD, ROLES, TEACHER
from rad.stages.run import run_stages
from rad.stages.run_config import RunConfig, RunPaths, check_same_run
from rad.stages.search import check_search_fits
from rad.stages.speed import SPEED_FILE, SpeedResult
from rad.utils.atomic import atomic_write_json, atomic_write_text
from rad.utils.locks import writer_lock

logger = logging.getLogger(__name__)

TEACHER_EVAL = "teacher-eval"
CLAIMS_FILE = "claims.json"
# RAD against the baseline and the teacher (the paper's claims), the baseline against the teacher, and RAD against
# its own draft (what training the mixers adds over skipping the same layers).
PAIRS = ((RAD, BASELINE), (RAD, TEACHER), (BASELINE, TEACHER), (RAD, DRAFT))


@settings
class SweepConfig(RunConfig):
    """`rad run`'s settings (each stage's own settings class) plus the k to sweep; `search.k` is set per run."""

    out: str = "runs/sweep"
    ks: list[int] = field(default_factory=lambda: [4, 8, 12])
    max_minutes: float | None = None  # stop before a stage or evaluation batch after this long; run again to continue

    def __post_init__(self):
        super().__post_init__()
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise RadError(f"ks must be distinct positive layer counts, got {self.ks}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise RadError(f"max_minutes must be positive, got {self.max_minutes}.")

    def run_config(self, k: int) -> RunConfig:
        """The `rad run` of one k: the same settings, its own folder, `search.k = k`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}
        values.update(out=str(Path(self.out) / f"k{k}"), search=dataclasses.replace(self.search, k=k))
        return RunConfig(**values)


def load_sweep_config(preset: str | None = None, config_path: str | None = None, overrides=()) -> SweepConfig:
    """Preset (`claims`, `smoke`) and/or a YAML file, then `key.sub=value` overrides."""
    return load_settings(SweepConfig, preset_file(preset, prefix="sweep") if preset else None, config_path,
                         overrides, what="sweep config")


def run_sweep(config: SweepConfig) -> Path:
    """Every k's run (each resuming), then the summary; returns report.md. Stops with TimeLimitReached between
    stages or evaluation batches after `max_minutes`; the same command continues."""
    root = check_output(config.out, SWEEP, inputs=[("model", config.model), ("distillation data", config.distill.data)])
    runs = {k: config.run_config(k) for k in config.ks}
    for run in runs.values():  # every run's folder and settings before any work
        check_output(run.out, RUN, inputs=[("model", run.model), ("distillation data", run.distill.data)])
        check_same_run(run, RunPaths(Path(run.out)))
    with writer_lock(root, "rad sweep"):
        deadline = None if config.max_minutes is None else time.monotonic() + 60 * config.max_minutes
        teacher = load_model(config.model, device=config.device)
        for run in runs.values():  # every k fits the model (k < its attention layers, ...)
            check_search_fits(run.search, teacher.model, run.seed)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / "sweep.yaml", to_yaml(config))
        try:
            for k, run in runs.items():
                logger.info("sweep: k=%d -> %s", k, run.out)
                run_stages(run, teacher_eval=root / TEACHER_EVAL, deadline=deadline, teacher=teacher)
        except TimeLimitReached:
            summary = summarise(config)
            if summary["runs"]:  # what is finished can be read now
                logger.info("sweep: partial summary (k pending: %s) in %s", summary["pending"],
                            _write_summary(config, summary))
            raise
        return _write_summary(config, summarise(config))


def _write_summary(config: SweepConfig, summary: dict) -> Path:
    """claims.json, then report.md and the plots; returns report.md."""
    atomic_write_json(Path(config.out) / CLAIMS_FILE, summary)
    return write_sweep_report(config, summary)


def is_complete(config: SweepConfig, k: int) -> bool:
    """Whether k's run has its speed table and every model's results for every task of the sweep."""
    if not (Path(config.run_config(k).out) / SPEED_FILE).is_file():
        return False
    for role in ROLES:
        results = EvalResults.load_or_none(_role_folder(config, k, role))
        if results is None or not set(config.eval.tasks) <= set(results.tasks):
            return False
    return True


def _role_folder(config: SweepConfig, k: int, role: str) -> Path:
    base = Path(config.out) / TEACHER_EVAL if role == TEACHER else RunPaths(Path(config.run_config(k).out)).eval
    return base / model_slug(role)


def summarise(config: SweepConfig) -> dict:
    """Per complete k and model: accuracy with its Wilson interval per task, teacher metrics, tok/s and cache bytes
    per token at the largest speed context; per k and task: exact McNemar tests of PAIRS on the paired items.
    The k not yet complete are listed under `pending`."""
    context = max(config.speed_contexts)
    pending = [k for k in config.ks if not is_complete(config, k)]
    out: dict = {"model": config.model, "ks": list(config.ks), "pending": pending, "speed_context": context,
                 "runs": {}}
    for k in config.ks:
        if k in pending:
            continue
        run = config.run_config(k)
        speed = SpeedResult.load(run.out)
        models = {}
        for role in ROLES:
            results = EvalResults.load(_role_folder(config, k, role))
            row = speed.row(role, context)
            models[role] = {
                "tasks": {name: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy,
                                 "ci95": list(wilson_interval(s.correct, s.total))}
                          for name, s in results.tasks.items()},
                "teacher_metrics": None if results.teacher is None else {
                    "kl": results.teacher.kl_teacher_student, "perplexity": results.teacher.perplexity,
                    "top1_agreement": results.teacher.top1_agreement},
                "tok_s": None if row is None else row.tok_s,
                "bytes_per_token": None if row is None else row.bytes_per_token,
            }
        tests = {}
        tasks = sorted(set.intersection(*(set(m["tasks"]) for m in models.values())))
        for task in tasks:
            for a, b in PAIRS:
                r = paired_test(_role_folder(config, k, a), _role_folder(config, k, b), task, config.eval.limit)
                tests[f"{task}: {a} vs {b}"] = {"a_only": r.b, "b_only": r.c, "n_items": r.n_items,
                                                "p_value": r.p_value, "better": {"a": a, "b": b}.get(r.better, "tie")}
        out["runs"][str(k)] = {"layers": _layers(run), "models": models, "mcnemar": tests}
    return out


def _layers(run: RunConfig) -> dict:
    paths = RunPaths(Path(run.out))
    return {"searched": ConversionRecord.load(paths.rad_hybrid).converted_layers,
            "uniform": ConversionRecord.load(paths.baseline_hybrid).converted_layers}


def _fmt_acc(m: dict, task: str) -> str:
    t = m["tasks"].get(task)
    if t is None:
        return "-"
    lo, hi = t["ci95"]
    return f"{100 * t['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({t['correct']}/{t['total']})"


def write_sweep_report(config: SweepConfig, summary: dict) -> Path:
    root = Path(config.out)
    tasks = sorted({t for run in summary["runs"].values() for m in run["models"].values() for t in m["tasks"]})
    context = summary["speed_context"]
    title = f"# RAD sweep: {config.model}, k = {', '.join(map(str, config.ks))}"
    if summary["pending"]:
        title += f" (not yet complete: k = {', '.join(map(str, summary['pending']))}; run the sweep again)"
    lines = [title, "",
             "Accuracy in % with the 95% Wilson interval and correct/total; greedy, the chat template, zero-shot. "
             f"KL, perplexity and top-1 agreement against the teacher on held-out text; decode tok/s and cache "
             f"(KV + recurrent state) bytes per token at {context} tokens of context.", "",
             "![accuracy against k](accuracy_vs_k.png)", "", "![accuracy against bytes per token](accuracy_vs_bytes.png)",
             "", "| k | model | " + " | ".join(tasks) + " | KL | ppl | top-1 | tok/s | bytes/token |",
             "|---:|---|" + "---|" * len(tasks) + "---:|---:|---:|---:|---:|"]
    for k, run in summary["runs"].items():
        for role, m in run["models"].items():
            tm = m["teacher_metrics"] or {}
            cells = [_fmt_acc(m, t) for t in tasks]
            kl = f"{tm['kl']:.4f}" if "kl" in tm else "-"
            ppl = f"{tm['perplexity']:.2f}" if "perplexity" in tm else "-"
            top1 = f"{100 * tm['top1_agreement']:.1f}%" if "top1_agreement" in tm else "-"
            tok_s = "-" if m["tok_s"] is None else f"{m['tok_s']:.1f}"
            per_token = "-" if m["bytes_per_token"] is None else f"{m['bytes_per_token']:,.0f}"
            lines.append(f"| {k} | {role} | " + " | ".join(cells) + f" | {kl} | {ppl} | {top1} | {tok_s} | {per_token} |")
    lines += ["", "## Paired tests (exact McNemar, two-sided)", "",
              "| k | comparison | only A right | only B right | items | p |", "|---:|---|---:|---:|---:|---:|"]
    for k, run in summary["runs"].items():
        for name, t in run["mcnemar"].items():
            lines.append(f"| {k} | {name} | {t['a_only']} | {t['b_only']} | {t['n_items']} | {t['p_value']:.3g} |")
    lines += ["", "## Layers", ""]
    for k, run in summary["runs"].items():
        lines.append(f"- k={k}: searched {run['layers']['searched']}, uniform {run['layers']['uniform']}")
    lines += ["", "Each k's own report: " + ", ".join(f"[k={k}](k{k}/report.md)" for k in summary["runs"]), ""]
    plot_sweep(summary, root)
    return atomic_write_text(root / "report.md", "\n".join(lines))


def plot_sweep(summary: dict, root: Path) -> None:
    """accuracy_vs_k.png (teacher as a line, the other models per k with error bars) and accuracy_vs_bytes.png
    (every model of every k at its cache bytes per token: the Pareto view)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no sweep plots (pip install -e '.[plot]')")
        return
    runs = summary["runs"]
    tasks = sorted({t for run in runs.values() for m in run["models"].values() for t in m["tasks"]})
    if not tasks:
        return
    ks = [int(k) for k in runs]
    colours = dict(zip(ROLES, ("black", "tab:gray", "tab:blue", "tab:orange"), strict=True))
    def percent_and_error(t: dict) -> tuple[float, list[float]]:
        """Accuracy in % and its Wilson interval as matplotlib's (below, above) error lengths."""
        return 100 * t["accuracy"], [100 * (t["accuracy"] - t["ci95"][0]), 100 * (t["ci95"][1] - t["accuracy"])]

    def finish(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(root / name, dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        teacher = runs[str(ks[0])]["models"][TEACHER]["tasks"].get(task)
        if teacher:
            ax.axhline(100 * teacher["accuracy"], color="black", label="teacher")
            ax.axhspan(100 * teacher["ci95"][0], 100 * teacher["ci95"][1], color="black", alpha=0.08)
        for offset, role in zip((-0.3, 0.0, 0.3), ROLES[1:], strict=True):
            xs, ys, err = [], [], [[], []]
            for k in ks:
                t = runs[str(k)]["models"][role]["tasks"].get(task)
                if t is None:
                    continue
                y, (below, above) = percent_and_error(t)
                xs.append(k + offset)
                ys.append(y)
                err[0].append(below)
                err[1].append(above)
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, color=colours[role], label=role)
        ax.set_xticks(ks)
        ax.set_xlabel("attention layers replaced (k)")
        ax.set_ylabel(f"{task} accuracy (%)")
        ax.set_title(f"{summary['model']}: {task}")
        ax.legend(fontsize=8)
    finish(fig, "accuracy_vs_k.png")

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for role in ROLES:
            for k in ks:
                m = runs[str(k)]["models"][role]
                t = m["tasks"].get(task)
                if t is None or m["bytes_per_token"] is None or (role == TEACHER and k != ks[0]):
                    continue
                x = m["bytes_per_token"] / 1024
                y, (below, above) = percent_and_error(t)
                ax.errorbar([x], [y], yerr=[[below], [above]], fmt="s" if role == TEACHER else "o", capsize=3,
                            color=colours[role], label=role if k == ks[0] else None)
                ax.annotate("" if role == TEACHER else f"k={k}", (x, y), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        ax.set_xlabel(f"cache KiB per token at {summary['speed_context']} tokens")
        ax.set_ylabel(f"{task} accuracy (%)")
        ax.set_title(f"{summary['model']}: {task} against memory")
        ax.legend(fontsize=8)
    finish(fig, "accuracy_vs_bytes.png")
