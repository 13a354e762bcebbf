"""Collect issue 24's k = 8 ablation (bench/align_ablation.sh, bench/align_selection.sh, then `rad eval`) into one
JSON and one plot for docs/results.md section 5.

    python bench/align_ablation_summary.py --ablation ABL --selection SEL --eval EVAL \
        --out docs/results_align_k8.json --plot docs/results_align_k8.png

Budgets are in optimiser steps chosen from the quiet-machine step costs of bench/distill_precision.py and
bench/align_step.py (`--kd-step-s`, `--align-step-s`), so the arms cost the same training wall clock whatever else
ran on the machine meanwhile; the measured wall clock of each command (ABL/times.txt) is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARMS = {  # name -> (model folder name under EVAL, align steps, KD steps, what)
    "converted": ("k8-converted", 0, 0, "the converted hybrid, no training (= the skip-draft)"),
    "align only": ("k8-align140", 140, 0, "rad align, 140 steps"),
    "align -> KD": ("k8-align70-kd16", 70, 16, "rad align 70 steps, then rad distill 16 steps"),
    "KD only": ("k8-kd32", 0, 32, "rad distill 32 steps (section 4's recipe, in bf16)"),
    "selection after alignment, align -> KD": ("k8sel-align70-kd16", 70, 16,
                                               "layers chosen by hybrid-agreement, then align 70 -> KD 16"),
}


def _results(folder: Path) -> dict:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ablation", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--kd-step-s", type=float, default=14.51)
    p.add_argument("--align-step-s", type=float, default=3.42)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    abl, sel, ev = Path(args.ablation), Path(args.selection), Path(args.eval)
    times = dict(line.split() for line in (abl / "times.txt").read_text().splitlines() if line.strip())
    teacher = _results(ev / "qwen2.5-coder-0.5b")
    report = {"model": "qwen2.5-coder-0.5b", "k": 8, "kd_step_s": args.kd_step_s, "align_step_s": args.align_step_s,
              "teacher": {t: {k: v for k, v in r.items() if k in ("correct", "total")}
                          for t, r in teacher.get("tasks", {}).items()},
              "measured_wall_s": {k: float(v) for k, v in times.items()}, "arms": {}}
    for name, (folder, align, kd, what) in ARMS.items():
        r = _results(ev / folder)
        t = r.get("teacher") or {}
        report["arms"][name] = {
            "what": what, "align_steps": align, "kd_steps": kd, "tokens": (align + kd) * 1024,
            "budget_s": align * args.align_step_s + kd * args.kd_step_s,
            "kl": t.get("kl_teacher_student"), "top1": t.get("top1_agreement"), "perplexity": t.get("perplexity"),
            "tasks": {task: {k: v for k, v in s.items() if k in ("correct", "total")}
                      for task, s in r.get("tasks", {}).items()},
        }
    search = json.loads((sel / "search" / "search.json").read_text())
    all_align = json.loads((sel / "all-align" / "summary.json").read_text())
    report["selection"] = {"chosen_layers": search["chosen_layers"], "searched_layers": [4, 7, 9, 13, 16, 18, 20, 22],
                           "all_layer_alignment": all_align["final_eval"]["relative_error"],
                           "all_layer_alignment_tokens_per_s": all_align["tokens_per_s"],
                           # its extra cost: aligning all 24 layers (70 steps) and the 24-mask search
                           "extra_s": all_align["tokens"] / all_align["tokens_per_s"]}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.6, 4))
        for name, arm in report["arms"].items():
            if arm["kl"] is None:
                continue
            x = arm["budget_s"] / 60
            ax.scatter(x, arm["kl"], s=45, label=f"{name}: KL {arm['kl']:.3f}", zorder=3)
            if name.startswith("selection"):
                extra = report["selection"]["extra_s"] / 60
                ax.plot([x, x + extra], [arm["kl"], arm["kl"]], ls="--", color="grey", lw=1,
                        label="+ aligning all 24 layers to choose the layers")
        ax.set_xlabel("training budget (minutes on 2 cores, quiet-machine step costs)")
        ax.set_ylabel("held-out KL(teacher || student), fp32, 32 texts")
        ax.set_title("Qwen2.5-Coder-0.5B, k = 8: what 8 minutes of training buys", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    print(json.dumps(report["arms"], indent=1))


if __name__ == "__main__":
    main()
