"""Tokens/s of one `rad align` step: teacher pass (fp32 or bf16) or cached pairs, then every mixer's forward/backward.

Variants, measured interleaved (A B C ... A B C ...) after one warm-up each, medians reported:

- stream-fp32:           teacher pass in float32, mixers in float32
- stream-bf16:           teacher pass in bf16, mixers in float32 (the default where bf16 is native)
- stream-bf16-autocast:  teacher pass in bf16, mixers under bf16 autocast (weights and AdamW float32)
- cache:                 pairs read from a bf16 safetensors shard (epochs after the first), mixers float32
- cache-autocast:        the same, mixers under bf16 autocast

The step is the run's own (`rad.align.train.train_mixers` + AdamW), on real rows of the default data.

    PYTHONPATH=src python bench/align_step.py --hybrid HYBRID --repeats 3 --out docs/bench_align.json

(HYBRID: `rad convert qwen2.5-coder-0.5b --layers 4,7,9,13,16,18,20,22 --init rad --out HYBRID`, the searched k = 8.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rad.align.cache import PairCache
from rad.align.config import AlignConfig
from rad.align.models import load_models
from rad.align.precision import bf16_supported
from rad.align.teacher import teacher_pairs
from rad.align.train import train_mixers
from rad.distill.data import DataConfig, build_data

logger = logging.getLogger("bench.align_step")

VARIANTS = ("stream-fp32", "stream-bf16", "stream-bf16-autocast", "cache", "cache-autocast")
KD_TOKENS_PER_S = 38.0  # today's `rad distill` on this CPU (the brief's reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hybrid", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="docs/bench_align.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = args.variants.split(",")
    device = torch.device("cpu")
    config = AlignConfig(hybrid=args.hybrid, out="-", kl_eval=True, precision="bf16", device="cpu",
                         data=DataConfig(spec="gsm8k+mbpp", seq_len=args.seq_len))
    models = load_models(config, device, "bf16")  # target teacher bf16, eval teacher float32 (shared weights)
    teachers = {"fp32": models.eval_teacher, "bf16": models.target_teacher}
    data = build_data(config.data, models.tokenizer)
    rows = data.train.rows(list(range(args.batch)))
    ids, att = rows.input_ids, rows.attention_mask
    student, layers = models.student, models.layers
    student.train()
    params = {layer: [p for n, p in student.named_parameters() if n.startswith(f"model.layers.{layer}.mamba.")]
              for layer in layers}
    optimizer = torch.optim.AdamW([p for ps in params.values() for p in ps], lr=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        cache = PairCache(Path(tmp), layers)
        cache.write(0, teacher_pairs(teachers["bf16"], layers, ids, att))

        def step(variant: str) -> dict:
            started = time.perf_counter()
            if variant.startswith("stream"):
                pairs = teacher_pairs(teachers["bf16" if "bf16" in variant else "fp32"], layers, ids, att)
            else:
                pairs = cache.read(0, device)
            pairs_s = time.perf_counter() - started
            train_mixers(student, layers, pairs, params, 1.0, variant.endswith("autocast"), device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total = time.perf_counter() - started
            return {"pairs_s": pairs_s, "mixers_s": total - pairs_s, "step_s": total}

        load_before = os.getloadavg()
        for variant in variants:  # warm-up
            step(variant)
        times: dict[str, list[dict]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for variant in variants:
                times[variant].append(step(variant))
                logger.info("repeat %d %s: %.2f s", repeat, variant, times[variant][-1]["step_s"])
        load_after = os.getloadavg()
    tokens = int(att.sum())
    results = {}
    for variant, runs in times.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[variant] = {**{f"median_{k}": round(v, 3) for k, v in median.items()},
                            "tokens_per_s": round(tokens / median["step_s"], 1),
                            "vs_kd_38_tokens_per_s": round(tokens / median["step_s"] / KD_TOKENS_PER_S, 2),
                            "step_s": [round(r["step_s"], 3) for r in runs]}
    report = {
        "command": f"PYTHONPATH=src python bench/align_step.py --hybrid {args.hybrid} --batch {args.batch} "
                   f"--seq-len {args.seq_len} --repeats {args.repeats} --variants {args.variants} --out {args.out}",
        "model": "qwen2.5-coder-0.5b hybrid", "layers": layers, "tokens_per_step": tokens,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "bf16_native": bf16_supported(device), "platform": platform.platform(),
                    "load_average_before": [round(x, 1) for x in load_before],
                    "load_average_after": [round(x, 1) for x in load_after]},
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for variant, r in results.items():
        logger.info("%-22s %8.1f tokens/s  (pairs %.2f s, mixers %.2f s)", variant, r["tokens_per_s"],
                    r["median_pairs_s"], r["median_mixers_s"])


if __name__ == "__main__":
    main()
