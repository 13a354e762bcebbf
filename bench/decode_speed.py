"""Greedy decoding speed and cache memory vs context length: the default model and its Bamba hybrids.

For each context length (default 256, 2048, 8192) the prompt is `context - new_tokens` random token ids,
so the last decoded token sits at position `context - 1` and a StaticCache sized `context` is exactly full
at the end. Only the `new_tokens` single-token decode steps are timed (prefill is timed separately).

Variants run interleaved (for each repeat, for each context: teacher, hybrid-8, hybrid-15, each with a
static and a dynamic cache), so machine noise hits all of them alike; the summary reports medians over
repeats, the ratio to the teacher with a static cache at the same context, and the fraction of a
memory-bandwidth bound:

    bound tok/s = copy bandwidth / bytes moved per decoded token
    bytes per token = weights read (all parameters once; a tied embedding counts once, as the lm_head read,
                      plus one embedding row for the lookup)
                    + KV cache read (kv_bytes_per_token x context)
                    + SSM state read and written (2 x ssm_state_bytes)

The copy bandwidth is measured in the same run with `dst.copy_(src)` on two 256 MiB float32 tensors and
counts read + write bytes (2 x size / time): ~27 GB/s on a quiet 2-thread machine, which with 0.54 GB of
float32 weights gives ~50 tok/s for SmolLM2-135M at short context. A read-only estimate (`src.sum()`) is
reported as well, with the bound it would give, but the headline bound uses the copy figure.

    .venv/bin/python bench/decode_speed.py --out docs/bench_decode.json    # the full run (~10-15 min, 2 cores)
    .venv/bin/python bench/decode_speed.py --check                         # manual loop == generate()
    .venv/bin/python bench/decode_speed.py --quick --out /tmp/quick.json   # does the script work (~1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from rad.decoding.cache import DecodeCache
from rad.decoding.runner import FastDecoder

logger = logging.getLogger("bench.decode_speed")

MiB = 2**20
TEACHER = "teacher"


# ---------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One model under test: the teacher, or a hybrid with `converted` layers turned into Mamba2."""

    name: str
    model: torch.nn.Module
    converted: list[int]
    info: dict
    bytes: dict = field(default_factory=dict)  # weights_read, kv_per_token, ssm_state

    def bytes_per_token(self, context: int) -> int:
        b = self.bytes
        return b["weights_read"] + b["kv_per_token"] * context + 2 * b["ssm_state"]


def parse_variant(name: str, num_layers: int) -> int:
    """'teacher' -> 0 converted layers, 'hybrid-K' -> K."""
    if name == TEACHER:
        return 0
    if name.startswith("hybrid-"):
        try:
            k = int(name.removeprefix("hybrid-"))
        except ValueError:
            k = -1
        if 0 < k <= num_layers:
            return k
    raise SystemExit(f"Unknown variant {name!r}: use 'teacher' or 'hybrid-K' with 0 < K <= {num_layers}.")


def weight_bytes_read(model: torch.nn.Module, info) -> int:
    """Bytes of parameters one decode step reads: every weight once, the embedding as one looked-up row.

    A tied embedding is read in full as the lm_head (counted once, inside parameters['embeddings']); an
    untied one contributes only the looked-up row while its separate lm_head is read in full.
    """
    elem = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    p = info.parameters
    hidden = model.config.hidden_size
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and p["lm_head"] == 0
    if tied:
        return (p["total"] + hidden) * elem
    return (p["total"] - p["embeddings"] + hidden) * elem


def build_variants(names: list[str], model_spec: str, init: str, dtype: str) -> list[Variant]:
    from rad.models.convert import ConversionConfig, convert_to_hybrid
    from rad.models.info import model_info
    from rad.models.layers import uniform_layers
    from rad.models.loading import load_model

    start = time.perf_counter()
    teacher = load_model(model_spec, device="cpu", dtype=dtype).model
    logger.info("Loaded %s in %.1f s (attention: %s)", model_spec, time.perf_counter() - start,
                teacher.config._attn_implementation)
    num_layers = teacher.config.num_hidden_layers
    variants = []
    for name in names:
        k = parse_variant(name, num_layers)
        if k == 0:
            model, layers = teacher, []
        else:
            layers = uniform_layers(k, num_layers)
            start = time.perf_counter()
            model = convert_to_hybrid(teacher, ConversionConfig(layers=layers, init=init))
            logger.info("Built %s (%s init, Mamba2 layers %s) in %.1f s", name, init, layers,
                        time.perf_counter() - start)
        model.eval()
        info = model_info(model)
        v = Variant(name=name, model=model, converted=layers, info=info.to_dict())
        v.bytes = {
            "weights_read": weight_bytes_read(model, info),
            "kv_per_token": info.kv_bytes_per_token,
            "ssm_state": info.ssm_state_bytes,
        }
        variants.append(v)
    return variants


# ------------------------------------------------------------------------------------------ bandwidth


def measure_bandwidth(size_mib: int = 256, repeats: int = 10) -> dict:
    """Copy bandwidth (read + write bytes per second) and a read-only estimate (sum), medians, in GB/s."""
    n = size_mib * MiB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = src.nbytes
    for _ in range(2):  # fault the pages in, warm the allocator
        dst.copy_(src)
        src.sum()
    copy_s, read_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        read_s.append(time.perf_counter() - t)
    copy_med, read_med = statistics.median(copy_s), statistics.median(read_s)
    return {
        "size_bytes": nbytes,
        "copy_seconds": copy_s,
        "read_seconds": read_s,
        "copy_GBps": 2 * nbytes / copy_med / 1e9,  # read + write traffic
        "copy_read_side_GBps": nbytes / copy_med / 1e9,  # the same copies, counting the bytes read only
        "read_GBps": nbytes / read_med / 1e9,  # src.sum(): reads only
    }


# ------------------------------------------------------------------------------------------- decoding


def make_cache(kind: str, model: torch.nn.Module, max_len: int):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(kind)


def cache_tensor_bytes(cache) -> dict:
    """Bytes of the tensors a cache object holds: attention keys/values, Mamba2 conv and SSM states."""
    if isinstance(cache, DecodeCache):  # rad's cache is preallocated for the whole context
        kv = cache.keys.nbytes + cache.values.nbytes if cache.keys.shape[0] else 0
        ssm = cache.state_bytes()
        return {"kv": kv, "ssm": ssm, "total": kv + ssm}
    seen: set[int] = set()
    out = {"kv": 0, "ssm": 0}

    def add(kind: str, t) -> None:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[kind] += t.nbytes

    for layer in cache.layers:
        add("kv", getattr(layer, "keys", None))
        add("kv", getattr(layer, "values", None))
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for t in (states or {}).values():
                add("ssm", t)
    out["total"] = out["kv"] + out["ssm"]
    return out


def random_prompt(length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)


def prefill(model, prompt: torch.Tensor, cache_kind: str, max_len: int):
    """Run the prompt through the model into a fresh cache; returns (output, first greedy token)."""
    cache = make_cache(cache_kind, model, max_len)
    n = prompt.shape[1]
    out = model(
        input_ids=prompt,
        cache=cache,
        position_ids=torch.arange(n).unsqueeze(0),
        use_cache=True,
        logits_to_keep=1,
    )
    return out, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_step(model, out, tok: torch.Tensor, pos: int):
    """One greedy step: feed `tok` at position `pos`, return (output, next token).

    Positions are passed explicitly: Bamba's forward defaults `position_ids` to arange(seq_len), i.e. 0 on
    every decode step, rather than offsetting them by the cache length as Llama's does.
    """
    out = model(input_ids=tok, cache=out.cache, position_ids=torch.tensor([[pos]]), use_cache=True)
    return out, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def rad_greedy_decode(model, prompt: torch.Tensor, new_tokens: int, max_len: int) -> dict:
    """The same measurement on rad's fast decode path (rad.decoding.runner.FastDecoder)."""
    decoder = FastDecoder(model)
    t0 = time.perf_counter()
    cache = decoder.new_cache(max_len)
    tok = decoder.prefill(prompt, cache).argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - t0
    tokens, steps = [int(tok)], []
    for _ in range(new_tokens):
        t = time.perf_counter()
        logits, pending = decoder.forward(tok, cache)
        decoder.commit(cache, pending, 1)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t)
        tokens.append(int(tok))
    return {"prefill_s": prefill_s, "step_s": steps, "tokens": tokens, "cache": cache}


@torch.inference_mode()
def greedy_decode(model, prompt: torch.Tensor, cache_kind: str, new_tokens: int, max_len: int) -> dict:
    """Prefill `prompt`, then `new_tokens` single-token greedy steps, each timed."""
    if cache_kind == "rad":
        return rad_greedy_decode(model, prompt, new_tokens, max_len)
    t0 = time.perf_counter()
    out, tok = prefill(model, prompt, cache_kind, max_len)
    prefill_s = time.perf_counter() - t0
    tokens = [int(tok)]
    steps = []
    n = prompt.shape[1]
    for pos in range(n, n + new_tokens):
        t = time.perf_counter()
        out, tok = decode_step(model, out, tok, pos)
        steps.append(time.perf_counter() - t)
        tokens.append(int(tok))
    return {"prefill_s": prefill_s, "step_s": steps, "tokens": tokens, "cache": out.cache}


# ------------------------------------------------------------------------------------------- profiling


class ModuleTimer:
    """Wall time spent inside chosen modules, via forward pre/post hooks (CPU ops are synchronous)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start: dict[int, float] = {}
        self._handles: list = []
        self.enabled = False

    def attach(self, module: torch.nn.Module, label: str) -> None:
        key = id(module)

        def pre(_mod, _args):
            if self.enabled:
                self._start[key] = time.perf_counter()

        def post(_mod, _args, _out):
            if self.enabled:
                self.seconds[label] += time.perf_counter() - self._start.pop(key)
                self.calls[label] += 1

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_timers(model) -> ModuleTimer:
    """Top-level parts: embedding, attention, mamba2, mlp, norms, lm_head; plus the projections inside."""
    timer = ModuleTimer()
    base = model.model
    timer.attach(base.embed_tokens, "embedding")
    timer.attach(model.lm_head, "lm_head")
    final_norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
    timer.attach(final_norm, "norms")
    for layer in base.layers:
        for norm_name in ("input_layernorm", "post_attention_layernorm", "pre_ff_layernorm"):
            if hasattr(layer, norm_name):
                timer.attach(getattr(layer, norm_name), "norms")
        mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        timer.attach(mlp, "mlp")
        if hasattr(layer, "self_attn"):
            attn = layer.self_attn
            timer.attach(attn, "attention")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                timer.attach(getattr(attn, proj), "attention/qkvo_proj")
        if hasattr(layer, "mamba"):
            mixer = layer.mamba
            timer.attach(mixer, "mamba2")
            timer.attach(mixer.in_proj, "mamba2/in_proj")
            timer.attach(mixer.out_proj, "mamba2/out_proj")
            timer.attach(mixer.norm, "mamba2/gated_rmsnorm")
    return timer


@torch.inference_mode()
def profile_variant(variant: Variant, context: int, steps: int, cache_kind: str, seed: int, top: int) -> dict:
    """Where a decode step's time goes: per module family (hooks) and per aten op (torch.profiler)."""
    model = variant.model
    # One prefill, then three phases of `steps` decode steps each: plain (timed), with module hooks, and
    # under torch.profiler. The context grows by 3 x steps over the phases; it ends at `context`.
    prompt = random_prompt(context - 3 * steps, model.config.vocab_size, seed)
    greedy_decode(model, prompt[:, :16], cache_kind, 2, 18)  # warm-up
    out, tok = prefill(model, prompt, cache_kind, context)
    pos = prompt.shape[1]
    plain_s = []
    for _ in range(steps):
        t = time.perf_counter()
        out, tok = decode_step(model, out, tok, pos)
        plain_s.append(time.perf_counter() - t)
        pos += 1
    timer = attach_timers(model)
    try:
        timer.enabled = True
        step_s = []
        for _ in range(steps):
            t = time.perf_counter()
            out, tok = decode_step(model, out, tok, pos)
            step_s.append(time.perf_counter() - t)
            pos += 1
        timer.enabled = False
    finally:
        timer.remove()
    total_step_s = sum(step_s)
    per_step = {k: timer.seconds[k] / steps for k in timer.seconds}
    top_level = ["embedding", "attention", "mamba2", "mlp", "norms", "lm_head"]
    parts_ms = {k: 1e3 * per_step.get(k, 0.0) for k in top_level if k in per_step}
    parts_ms["other (masks, rotary, argmax, python glue)"] = 1e3 * total_step_s / steps - sum(parts_ms.values())
    step_ms = 1e3 * total_step_s / steps
    sub_ms = {}
    if "attention" in per_step:
        sub_ms["attention/qkvo_proj"] = 1e3 * per_step["attention/qkvo_proj"]
        sub_ms["attention/rope+cache_update+sdpa"] = 1e3 * (per_step["attention"] - per_step["attention/qkvo_proj"])
    if "mamba2" in per_step:
        for k in ("mamba2/in_proj", "mamba2/out_proj", "mamba2/gated_rmsnorm"):
            sub_ms[k] = 1e3 * per_step[k]
        sub_ms["mamba2/conv_update+ssm_state_update+glue"] = 1e3 * (
            per_step["mamba2"] - per_step["mamba2/in_proj"] - per_step["mamba2/out_proj"]
            - per_step["mamba2/gated_rmsnorm"]
        )
    n_attn = variant.info["layer_map"].count("attention")
    n_mamba = variant.info["layer_map"].count("mamba2")
    per_layer_ms = {}
    if n_attn:
        per_layer_ms["attention layer (mixer only)"] = parts_ms.get("attention", 0.0) / n_attn
    if n_mamba:
        per_layer_ms["mamba2 layer (mixer only)"] = parts_ms.get("mamba2", 0.0) / n_mamba
    per_layer_ms["mlp (per layer)"] = parts_ms.get("mlp", 0.0) / len(variant.info["layer_map"])

    # torch.profiler: aten ops per decode step (no hooks).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out, tok = decode_step(model, out, tok, pos)
            pos += 1
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    ops = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "variant": variant.name,
        "context": context,
        "cache": cache_kind,
        "steps": steps,
        "step_ms": step_ms,
        "parts_ms_per_step": parts_ms,
        "parts_fraction": {k: v / step_ms for k, v in parts_ms.items()},
        "sub_parts_ms_per_step": sub_ms,
        "per_layer_ms": per_layer_ms,
        "step_ms_without_hooks": 1e3 * sum(plain_s) / steps,
        "hook_note": "parts come from forward hooks (a few us each); step_ms is the mean step of that hooked phase, "
        "step_ms_without_hooks the mean of the plain phase just before it",
        "aten_calls_per_step": sum(e.count for e in aten) / steps,
        "top_aten_ops": [
            {
                "op": e.key,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in ops
        ],
    }


# ------------------------------------------------------------------------------------------- the run


def cache_kinds(arg: str) -> list[str]:
    named = {"both": ["static", "dynamic"], "all": ["static", "dynamic", "rad"]}
    kinds = named.get(arg, arg.split(","))
    bad = [k for k in kinds if k not in ("static", "dynamic", "rad")]
    if bad:
        raise SystemExit(f"Unknown cache kind {bad[0]!r}: use static, dynamic, rad (comma-separated), both or all.")
    return kinds


def run_benchmark(args, variants: list[Variant]) -> dict:
    contexts = args.contexts
    kinds = cache_kinds(args.cache)
    for c in contexts:
        if c <= args.new_tokens:
            raise SystemExit(f"Context {c} must be larger than --new-tokens {args.new_tokens}.")
    vocab = variants[0].model.config.vocab_size
    prompts = {c: random_prompt(c - args.new_tokens, vocab, args.seed + c) for c in contexts}
    bandwidth = [measure_bandwidth(args.bandwidth_mib)]
    logger.info("Copy bandwidth %.1f GB/s (read+write), read-only %.1f GB/s",
                bandwidth[0]["copy_GBps"], bandwidth[0]["read_GBps"])
    for v in variants:  # warm-up: allocator, thread pools, lazy inits
        for kind in kinds:
            greedy_decode(v.model, prompts[contexts[0]][:, :16], kind, 4, 20)
    runs = []
    total = args.repeats * len(contexts) * len(variants) * len(kinds)
    done = 0
    bench_start = time.perf_counter()
    for r in range(args.repeats):
        for c in contexts:
            for v in variants:
                for kind in kinds:
                    result = greedy_decode(v.model, prompts[c], kind, args.new_tokens, c)
                    actual = cache_tensor_bytes(result["cache"])
                    del result["cache"]
                    decode_s = sum(result["step_s"])
                    runs.append({
                        "repeat": r,
                        "context": c,
                        "variant": v.name,
                        "cache": kind,
                        "prompt_tokens": c - args.new_tokens,
                        "new_tokens": args.new_tokens,
                        "prefill_s": result["prefill_s"],
                        "decode_s": decode_s,
                        "s_per_token": decode_s / args.new_tokens,
                        "step_s": result["step_s"],
                        "cache_bytes_actual": actual,
                        "tokens": result["tokens"],
                    })
                    done += 1
                    logger.info("[%d/%d] repeat %d ctx %5d %-10s %-7s prefill %6.2f s  decode %6.1f tok/s",
                                done, total, r, c, v.name, kind, result["prefill_s"], args.new_tokens / decode_s)
        bandwidth.append(measure_bandwidth(args.bandwidth_mib))
        logger.info("Copy bandwidth after repeat %d: %.1f GB/s", r, bandwidth[-1]["copy_GBps"])
    logger.info("Benchmark loop took %.0f s", time.perf_counter() - bench_start)
    return {"runs": runs, "bandwidth": bandwidth}


def summarise(runs: list[dict], bandwidth: list[dict], variants: list[Variant]) -> dict:
    copy_gbps = statistics.median(b["copy_GBps"] for b in bandwidth)
    read_gbps = statistics.median(b["read_GBps"] for b in bandwidth)
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        by_key[(run["context"], run["variant"], run["cache"])].append(run)
    vmap = {v.name: v for v in variants}
    rows = []
    for (context, name, kind), group in by_key.items():
        v = vmap[name]
        s_tok = statistics.median(g["s_per_token"] for g in group)
        bpt = v.bytes_per_token(context)
        rows.append({
            "context": context,
            "variant": name,
            "cache": kind,
            "repeats": len(group),
            "s_per_token_median": s_tok,
            "tok_s": 1.0 / s_tok,
            "tok_s_per_repeat": [1.0 / g["s_per_token"] for g in group],
            "prefill_s_median": statistics.median(g["prefill_s"] for g in group),
            "bytes_per_token": bpt,
            "bytes_per_token_parts": {
                "weights": v.bytes["weights_read"],
                "kv": v.bytes["kv_per_token"] * context,
                "ssm_read_write": 2 * v.bytes["ssm_state"],
            },
            "bound_tok_s": copy_gbps * 1e9 / bpt,
            # DynamicCache appends with torch.cat, re-reading and re-writing every cached key/value each step.
            "bound_tok_s_as_implemented": copy_gbps * 1e9 / (
                bpt + (2 * v.bytes["kv_per_token"] * context if kind == "dynamic" else 0)
            ),
            "bound_tok_s_read_only_bw": read_gbps * 1e9 / bpt,
            "cache_bytes_actual": group[-1]["cache_bytes_actual"],
            "cache_bytes_analytic": {
                "kv": v.bytes["kv_per_token"] * context,
                "ssm": v.bytes["ssm_state"],
                "total": v.bytes["kv_per_token"] * context + v.bytes["ssm_state"],
            },
        })
    ref = {(r["context"]): r["tok_s"] for r in rows if r["variant"] == TEACHER and r["cache"] == "static"}
    for r in rows:
        r["fraction_of_bound"] = r["tok_s"] / r["bound_tok_s"]
        r["vs_teacher_static"] = r["tok_s"] / ref[r["context"]] if r["context"] in ref else None
    order = {v.name: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (r["context"], order[r["variant"]], r["cache"] != "static"))
    # Context above which a hybrid moves fewer bytes per token than the teacher (its mixers hold more
    # weights than the attention they replace, so it starts behind).
    teacher = vmap.get(TEACHER)
    breakeven = {}
    for v in variants:
        if teacher is None or v is teacher or v.bytes["kv_per_token"] >= teacher.bytes["kv_per_token"]:
            continue
        extra = v.bytes["weights_read"] + 2 * v.bytes["ssm_state"] - teacher.bytes["weights_read"]
        breakeven[v.name] = extra / (teacher.bytes["kv_per_token"] - v.bytes["kv_per_token"])
    # Same prompt, same model: the static and the dynamic cache must decode the same greedy tokens.
    tokens = defaultdict(dict)
    for run in runs:
        tokens[(run["repeat"], run["context"], run["variant"])][run["cache"]] = run["tokens"]
    disagree = [list(k) for k, t in tokens.items() if len({tuple(x) for x in t.values()}) > 1]
    if disagree:
        logger.warning("Static and dynamic caches decoded different tokens for %s", disagree)
    return {
        "copy_GBps_median": copy_gbps,
        "read_GBps_median": read_gbps,
        "bytes_breakeven_context": breakeven,
        "static_dynamic_token_mismatches": disagree,
        "rows": rows,
    }


def markdown_table(summary: dict) -> str:
    lines = [
        f"Copy bandwidth (read+write) {summary['copy_GBps_median']:.1f} GB/s; "
        f"read-only {summary['read_GBps_median']:.1f} GB/s. Bound = copy bandwidth / bytes per token.",
        "Context above which a hybrid moves fewer bytes per token than the teacher: "
        + (", ".join(f"{k} {v:.0f}" for k, v in summary["bytes_breakeven_context"].items()) or "-"),
        "",
        "| context | variant | cache | tok/s | x teacher (static) | bound tok/s | % of bound | MB/token "
        "| cache MiB (actual) | KV+SSM MiB (analytic) | prefill s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        ratio = f"{r['vs_teacher_static']:.2f}" if r["vs_teacher_static"] is not None else "-"
        lines.append(
            f"| {r['context']} | {r['variant']} | {r['cache']} | {r['tok_s']:.1f} | {ratio} "
            f"| {r['bound_tok_s']:.1f} | {100 * r['fraction_of_bound']:.0f}% | {r['bytes_per_token'] / 1e6:.0f} "
            f"| {r['cache_bytes_actual']['total'] / MiB:.1f} | {r['cache_bytes_analytic']['total'] / MiB:.1f} "
            f"| {r['prefill_s_median']:.2f} |"
        )
    return "\n".join(lines)


def profile_table(profiles: list[dict]) -> str:
    lines = []
    for p in profiles:
        lines.append(f"\nWhere a decode step goes: {p['variant']}, context {p['context']}, {p['cache']} cache "
                     f"({p['step_ms']:.1f} ms/step with hooks, {p['step_ms_without_hooks']:.1f} without; "
                     f"{p['aten_calls_per_step']:.0f} aten calls/step)")
        lines.append("| part | ms/step | share |")
        lines.append("|---|---:|---:|")
        for k, ms in p["parts_ms_per_step"].items():
            lines.append(f"| {k} | {ms:.2f} | {100 * p['parts_fraction'][k]:.0f}% |")
        for k, ms in p["sub_parts_ms_per_step"].items():
            lines.append(f"| &nbsp;&nbsp;{k} | {ms:.2f} | {100 * ms / p['step_ms']:.0f}% |")
        for k, ms in p["per_layer_ms"].items():
            lines.append(f"| per layer: {k} | {ms:.3f} | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- check


def run_check(args, variants: list[Variant]) -> dict:
    """The manual loop's greedy tokens (static and dynamic cache) must equal model.generate(do_sample=False)."""
    from rad.models.convert import ConversionConfig, convert_to_hybrid
    from rad.models.info import model_info
    from rad.models.layers import uniform_layers

    teacher = next(v for v in variants if v.name == TEACHER).model
    models = [(v.name + f" ({args.init} init)" if v.converted else v.name, v.model) for v in variants]
    # rad init zeroes in_proj, so its mixers output exactly 0 and never exercise the conv/SSM state;
    # a 'mil' hybrid does, so check one too.
    k = max((len(v.converted) for v in variants), default=0) or 15
    mil = convert_to_hybrid(teacher, ConversionConfig(layers=uniform_layers(k, teacher.config.num_hidden_layers), init="mil"))
    models.append((f"hybrid-{k} (mil init)", mil))
    context, new_tokens = args.check_context, args.check_new_tokens
    prompt = random_prompt(context - new_tokens, teacher.config.vocab_size, args.seed)
    results, ok = [], True
    for name, model in models:
        with torch.inference_mode():
            gen = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens + 1,
                do_sample=False,
                pad_token_id=0,
            )[0, prompt.shape[1]:].tolist()
        row = {"model": name, "generate": gen}
        for kind in ("static", "dynamic"):
            out = greedy_decode(model, prompt, kind, new_tokens, context)
            mine = out["tokens"][: len(gen)]  # generate may stop at EOS
            row[kind] = out["tokens"]
            row[f"{kind}_matches"] = mine == gen
            ok &= mine == gen
            actual = cache_tensor_bytes(out["cache"])
            info = model_info(model)
            analytic = info.kv_bytes_per_token * context + info.ssm_state_bytes
            row[f"{kind}_cache_bytes"] = actual["total"]
            if kind == "static":
                row["static_cache_bytes_equal_analytic"] = actual["total"] == analytic
                ok &= actual["total"] == analytic
        # The pitfall the loop avoids: without explicit positions Bamba decodes every step at position 0.
        if hasattr(model.model, "final_layernorm"):
            row["without_position_ids_matches"] = _decode_without_positions(model, prompt, new_tokens) == gen
        results.append(row)
        logger.info("check %-24s static %s dynamic %s%s", name,
                    "OK" if row["static_matches"] else "MISMATCH", "OK" if row["dynamic_matches"] else "MISMATCH",
                    "" if "without_position_ids_matches" not in row
                    else f" (without position_ids: {'same' if row['without_position_ids_matches'] else 'differs'})")
    return {"ok": ok, "context": context, "new_tokens": new_tokens, "results": results}


@torch.inference_mode()
def _decode_without_positions(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    out = model(input_ids=prompt, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(tok)]
    for _ in range(new_tokens):
        out = model(input_ids=tok, cache=out.cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
    return tokens


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the teacher (default: smollm2-135m)")
    p.add_argument("--variants", "--models", default="teacher,hybrid-8,hybrid-15",
                   help="comma-separated: teacher, hybrid-K (K of the layers converted, uniformly spaced)")
    p.add_argument("--contexts", default="256,2048,8192", help="comma-separated context lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--cache", default="all",
                   help="transformers' StaticCache / DynamicCache loops, rad's fast decode path, or several")
    p.add_argument("--init", default="rad", help="hybrid mixer init (speed does not depend on it)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-mib", type=int, default=256, help="size of each tensor in the copy test")
    p.add_argument("--profile-variant", default="hybrid-15", help="also profiled: the teacher ('' to skip)")
    p.add_argument("--profile-context", type=int, default=2048)
    p.add_argument("--profile-steps", type=int, default=16)
    p.add_argument("--profile-cache", choices=["static", "dynamic"], default="static")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-only", action="store_true", help="skip the benchmark loop, only profile")
    p.add_argument("--check", action="store_true",
                   help="only check the manual decode loop against model.generate (greedy) and exit")
    p.add_argument("--check-context", type=int, default=64)
    p.add_argument("--check-new-tokens", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="tiny settings, to see that the script works")
    p.add_argument("--out", type=Path, default=None, help="JSON file with every raw timing and the summary")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.new_tokens, args.repeats = "64,160", 4, 1
        args.bandwidth_mib, args.profile_context, args.profile_steps = 32, 160, 4
    args.contexts = [int(c) for c in str(args.contexts).split(",") if c.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if TEACHER not in args.variants:
        args.variants.insert(0, TEACHER)  # ratios need it
    return args


def environment() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = environment()
    logger.info("torch %s, transformers %s, %d threads, %s", env["torch"], env["transformers"],
                env["torch_threads"], env["cpu"])
    load = env["load_average_at_start"]
    if load and load[0] > 0.5 and not args.check:
        logger.warning("Load average %.1f on %d CPUs: other processes are running, so timings will be noisy "
                       "(with every core busy, torch's OpenMP threads can slow down 10x or more).",
                       load[0], env["cpu_count"])
    variants = build_variants(args.variants, args.model, args.init, args.dtype)
    report: dict = {"environment": env, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}}
    report["variants"] = {
        v.name: {"converted_layers": v.converted, "bytes": v.bytes, "info": v.info} for v in variants
    }
    if args.check:
        check = run_check(args, variants)
        report["check"] = check
        _write(args.out, report)
        print(f"check: {'OK' if check['ok'] else 'FAILED'}: manual greedy loop vs model.generate, "
              f"context {check['context']}, {check['new_tokens']} new tokens")
        return 0 if check["ok"] else 1

    if not args.profile_only:
        measured = run_benchmark(args, variants)
        report.update(measured)
        report["summary"] = summarise(measured["runs"], measured["bandwidth"], variants)
    profiles = []
    if not args.no_profile and args.profile_variant:
        names = [TEACHER, args.profile_variant] if args.profile_variant != TEACHER else [TEACHER]
        for name in names:
            v = next((v for v in variants if v.name == name), None)
            if v is None:
                logger.warning("Profile variant %s is not among --variants; skipped.", name)
                continue
            logger.info("Profiling %s at context %d (%d steps)", name, args.profile_context, args.profile_steps)
            profiles.append(profile_variant(v, args.profile_context, args.profile_steps, args.profile_cache,
                                            args.seed, top=20))
    report["where_the_time_goes"] = profiles
    _write(args.out, report)
    if "summary" in report:
        print(markdown_table(report["summary"]))
    if profiles:
        print(profile_table(profiles))
    return 0


def _write(path: Path | None, report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    logger.info("Wrote %s", path)


if __name__ == "__main__":
    sys.exit(main())
