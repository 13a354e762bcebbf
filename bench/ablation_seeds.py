"""Held-out KL of `rad ablate` arms across seeds: one table (mean and each seed) and one plot, one panel per seed.

Each ablation folder holds `arms/NAME/result.json`; give every folder with its seed, and after a second colon
the arms to take from it when not all (SEED:FOLDER[:ARM,ARM...]; an arm run again after a code change). Several
folders for one seed are merged by arm name (e.g. the `rad` arms and the `mil` arms run apart); an arm taken
twice must agree on its final KL (the baseline is run in every folder, so this checks determinism).

    .venv/bin/python bench/ablation_seeds.py 0:runs/ablate2-s0-rad 0:runs/ablate-s0-mil \
        0:runs/ablate-s0-rad:searched-rad-zero-in-proj-mixers,uniform-mil-all 1:runs/ablate2-s1-rad \
        1:runs/ablate-s1:searched-mil-all,searched-mil-mixers,uniform-mil-mixers,searched-rad-zero-in-proj-mixers,uniform-mil-all \
        --plot docs/results_ablation_kl.png --out docs/results_ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rad.ablate.config import BaselineArm
from rad.ablate.report import draw_kl_curve
from rad.ablate.results import ArmResult

BASELINE = BaselineArm().arm().name  # the ablate presets' baseline: uniform layers, mil init, all trained


def load(specs: list[str]) -> dict[int, dict[str, ArmResult]]:
    seeds: dict[int, dict[str, ArmResult]] = {}
    for spec in specs:
        seed, _, rest = spec.partition(":")
        folder, _, names = rest.partition(":")
        wanted = set(names.split(",")) if names else None
        arms = seeds.setdefault(int(seed), {})
        paths = sorted(Path(folder, "arms").glob("*/result.json"))
        missing = (wanted or set()) - {p.parent.name for p in paths}
        if missing:
            sys.exit(f"{folder} has no arm {sorted(missing)}")
        for path in paths:
            if wanted is not None and path.parent.name not in wanted:
                continue
            arm = ArmResult.load(path.parent)
            if arm.name in arms and abs(arms[arm.name].final_kl - arm.final_kl) > 1e-9:
                sys.exit(f"{arm.name} seed {seed}: final KL {arms[arm.name].final_kl} and {arm.final_kl} differ")
            arms[arm.name] = arm
    return seeds


def kl_at(arm: ArmResult, step: int) -> float | None:
    return next((p.eval_kl for p in arm.curve if p.step == step), None)


def table(seeds: dict[int, dict[str, ArmResult]], steps: list[int]) -> tuple[str, dict]:
    names = sorted({n for arms in seeds.values() for n in arms}, key=lambda n: (n != BASELINE, n))
    rows, data = [], {}
    head = ["arm"] + [f"step {s} (mean)" for s in steps] + [f"final, seed {s}" for s in sorted(seeds)] + ["distil s"]
    rows.append("| " + " | ".join(head) + " |")
    rows.append("|---" + "|---:" * (len(head) - 1) + "|")
    for name in names:
        per_seed = {s: arms[name] for s, arms in seeds.items() if name in arms}
        means = []
        for step in steps:
            vals = [v for a in per_seed.values() if (v := kl_at(a, step)) is not None]
            means.append(statistics.mean(vals) if len(vals) == len(seeds) else None)
        finals = [per_seed[s].final_kl if s in per_seed else None for s in sorted(seeds)]
        secs = [t for a in per_seed.values() if (t := a.timings.get("distill_s"))]
        cells = [name] + [f"{m:.3f}" if m is not None else "-" for m in means]
        cells += [f"{f:.3f}" if f is not None else "-" for f in finals]
        cells.append(f"{statistics.median(secs):.0f}" if secs else "-")
        rows.append("| " + " | ".join(cells) + " |")
        data[name] = {"curves": {str(s): [[p.step, p.eval_kl] for p in a.curve] for s, a in per_seed.items()},
                      "layers": next(iter(per_seed.values())).layers}
    return "\n".join(rows), data


def plot(seeds: dict[int, dict[str, ArmResult]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(seeds), sharey=True, squeeze=False)[0]
    for ax, seed in zip(axes, sorted(seeds), strict=True):
        for name, arm in sorted(seeds[seed].items(), key=lambda kv: kv[0] == BASELINE):
            draw_kl_curve(ax, arm, name, is_baseline=name == BASELINE)
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_title(f"seed {seed}")
    axes[0].set_ylabel("held-out KL(teacher ‖ student)")
    axes[-1].legend(fontsize=7)
    figure.suptitle("SmolLM2-135M-Instruct: 8 of 30 attention layers -> Mamba2, KL-only distillation")
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="SEED:FOLDER[:ARM,ARM...], one per ablation folder")
    parser.add_argument("--steps", default="0,8", help="steps whose mean KL the table shows")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--out", type=Path, help="the curves as JSON")
    args = parser.parse_args()
    seeds = load(args.folders)
    text, data = table(seeds, [int(s) for s in args.steps.split(",")])
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "arms": data}, indent=1))
    if args.plot:
        plot(seeds, args.plot)


if __name__ == "__main__":
    main()
