"""Which initialisation of the new mixers lets KL-only targeted distillation go down from its first step?

Every candidate keeps the property "the fresh hybrid computes exactly what the skip-draft computes" (its
mixers output exactly zero); they differ in where the zero sits and so in what the first optimiser steps
do. One conversion of the default model per candidate, the same layers, data, seed and distillation
settings (`rad distill`'s defaults with the alignment term off), held-out KL to the teacher after every
step. Candidates (applied to a hybrid converted with the literal paper init, in_proj = 0):

  zero_in_proj     the paper's literal init: in_proj = 0, gated-norm weight 1 (the `rad` init before this
                   comparison, now `--init rad-zero-in-proj`; the first update of z is normalised to full
                   size by the gated RMSNorm)
  small_norm       in_proj = 0, gated-norm weight 0.01 (the same jump, 100x smaller)
  zero_norm        in_proj at mamba_ssm's default random init, gated-norm weight 0 (the zero moves to the
                   end of the mixer: its output grows linearly with the norm weight)
  zero_norm_v      zero_norm with the x rows of in_proj copied from v_proj (per head, repeated over GQA
                   groups), so the SSM starts by mixing what attention mixed
  zero_norm_x30/_x100, zero_norm_v_x100
                   the same with the gains at 30x / 100x lr (`mixer_norm_lr_scale`); zero_norm_x100 was
                   `--init rad` until the next row was measured
  gain_0.1_x100, gain_0.3_x100
                   in_proj = 0 as in the paper, gated-norm weight 0.1 / 0.3, gains at 100x lr: the first update
                   writes in_proj in the gradient's direction as the paper's does, and the gain caps the jump
                   the gated RMSNorm makes of it; gain_0.1_x100 is the chosen one, `--init rad`

    python bench/init_comparison.py --out docs/bench_init.json --plot docs/bench_init.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from rad.distill import DistillConfig, run_distill
from rad.distill.data import DataConfig
from rad.distill.objective import LossWeights
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid
from rad.models.layers import decoder_layers, parse_layers
from rad.models.loading import load_model

logger = logging.getLogger("bench.init_comparison")
REPORT_STEPS = (0, 1, 2, 4, 8, 16, 32)


@torch.no_grad()
def _random_in_proj(mixer: nn.Module, generator: torch.Generator) -> None:
    nn.init.kaiming_uniform_(mixer.in_proj.weight, a=math.sqrt(5), generator=generator)


@torch.no_grad()
def _v_into_x(mixer: nn.Module, attention: nn.Module, num_kv_heads: int) -> None:
    heads, head_dim, d_inner = mixer.num_heads, mixer.head_dim, mixer.intermediate_size
    v = attention.v_proj.weight
    per_group = heads // num_kv_heads
    for h in range(heads):
        kv = h // per_group
        mixer.in_proj.weight[d_inner + h * head_dim: d_inner + (h + 1) * head_dim].copy_(
            v[kv * head_dim: (kv + 1) * head_dim])


@torch.no_grad()
def apply_candidate(name: str, hybrid, source, layers: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    src_blocks, dst_blocks = decoder_layers(source), decoder_layers(hybrid)
    for i in layers:
        mixer, attention = dst_blocks[i].mamba, src_blocks[i].self_attn
        if name == "zero_in_proj":
            continue
        if name == "small_norm":
            mixer.norm.weight.fill_(0.01)
            continue
        if name.startswith("gain_"):
            mixer.norm.weight.fill_(float(name.split("_")[1]))
            continue
        _random_in_proj(mixer, generator)
        if name.startswith("zero_norm_v"):
            _v_into_x(mixer, attention, source.config.num_key_value_heads)
        mixer.norm.weight.zero_()


CANDIDATES = ("zero_in_proj", "small_norm", "zero_norm", "zero_norm_v", "zero_norm_x30", "zero_norm_x100",
              "zero_norm_v_x100", "gain_0.1_x100", "gain_0.3_x100")
CHOSEN = "gain_0.1_x100"
INIT_NAMES = {"gain_0.1_x100": "rad", "zero_in_proj": "rad-zero-in-proj"}
NORM_LR_SCALE = {"zero_norm_x30": 30.0, "zero_norm_x100": 100.0, "zero_norm_v_x100": 100.0,
                 "gain_0.1_x100": 100.0, "gain_0.3_x100": 100.0}


def run_candidate(name: str, args, loaded, layers: list[int], work: Path) -> dict:
    """Convert, apply the candidate, distil KL-only; the held-out KL at REPORT_STEPS."""
    # The literal paper init with the geometry of the time, then the candidate's change (`zero_norm_x100` is
    # what `--init rad` now does in one step).
    conversion = ConversionConfig(layers=layers, init="rad-zero-in-proj", n_groups="heads", seed=args.seed)
    hybrid = convert_to_hybrid(loaded.model, conversion)
    apply_candidate(name, hybrid, loaded.model, layers, args.seed)
    folder = work / f"hybrid-{name}"
    record = conversion_record(args.model, loaded.model, conversion)
    save_hybrid(hybrid, loaded.tokenizer, folder, record, overwrite=True)
    del hybrid
    out = work / f"distill-{name}"
    config = DistillConfig(
        hybrid=str(folder), out=str(out), train="mixers", steps=args.steps,
        data=DataConfig(seq_len=args.seq_len, eval_examples=args.eval_sequences, seed=args.seed),
        micro_batch=args.micro_batch, loss=LossWeights(kl=1.0), eval_every=args.steps,
        eval_at=tuple(s for s in REPORT_STEPS if s <= args.steps), eval_sequences=args.eval_sequences,
        save_every=0, seed=args.seed, progress=False, tensorboard=False, plots=False, device="cpu",
        lr=args.lr, mixer_norm_lr_scale=NORM_LR_SCALE.get(name, 1.0),
    )
    start = time.perf_counter()
    run_distill(config)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    kl = {r["step"]: r["eval_kl"] for r in records if r.get("kind") == "eval"}
    train = {r["step"]: r for r in records if r.get("kind") == "train"}
    return {"eval_kl": {str(s): kl[s] for s in sorted(kl)}, "seconds": seconds, "lr": config.lr,
            "warmup_ratio": config.warmup_ratio,
            "grad_norm": {str(s): train[s].get("grad_norm") for s in sorted(train)}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results["candidates"].items():
        steps = [int(s) for s in r["eval_kl"]]
        chosen = name == CHOSEN
        ax.plot(steps, list(r["eval_kl"].values()), marker="o", ms=3, lw=2.5 if chosen else 1.2,
                label=f"{name} (--init {INIT_NAMES[name]})" if name in INIT_NAMES else name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out KL(teacher ‖ student)")
    ax.set_title(f"{results['model']}, layers {results['layers']}: KL-only targeted distillation")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="4,9,14,19,24")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default: rad distill's default for --train mixers")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench_init.json")
    p.add_argument("--plot", default="docs/bench_init.png")
    args = p.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    layers = parse_layers(args.layers, loaded.model.config.num_hidden_layers)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(model=args.model, layers=layers, steps=args.steps, seq_len=args.seq_len,
                   micro_batch=args.micro_batch, seed=args.seed,
                   command="python bench/init_comparison.py " + " ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))
    results.setdefault("candidates", {})
    with tempfile.TemporaryDirectory(prefix="rad-init-") as work:
        for name in args.candidates.split(","):
            logger.info("candidate %s", name)
            results["candidates"][name] = run_candidate(name, args, loaded, layers, Path(work))
            results["candidates"][name]["command"] = results["command"]
            out.write_text(json.dumps(results, indent=2))
            logger.info("%s: %s", name, {s: round(v, 4) for s, v in results["candidates"][name]["eval_kl"].items()
                                         if int(s) in REPORT_STEPS})
    plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
