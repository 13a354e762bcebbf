"""Batched greedy decoding in the loaded fp32 model against `rad eval --generation-dtype bfloat16`'s cast copy.

What `rad eval` spends its time on is HF generate over left-padded batches: one decode step of `--batch` rows
at `--context` tokens of KV cache. Variants, interleaved over repeats (machine noise hits all alike), medians:
  fp32_sdpa    the model as loaded (fp32, SDPA attention)
  bf16_sdpa    a bf16 copy keeping SDPA (torch's CPU flash-attention kernel)
  bf16_eager   `generation_copy(..., "bfloat16")`: bf16 with eager attention on CPU (what rad eval uses)
Also reported: how many of the batch's greedy continuations agree with fp32 for `--agree-tokens` tokens.

    python bench/generation_dtype.py --model qwen2.5-coder-0.5b --out docs/bench_generation_dtype.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from rad.evaluate.runner import generation_copy
from rad.models.loading import load_model

logger = logging.getLogger("bench.generation_dtype")


@torch.no_grad()
def step_seconds(model, batch: int, context: int, steps: int, seed: int) -> float:
    """Median seconds of one decode step of `batch` rows over a `context`-token cache."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator)
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    token = ids[:, -1:]
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first step warms up


@torch.no_grad()
def agreement(reference, other, tokenizer, batch: int, tokens: int, seed: int) -> float:
    """Fraction of rows whose greedy continuation of a random prompt matches the reference's for `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tokenizer.vocab_size, (batch, 32), generator=generator)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                  do_sample=False, temperature=None, top_p=None, top_k=None)
    a, b = reference.generate(ids, **kwargs), other.generate(ids, **kwargs)
    return (a == b).all(dim=1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = load_model(args.model)
    eager = generation_copy(loaded, "bfloat16").model
    sdpa = copy.deepcopy(loaded.model).to(torch.bfloat16)
    variants = {"fp32_sdpa": loaded.model, "bf16_sdpa": sdpa, "bf16_eager": eager}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, model in variants.items():
            seconds[name].append(step_seconds(model, args.batch, args.context, args.steps, seed=repeat))
            logger.info("repeat %d %s: %.0f ms/step", repeat, name, 1000 * seconds[name][-1])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "command": "python bench/generation_dtype.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "ms_per_step": {name: round(1000 * m, 1) for name, m in medians.items()},
        "speedup_vs_fp32": {name: round(medians["fp32_sdpa"] / m, 2) for name, m in medians.items()},
        "rows_agreeing_with_fp32": round(agreement(loaded.model, eager, loaded.tokenizer, args.batch,
                                                   args.agree_tokens, seed=0), 3),
        "runs": {name: [round(1000 * s, 1) for s in values] for name, values in seconds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
