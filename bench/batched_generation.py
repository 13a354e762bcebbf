"""`rad eval`'s batched greedy loop (finished rows leave the batch) against HF `generate` (they stay).

A batch of `--batch` real GSM8K prompts (chat template, the task's own max_new_tokens) is answered by both,
interleaved over `--repeats` (machine noise hits both alike); medians and their ratio are reported, with how
many rows give token-identical answers. The model is the one `rad eval --generation-dtype` would use.

    python bench/batched_generation.py --model qwen2.5-coder-0.5b --dtype bfloat16 --batch 16 --repeats 3 \
        --out docs/bench_batched_generation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from rad.evaluate.generation import greedy_batch, render_prompt
from rad.evaluate.runner import generation_copy
from rad.evaluate.tasks import TaskOptions, make_task
from rad.models.loading import load_model
from rad.models.tokens import eos_token_ids

logger = logging.getLogger("bench.batched_generation")


@torch.no_grad()
def hf_generate(model, enc: dict, max_new_tokens: int, eos: list[int], pad: int) -> list[list[int]]:
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, eos_token_id=eos, pad_token_id=pad)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16", help="generation dtype, as rad eval --generation-dtype")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = generation_copy(load_model(args.model), args.dtype)
    task = make_task(args.task, TaskOptions())
    prompts = [render_prompt(loaded.tokenizer, item.messages, item.raw, True) for item in task.items(args.batch)]
    max_new = task.default_max_new_tokens
    tok = loaded.tokenizer
    eos = eos_token_ids(tok, loaded.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    side = tok.padding_side
    tok.padding_side = "left"
    enc = dict(tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
    tok.padding_side = side

    variants = {
        "hf_generate": lambda: hf_generate(loaded.model, enc, max_new, eos, pad),
        "greedy_batch": lambda: greedy_batch(loaded.model, enc["input_ids"], enc["attention_mask"], max_new, eos),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            answers[name] = run()
            seconds[name].append(time.perf_counter() - t0)
            logger.info("repeat %d %s: %.1f s", repeat, name, seconds[name][-1])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    lengths = [len(row) for row in answers["hf_generate"]]
    result = {
        "command": "python bench/batched_generation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "max_new_tokens": max_new,
        "answer_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "seconds_per_batch": {name: round(m, 2) for name, m in medians.items()},
        "speedup": round(medians["hf_generate"] / medians["greedy_batch"], 2),
        "rows_identical": sum(a == b for a, b in zip(answers["hf_generate"], answers["greedy_batch"], strict=True)),
        "rows": args.batch,
        "runs": {name: [round(s, 2) for s in values] for name, values in seconds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
