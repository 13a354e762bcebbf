"""Section 7 of docs/results.md: the claims sweep's bf16 recipe (64 KD steps) beside section 4's fp32 recipe of
32,768 tokens. Why a script: the section's students are scored one k at a time, in sessions on machines that are
replaced, so their numbers are gathered into one JSON (`--after`) as each k is scored, and the plots are drawn
from that JSON and section 4's `docs/claims/claims.json` (`--before`), never from folders that may be gone.

usage:
  # add (or replace) one model of one k from its `rad eval` folder, with the paired tests against the teacher
  python bench/claims_recipes_summary.py add --after docs/results_claims_bf16.json --k 8 --role "RAD student" \
      --model-eval runs/eval_k8/student --teacher-eval runs/eval_k8/qwen2.5-coder-0.5b \
      --distill runs/claims4/k8/distill/rad --step-seconds 11.3
  # the two plots
  python bench/claims_recipes_summary.py plot --before docs/claims/claims.json --after docs/results_claims_bf16.json \
      --out docs/results_claims_bf16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rad.evaluate.runner import EvalResults, paired_test
from rad.utils.jsonl import read_log

TASKS = ("gsm8k", "cruxeval")
TEACHER, RAD, BASELINE = "teacher", "RAD student", "baseline student"
RECALL = "RAD student, --recall 1024 layers"  # the same recipe on the layers `rad search --recall 1024` chose


def _task_scores(results: EvalResults) -> dict:
    return {name: score for name, score in results.to_json()["tasks"].items() if name in TASKS}


def _kl_curve(distill: Path, step_seconds: float) -> list[dict]:
    """The held-out KL at each evaluated step, with the minutes of optimiser steps at the quiet machine's median
    step cost (`step_seconds`): the run's own elapsed time counts whatever else ran beside it."""
    evals = [r for r in read_log(distill / "log.jsonl") if r.get("kind") == "eval"]
    return [{"step": r["step"], "minutes": r["step"] * step_seconds / 60, "kl": r["eval_kl"]} for r in evals]


def add(args) -> None:
    path = Path(args.after)
    summary = json.loads(path.read_text()) if path.is_file() else {"model": "qwen2.5-coder-0.5b", "runs": {}}
    run = summary["runs"].setdefault(str(args.k), {"models": {}})
    teacher = EvalResults.load(args.teacher_eval)
    run["models"][TEACHER] = {"tasks": _task_scores(teacher), "eval_folder": str(args.teacher_eval)}
    model = EvalResults.load(args.model_eval)
    entry = {"tasks": _task_scores(model), "eval_folder": str(args.model_eval)}
    if model.teacher is not None:
        entry["teacher_metrics"] = model.teacher.to_json()
    entry["mcnemar_vs_teacher"] = {}
    for task in entry["tasks"]:
        test = paired_test(args.model_eval, args.teacher_eval, task)
        entry["mcnemar_vs_teacher"][task] = {"only_model": test.b, "only_teacher": test.c, "p": test.p_value}
    if args.distill:
        entry["kl_curve"] = _kl_curve(Path(args.distill), args.step_seconds)
        entry["step_seconds"] = args.step_seconds
    if args.note:
        entry["note"] = args.note
    run["models"][args.role] = entry
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(entry, indent=1))


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = json.loads(Path(args.before).read_text())["runs"]
    after_summary = json.loads(Path(args.after).read_text())
    after, before_curves = after_summary["runs"], after_summary.get("section4_kl_curves", {})
    out = Path(args.out)
    recipes = (("32k tokens, fp32 (section 4)", before, "--", "o"), ("65k tokens, bf16 (section 7)", after, "-", "s"))
    colours = {RAD: "tab:blue", RECALL: "tab:green", BASELINE: "tab:orange"}

    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4))
    for ax, task in zip(axes, TASKS, strict=True):
        teacher = before[min(before, key=int)]["models"][TEACHER]["tasks"][task]
        ax.axhline(100 * teacher["accuracy"], color="black", label="teacher")
        ax.axhspan(100 * teacher["ci95"][0], 100 * teacher["ci95"][1], color="black", alpha=0.08)
        for offset, (label, runs, style, marker) in zip((-0.25, 0.25), recipes, strict=True):
            for role in (RAD, RECALL, BASELINE):
                points = sorted((int(k), r["models"][role]["tasks"][task]) for k, r in runs.items()
                                if task in r["models"].get(role, {}).get("tasks", {}))
                if not points:
                    continue
                xs = [k + offset for k, _ in points]
                ys = [100 * t["accuracy"] for _, t in points]
                err = [[100 * (t["accuracy"] - t["ci95"][0]) for _, t in points],
                       [100 * (t["ci95"][1] - t["accuracy"]) for _, t in points]]
                ax.errorbar(xs, ys, yerr=err, fmt=marker, linestyle=style, capsize=3, color=colours[role],
                            mfc="white" if style == "--" else colours[role], label=f"{role}, {label}")
        ax.set_xticks(sorted({int(k) for k in before}))
        ax.set_xlabel("attention layers replaced (k of 24)")
        ax.set_ylabel(f"{task} accuracy (%), first 200 items")
        ax.set_title(f"Qwen2.5-Coder-0.5B-Instruct: {task}")
        ax.set_ylim(0, 50)  # room for the legend above the teacher's band
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_accuracy_vs_k.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for k, run in sorted(after.items(), key=lambda kv: int(kv[0])):
        for role in (RAD, RECALL, BASELINE):
            entry = run["models"].get(role, {})
            if "kl_curve" in entry:
                ax.plot([p["minutes"] for p in entry["kl_curve"]], [p["kl"] for p in entry["kl_curve"]], "-s",
                        ms=3, color=colours[role], alpha=0.4 + 0.2 * (int(k) // 4),
                        label=f"{role} k={k}, bf16 ({entry['step_seconds']:.1f} s/step)")
            old = before_curves.get(k, {}).get(role)
            if old:
                ax.plot([p["minutes"] for p in old], [p["kl"] for p in old], "--o", ms=3, mfc="white",
                        color=colours[role], alpha=0.4 + 0.2 * (int(k) // 4),
                        label=f"{role} k={k}, fp32 section 4")
    ax.set_yscale("log")
    ax.set_xlabel("minutes of optimiser steps (quiet-machine median step cost, 2 CPU threads)")
    ax.set_ylabel("held-out KL(teacher || student), nats/token")
    ax.set_title("Distillation: KL against wall clock, both recipes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "_kl_vs_minutes.png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add")
    a.add_argument("--after", required=True)
    a.add_argument("--k", type=int, required=True)
    a.add_argument("--role", required=True, choices=(RAD, RECALL, BASELINE, "draft (searched layers skipped)"))
    a.add_argument("--model-eval", required=True)
    a.add_argument("--teacher-eval", required=True)
    a.add_argument("--distill")
    a.add_argument("--step-seconds", type=float, default=11.3)
    a.add_argument("--note")
    p = sub.add_parser("plot")
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    add(args) if args.command == "add" else plot(args)


if __name__ == "__main__":
    main()
