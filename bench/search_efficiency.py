"""How many evaluations each sampler (GP, TPE, random) needs to find a near-optimal mask, on a case small
enough to enumerate.

The case: a tiny random Llama (12 layers, hidden 48, attention init std 0.05) in which four layers have
their o_proj scaled down (layer 2 x0.1, 5 x0.2, 7 x0.3, 10 x0.4), so their skip costs little, graded;
k = 4, so 495 masks. The objective is `agreement` (deterministic, one batched forward per mask) over 16
random 12-token prompts and 32 generated tokens (fine enough that the planted optimum is the only mask at
98% of itself; `--prompts 4 --new-tokens 24` is the first, too coarse version). Every mask is measured once up front; the searches then
read that table, which is exactly what evaluating would return (the objective is deterministic), so the
benchmark measures the samplers, not the model. Each sampler runs through the real search loop
(`rad.search.optimizer.optimise`: top-k rule, cache, neighbour step, SQLite study) with seeds 0..n-1 and
stops once a mask reaches 98% of the exhaustive optimum (or at the cap).

    .venv/bin/python bench/search_efficiency.py --seeds 10 --out docs/bench_search_efficiency.json \
        --plot docs/bench_search_efficiency.png                                          # ~6 min, 2 cores
    .venv/bin/python bench/search_efficiency.py --quick                                  # 1 seed, small caps
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rad.search.config import SearchSpace
from rad.search.objectives import AgreementObjective, Evaluation
from rad.search.optimizer import make_sampler, measured_trials, optimise
from rad.search.storage import StudyStore

logger = logging.getLogger("bench.search_efficiency")

NUM_LAYERS, K = 12, 4
SCALES = {2: 0.1, 5: 0.2, 7: 0.3, 10: 0.4}
TARGET = 0.98


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=NUM_LAYERS, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.05, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer, scale in SCALES.items():
            model.model.layers[layer].self_attn.o_proj.weight.mul_(scale)
    return model


def exhaustive_table(num_prompts: int = 4, new_tokens: int = 24) -> tuple[dict[tuple[int, ...], float], float]:
    model = tiny_model()
    prompts = [torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(num_prompts)]
    objective = AgreementObjective(model, prompts, max_new_tokens=new_tokens)
    start = time.perf_counter()
    table = {m: objective.evaluate(m).value for m in itertools.combinations(range(NUM_LAYERS), K)}
    return table, time.perf_counter() - start


def run_one(table: dict, sampler: str, seed: int, cap: int, startup: int, stop_at: float) -> dict:
    space = SearchSpace(NUM_LAYERS, K, tuple(range(NUM_LAYERS)))
    with tempfile.TemporaryDirectory(prefix="rad-bench-") as folder:
        store = StudyStore(folder)
        study = store.open(make_sampler(sampler, seed, startup, deterministic=True), {}, resume=False)
        start = time.perf_counter()
        optimise(study, store, space, lambda mask: Evaluation(table[mask]), budget=cap, seed=seed, stop_at=stop_at)
        seconds = time.perf_counter() - start
        values = [t.value for t in measured_trials(study)]
        trials = len(study.trials)
    reached = next((i + 1 for i, v in enumerate(values) if v >= stop_at), None)
    best_so_far = list(itertools.accumulate(values, max))
    return {"sampler": sampler, "seed": seed, "evaluations_to_target": reached, "evaluations": len(values),
            "trials": trials, "best": max(values), "seconds": round(seconds, 2),
            "best_so_far": [round(v, 4) for v in best_so_far]}


def plot(runs: list[dict], best: float, stop_at: float, expected_random: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    colours = {"gp": "C0", "tpe": "C1", "random": "C2"}
    for run in runs:
        curve = run["best_so_far"]
        ax.step(range(1, len(curve) + 1), curve, where="post", color=colours.get(run["sampler"], "C3"), alpha=0.8,
                label=run["sampler"] if run["seed"] == 0 else None)
    ax.axhline(best, color="k", linewidth=1, label=f"exhaustive optimum {best:.3f}")
    ax.axhline(stop_at, color="k", linestyle=":", linewidth=1, label=f"{100 * TARGET:.0f}% of it")
    ax.axvline(expected_random, color="C2", linestyle="--", linewidth=1, label="random: expected hit")
    ax.set_xscale("log")
    ax.set_xlabel("evaluations (distinct masks measured)")
    ax.set_ylabel("best agreement so far")
    ax.set_title(f"Search efficiency: {NUM_LAYERS} layers, k = {K} ({len({r['seed'] for r in runs})} seeds each)")
    ax.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--startup", type=int, default=10, help="random start-up trials of GP and TPE")
    parser.add_argument("--cap", type=int, default=495, help="most evaluations per run (random, TPE)")
    parser.add_argument("--gp-cap", type=int, default=150, help="most evaluations per GP run")
    parser.add_argument("--samplers", default="gp,tpe,random")
    parser.add_argument("--prompts", type=int, default=16, help="random prompts of the agreement objective")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--plot", type=Path, default=None, help="write best-so-far curves as a PNG here")
    parser.add_argument("--quick", action="store_true", help="one seed, caps 100/60: does the script work")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rad").setLevel(logging.WARNING)  # not one line per evaluation
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", module="optuna")
    torch.set_num_threads(1)  # tiny forwards and a GP over <= 150 points: one thread is fastest
    if args.quick:
        args.seeds, args.cap, args.gp_cap = 1, 100, 60

    table, exhaustive_seconds = exhaustive_table(args.prompts, args.new_tokens)
    best = max(table.values())
    stop_at = TARGET * best
    good = sum(v >= stop_at for v in table.values())
    optimum = [list(m) for m, v in table.items() if v == best]
    logger.info("exhaustive: %d masks in %.1f s; optimum %.4f at %s; %d masks reach %.0f%% of it",
                len(table), exhaustive_seconds, best, optimum, good, 100 * TARGET)
    samplers = args.samplers.split(",")
    runs = []
    for sampler in samplers:
        for seed in range(args.seeds):
            cap = args.gp_cap if sampler == "gp" else args.cap
            run = run_one(table, sampler, seed, cap, args.startup, stop_at)
            runs.append(run)
            logger.info("%-6s seed %d: %s evaluations to %.0f%% (%d trials, %.1f s)", sampler, seed,
                        run["evaluations_to_target"] or f">{cap}", 100 * TARGET, run["trials"], run["seconds"])
    summary = {}
    for sampler in samplers:
        needed = [r["evaluations_to_target"] for r in runs if r["sampler"] == sampler]
        finite = [n for n in needed if n is not None]
        summary[sampler] = {
            "evaluations_to_target": needed,
            "median": statistics.median(finite) if len(finite) == len(needed) else None,
            "mean": statistics.fmean(finite) if len(finite) == len(needed) else None,
        }
    # drawing masks uniformly without replacement, the first of `good` marked masks among N comes at (N+1)/(good+1)
    expected_random = (len(table) + 1) / (good + 1)
    result = {
        "case": {"num_layers": NUM_LAYERS, "k": K, "masks": len(table), "o_proj_scales": SCALES,
                 "objective": "agreement", "target": TARGET, "optimum": best, "optimal_masks": optimum,
                 "masks_reaching_target": good, "expected_random_evaluations": expected_random,
                 "exhaustive_seconds": round(exhaustive_seconds, 2)},
        "startup_trials": args.startup,
        "runs": runs,
        "summary": summary,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                    "threads": torch.get_num_threads()},
    }
    gp, rnd = summary.get("gp", {}).get("mean"), summary.get("random", {}).get("mean")
    if gp is not None and rnd is not None:
        result["gp_over_random"] = gp / rnd
        logger.info("GP needs %.2f of random's evaluations (mean %.1f vs %.1f; random's expectation %.1f)",
                    gp / rnd, gp, rnd, expected_random)
    print(json.dumps(summary, indent=2))
    if args.plot:
        plot(runs, best, stop_at, expected_random, args.plot)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
