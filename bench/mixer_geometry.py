"""How heavy must a replacement mixer be? Bytes per decoded token, and KL after a fixed budget, per geometry.

Part 1 (`--sizes`, instant, from the model's config alone): for each geometry, one mixer's parameters next
to the attention it replaces, and the bytes a hybrid with k converted layers reads per decoded token at
batch size 1 (the bandwidth model of docs/benchmarks.md: weights + KV cache x context + 2 x SSM state), with
the context beyond which it reads fewer bytes than the teacher.

Part 2 (`--steps 32,128 --seeds 0,1`): one conversion per geometry and seed (`rad` init, the same layers),
one KL-only targeted distillation of max(steps) steps with `rad distill`'s defaults (lr, warm-up, cosine
over the whole run, the init's gated-norm lr), held-out KL read at every given step count (so the 32-step
value is mid-schedule). Slow on a CPU (~5 s a step for the default model at 2 x 128 tokens on 2 cores).

    python bench/mixer_geometry.py --sizes --out docs/bench_geometry.json
    python bench/mixer_geometry.py --steps 32,128 --seeds 0,1 --micro-batch 2 --eval-sequences 32 \
        --out docs/bench_geometry.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from rad.models.attention import attention_parameters, head_dim_of
from rad.models.mixers.mamba2 import resolve_geometry

logger = logging.getLogger("bench.mixer_geometry")
GEOMETRIES = {"heads/head_dim": ("heads", None), "kv/head_dim": ("kv", None), "kv/half": ("kv", "half"),
              "1/head_dim": (1, None)}  # one group: the layout mamba_ssm defaults to, and exact in transformers 4.x


def _resolve(config, name: str):
    groups, state = GEOMETRIES[name]
    return resolve_geometry(config, groups, state)


def sizes(config, k: int, contexts=(256, 2048, 8192), element_bytes: int = 4) -> dict:
    """Bytes per decoded token of the teacher and of a k-layer hybrid per geometry (fp32, tied head read once)."""
    layers, hd = config.num_hidden_layers, head_dim_of(config)
    embed = config.vocab_size * config.hidden_size
    attn = attention_parameters(config, bias=config.model_type == "qwen2")
    mlp = 3 * config.hidden_size * config.intermediate_size
    norms = (2 * layers + 1) * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    teacher_params = embed + head + layers * (attn + mlp) + norms
    kv_per_layer = 2 * config.num_key_value_heads * hd * element_bytes

    def per_token(weights: int, kv_layers: int, state: int, ctx: int) -> float:
        # weights once (+ one embedding row for the lookup), KV read at this context, SSM state read and written
        return (weights + config.hidden_size) * element_bytes + kv_layers * kv_per_layer * ctx + 2 * state

    out = {"teacher": {"parameters": teacher_params, "bytes_per_token": {
        str(c): per_token(teacher_params, layers, 0, c) for c in contexts}}}
    for name in GEOMETRIES:
        g = _resolve(config, name)
        params = teacher_params + k * (g.parameters() - attn)
        state = k * g.state_bytes(element_bytes)
        row = {"n_groups": g.n_groups, "d_state": g.d_state, "mixer_parameters": g.parameters(),
               "attention_parameters": attn, "mixer_over_attention": g.parameters() / attn, "parameters": params,
               "state_bytes": state,
               "bytes_per_token": {str(c): per_token(params, layers - k, state, c) for c in contexts}}
        extra = (params - teacher_params) * element_bytes + 2 * state  # what the hybrid reads more per token
        saved = k * kv_per_layer  # per token of context
        row["break_even_context"] = max(0, -(-extra // saved))
        out[name] = row
    return out


def kl_curve(config_args, name: str, steps: list[int], seed: int, loaded, layers: list[int], work: Path) -> dict:
    from rad.distill import DistillConfig, run_distill
    from rad.distill.data import DataConfig
    from rad.distill.objective import LossWeights
    from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid

    groups, state = GEOMETRIES[name]
    conversion = ConversionConfig(layers=layers, init="rad", n_groups=groups, d_state=state, seed=seed)
    hybrid = convert_to_hybrid(loaded.model, conversion)
    folder = work / f"hybrid-{name.replace('/', '-')}-{seed}"
    save_hybrid(hybrid, loaded.tokenizer, folder, conversion_record(config_args.model, loaded.model, conversion),
                overwrite=True)
    del hybrid
    out = work / f"distill-{name.replace('/', '-')}-{seed}"
    config = DistillConfig(
        hybrid=str(folder), out=str(out), train="mixers", steps=max(steps),
        data=DataConfig(seq_len=config_args.seq_len, eval_examples=config_args.eval_sequences, seed=seed),
        micro_batch=config_args.micro_batch, loss=LossWeights(kl=1.0), eval_every=max(steps),
        eval_at=tuple(steps),
        eval_sequences=config_args.eval_sequences, save_every=0, seed=seed, progress=False, tensorboard=False,
        plots=False, device="cpu",
    )
    run_distill(config)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    kl = {r["step"]: r["eval_kl"] for r in records if r.get("kind") == "eval"}
    return {"kl_step0": kl[0], **{f"kl_{n}": kl[n] for n in steps}, "mixer_parameters":
            conversion_record(config_args.model, loaded.model, conversion).geometry["mixer_parameters"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--k", type=int, default=15, help="converted layers for the size table")
    p.add_argument("--sizes", action="store_true", help="only the size table (no training)")
    p.add_argument("--layers", default="4,9,14,19,24", help="layers converted for the KL runs")
    p.add_argument("--steps", default="32,128")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--geometries", default=",".join(GEOMETRIES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--out", default="docs/bench_geometry.json")
    args = p.parse_args()
    from rad.models.loading import load_model

    loaded = load_model(args.model, device="cpu", dtype="float32")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["sizes"] = {"model": args.model, "k": args.k, **sizes(loaded.model.config, args.k)}
    results["sizes_command"] = f"python bench/mixer_geometry.py --sizes --model {args.model} --k {args.k}"
    out.write_text(json.dumps(results, indent=2))
    for name, row in results["sizes"].items():
        if isinstance(row, dict) and "bytes_per_token" in row:
            logger.info("%-15s %s", name, {c: f"{b / 1e6:.1f} MB" for c, b in row["bytes_per_token"].items()})
    if args.sizes:
        return
    from rad.models.layers import parse_layers

    layers = parse_layers(args.layers, loaded.model.config.num_hidden_layers)
    runs = results.setdefault("kl", {})
    settings = {"layers": layers, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                "eval_sequences": args.eval_sequences, "init": "rad", "loss": "KL only", "steps": args.steps,
                "command": f"python bench/mixer_geometry.py --steps {args.steps} --seeds {args.seeds} --layers "
                           f"{args.layers} --micro-batch {args.micro_batch} --eval-sequences {args.eval_sequences}"}
    comparable = {k: v for k, v in settings.items() if k != "command"}  # a run with other seeds adds rows
    if {k: v for k, v in results.get("kl_settings", {}).items() if k != "command"} != comparable:
        runs.clear()  # measured under other settings: not comparable
    results["kl_settings"] = settings
    steps = sorted(map(int, args.steps.split(",")))
    with tempfile.TemporaryDirectory(prefix="rad-geometry-") as work:
        for seed in map(int, args.seeds.split(",")):
            for name in args.geometries.split(","):
                key = f"{name}|{seed}"
                if key in runs:
                    continue
                runs[key] = kl_curve(args, name, steps, seed, loaded, layers, Path(work))
                logger.info("%s: %s", key, runs[key])
                out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
