"""Decode speed of GGUF files in llama.cpp (llama-cpp-python) at long contexts: teacher vs hybrid, interleaved.

For each context length every model is prefilled once with the same random token ids (f16 KV cache, llama.cpp's
default), then decodes `--new-tokens` tokens per round, one step each (the same given ids for every model); rounds alternate between the models (A B A B ...),
so machine noise hits all alike, and the median per-token time is reported. Beside it: the bytes one decode step
has to read (weights without the token embedding unless it is the tied head + KV at that context + recurrent
state, from the GGUF's metadata) and the tok/s that docs/benchmarks.md's ~27 GB/s of memory bandwidth would allow.

    python bench/llama_cpp_decode.py --model teacher=/tmp/smol.q8_0.gguf --model hybrid=/tmp/smol_h15.q8_0.gguf \\
        --contexts 2048,8192 --threads 2 --rounds 5 --out docs/bench_llama_cpp_decode.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from rad.export.llama_cpp import open_gguf

logger = logging.getLogger("bench.llama_cpp_decode")
BANDWIDTH = 27e9  # bytes/s, 2 threads, this machine (docs/benchmarks.md)


def geometry(path: Path) -> dict:
    """Per-token KV bytes (f16 cache), recurrent state bytes and weight bytes, from the GGUF's metadata."""
    import gguf

    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = f["general.architecture"]
    layers = f[f"{arch}.block_count"]
    kv_heads = f[f"{arch}.attention.head_count_kv"]
    kv_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * layers
    head_dim = f.get(f"{arch}.attention.key_length") or f[f"{arch}.embedding_length"] // f[
        f"{arch}.attention.head_count"]
    kv_per_token = sum(2 * n * head_dim * 2 for n in kv_heads)  # K and V, f16
    state = 0
    if arch == "granitehybrid":
        d_inner, n_state = f[f"{arch}.ssm.inner_size"], f[f"{arch}.ssm.state_size"]
        groups, conv = f[f"{arch}.ssm.group_count"], f[f"{arch}.ssm.conv_kernel"]
        per_layer = d_inner * n_state * 4 + (conv - 1) * (d_inner + 2 * groups * n_state) * 4  # f32 states
        state = per_layer * sum(1 for n in kv_heads if n == 0)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    weights = sum(sizes.values())
    # A step reads one row of the token embedding, unless the embedding is also the (tied) output head.
    read = weights - sizes.get("token_embd.weight", 0) if "output.weight" in sizes else weights
    return {"arch": arch, "weights_bytes": weights, "weights_read_bytes": read, "kv_bytes_per_token": kv_per_token,
            "state_bytes": state,
            "attention_layers": sum(1 for n in kv_heads if n), "layers": layers}


def decode_round(llm, tokens: list[int]) -> float:
    """Seconds per token over single-token steps continuing the model's current sequence. The tokens are given
    (the same for every model), not sampled: a step's cost does not depend on which token it reads."""
    start = time.perf_counter()
    for token in tokens:
        llm.eval([token])
    return (time.perf_counter() - start) / len(tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=PATH.gguf (give two or more)")
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON report (an existing one gains these contexts)")
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds to wait between the prefills and the timed rounds (time to quiet the machine: the "
                        "long prefills need not run alone, the rounds must)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = dict(m.split("=", 1) for m in args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    info = {name: geometry(Path(path)) for name, path in models.items()}
    report = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    report.update({"models": {n: {"path": str(models[n]), **info[n]} for n in models}, "threads": args.threads,
                   "new_tokens_per_round": args.new_tokens, "rounds": args.rounds,
                   "command": "python " + " ".join(sys.argv)})
    results = report.setdefault("contexts", {})
    rng = np.random.default_rng(0)
    for context in contexts:
        llms, prefill = {}, {}
        ids = rng.integers(100, 30000, size=context).tolist()  # ids every vocabulary here has
        for name, path in models.items():
            llm = open_gguf(path, n_ctx=context + args.new_tokens * (args.rounds + 1) + 8, threads=args.threads)
            start = time.perf_counter()
            llm.eval(ids)
            prefill[name] = time.perf_counter() - start
            llms[name] = llm
            logger.info("%s: prefill of %d tokens in %.1f s", name, context, prefill[name])
        if args.settle:
            logger.info("prefills done; timed rounds start in %.0f s", args.settle)
            time.sleep(args.settle)
        times: dict[str, list[float]] = {n: [] for n in models}
        for r in range(args.rounds):
            step_ids = rng.integers(100, 30000, size=args.new_tokens).tolist()
            for name, llm in llms.items():
                times[name].append(decode_round(llm, step_ids))
            logger.info("context %d round %d: %s", context, r + 1, {n: round(1 / t[-1], 2) for n, t in times.items()})
        base = next(iter(models))
        rows = {}
        for name in models:
            g = info[name]
            read = g["weights_read_bytes"] + g["kv_bytes_per_token"] * context + g["state_bytes"]
            median = statistics.median(times[name])
            rows[name] = {"tokens_per_s": 1 / median, "median_s_per_token": median, "times_s_per_token": times[name],
                          "prefill_s": prefill[name], "bytes_read_per_token": read,
                          "bandwidth_bound_tokens_per_s": BANDWIDTH / read, "achieved_bytes_per_s": read / median,
                          "speedup_vs_" + base: statistics.median(times[base]) / median}
            print(f"{context:>6} {name:<16}{1 / median:>8.2f} tok/s  x{rows[name]['speedup_vs_' + base]:.3f}"
                  f"  bound {BANDWIDTH / read:>7.1f} tok/s  ({read / 1e6:.0f} MB/token, {read / median / 1e9:.1f} GB/s)")
        results[str(context)] = rows
        for llm in llms.values():
            llm.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
