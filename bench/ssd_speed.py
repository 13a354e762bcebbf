"""Self-speculative decoding vs greedy vs transformers' assisted-generation peers, interleaved.

    .venv/bin/python bench/ssd_speed.py [--search-dir runs/search] [--k 8] --out docs/bench_ssd.json

Variants (same prompts, greedy, same max_new_tokens): transformers `generate` (reference), rad's plain
greedy engine, rad SSD with the searched mask (from `--search-dir`/search.json, if given) and with the
uniform mask, transformers `assistant_early_exit` (LayerSkip-style draft = first layers) and prompt
lookup decoding. Every variant runs once per prompt per repeat, in a rotating order; medians and the
ratio to rad greedy are reported, with acceptance where the method has one.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from rad.decoding.runner import FastDecoder
from rad.decoding.speculative import DraftConfig, speculative_generate
from rad.models.layers import uniform_layers
from rad.models.loading import load_model

logger = logging.getLogger("bench.ssd_speed")

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between a list and a tuple in Python?",
]


def encode(tok, text):
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, return_tensors="pt", add_special_tokens=False).input_ids


def run_hf(model, ids, n, eos, **kwargs):
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=eos, eos_token_id=eos, **kwargs)
    seconds = time.perf_counter() - t0
    return {"tokens": out[0, ids.shape[1]:].tolist(), "seconds": seconds}


def run_rad(model, ids, n, eos, skip, decoder, draft):
    t0 = time.perf_counter()
    r = speculative_generate(model, ids, skip, n, draft=draft, eos_token_id=eos, decoder=decoder)
    seconds = time.perf_counter() - t0  # wall time including prefill, like generate()
    return {"tokens": r.tokens.tolist(), "seconds": seconds, "mean_accepted": r.mean_accepted,
            "acceptance": r.acceptance_rate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--search-dir", type=Path, default=None, help="a `rad search` output folder")
    p.add_argument("--k", type=int, default=8, help="layers skipped by the uniform mask (and early exit depth L-k)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    n_layers = model.config.num_hidden_layers
    eos = tok.eos_token_id
    decoder = FastDecoder(model)
    draft = DraftConfig()
    masks = {"uniform": uniform_layers(args.k, n_layers)}
    if args.search_dir is not None:
        masks["searched"] = json.loads((args.search_dir / "search.json").read_text())["chosen_layers"]
    variants = {
        "hf_generate": lambda ids: run_hf(model, ids, args.new_tokens, eos),
        "rad_greedy": lambda ids: run_rad(model, ids, args.new_tokens, eos, None, decoder, draft),
        **{f"rad_ssd_{name}": (lambda ids, m=m: run_rad(model, ids, args.new_tokens, eos, m, decoder, draft))
           for name, m in masks.items()},
        "hf_early_exit": lambda ids: run_hf(model, ids, args.new_tokens, eos,
                                            assistant_early_exit=n_layers - args.k),
        "hf_prompt_lookup": lambda ids: run_hf(model, ids, args.new_tokens, eos, prompt_lookup_num_tokens=10),
    }
    prompts = [encode(tok, text) for text in PROMPTS]
    names = list(variants)
    for name in names:  # warm-up
        variants[name](prompts[0][:, :8])
    runs = []
    for r in range(args.repeats):
        for i, ids in enumerate(prompts):
            order = names[(r + i) % len(names):] + names[: (r + i) % len(names)]
            for name in order:
                out = variants[name](ids)
                out.update(variant=name, prompt=i, repeat=r)
                runs.append(out)
                logger.info("repeat %d prompt %d %-18s %.1f tok/s", r, i, name, len(out["tokens"]) / out["seconds"])
    reference = {(x["prompt"], x["repeat"]): x["tokens"] for x in runs if x["variant"] == "hf_generate"}
    summary = {}
    for name in names:
        mine = [x for x in runs if x["variant"] == name]
        # per repeat: total tokens / total seconds over all prompts
        per_repeat = [sum(len(x["tokens"]) for x in mine if x["repeat"] == r)
                      / sum(x["seconds"] for x in mine if x["repeat"] == r) for r in range(args.repeats)]
        summary[name] = {
            "tok_s": statistics.median(per_repeat),
            "identical_to_greedy": all(x["tokens"] == reference[(x["prompt"], x["repeat"])] for x in mine),
            "mean_accepted": statistics.mean(x["mean_accepted"] for x in mine) if "mean_accepted" in mine[0] else None,
        }
    base = summary["rad_greedy"]["tok_s"]
    lines = ["| variant | tok/s | x rad greedy | x hf generate | accepted/round | same tokens as greedy |",
             "|---|---:|---:|---:|---:|---|"]
    for name, s in summary.items():
        acc = f"{s['mean_accepted']:.2f}" if s["mean_accepted"] is not None else "-"
        lines.append(f"| {name} | {s['tok_s']:.1f} | {s['tok_s'] / base:.2f} | "
                     f"{s['tok_s'] / summary['hf_generate']['tok_s']:.2f} | {acc} | {s['identical_to_greedy']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out), "search_dir": str(args.search_dir)},
                                        "masks": masks, "summary": summary, "runs": runs, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
