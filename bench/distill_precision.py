"""Distillation step time in fp32 vs bf16, and the two bf16 designs, on one fixed batch.

Variants (interleaved A B C A B C over repeats so machine noise hits all alike; medians reported):
  fp32            float32 weights, no autocast (what `--precision fp32` runs)
  bf16_autocast   design 1: float32 weights, torch.autocast(bf16) around student and teacher forwards
  bf16_frozen     design 2: frozen weights (teacher's and the student's, shared in self-distillation) stored in
                  bf16 once, trainable weights float32, autocast for the mixed products (what `--precision
                  bf16` runs)
Each step is the product's: teacher forward (no grad) + student forward + fused KL (+ alignment) + backward +
AdamW, via rad.distill's own objective. `--train` picks what trains (mixers | all).

    python bench/distill_precision.py --model qwen2.5-coder-0.5b --layers 4,7,18,22 --train mixers \\
        --batch 4 --seq-len 256 --repeats 3 --out docs/bench_distill_precision.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rad.distill.config import DistillConfig
from rad.distill.models import load_models
from rad.distill.modules import replaced_attention_layers
from rad.distill.objective import DistillObjective
from rad.utils.precision import bf16_features, compute_dtype, store_frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_step import make_batch, make_hybrid  # noqa: E402

logger = logging.getLogger("bench.distill_precision")
VARIANTS = ("fp32", "bf16_autocast", "bf16_frozen")


class Variant:
    """One precision design: `step()` runs one distillation step on the fixed batch."""

    def __init__(self, name: str, hybrid_dir: Path, train: str, device: torch.device, batch: dict):
        self.name, self.batch, self.device = name, batch, device
        cfg = DistillConfig(hybrid=str(hybrid_dir), out="unused", train=train, device=str(device))
        self.models = load_models(cfg, device)
        self.models.student.train()
        self.compute = torch.float32 if name == "fp32" else torch.bfloat16
        if name == "bf16_frozen":
            store_frozen([self.models.student, self.models.teacher], torch.bfloat16)
        self.objective = DistillObjective(self.models.student, self.models.teacher, cfg.loss,
                                          replaced_attention_layers(self.models.teacher, self.models.student))
        params = [p for p in self.models.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5)

    def step(self) -> float:
        b = self.batch
        with compute_dtype(self.compute, self.device):
            terms = self.objective(b["ids"], b["att"], b["att"])
        loss = terms["loss_sum"] / b["att"][:, 1:].sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--layers", default="4,7,18,22", help="layers converted to Mamba2 (rad init)")
    p.add_argument("--train", default="mixers", choices=["mixers", "mixers+mlp", "all"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--hybrid-dir", default=None, help="an existing hybrid (else converted into a temp folder)")
    p.add_argument("--out", default=None, help="JSON report; an existing one gains this --train's results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    from rad.utils.devices import default_device

    device = torch.device(args.device) if args.device else default_device()
    with tempfile.TemporaryDirectory() as tmp:
        hybrid_dir = Path(args.hybrid_dir) if args.hybrid_dir else Path(tmp) / "hybrid"
        if not args.hybrid_dir:
            make_hybrid(args.model, args.layers, hybrid_dir, device)
        batch = make_batch(args.model, args.batch, args.seq_len, device)
        names = [n for n in args.variants.split(",") if n]
        variants = {n: Variant(n, hybrid_dir, args.train, device, batch) for n in names}
        losses = {n: [v.step() for _ in range(args.warmup)] for n, v in variants.items()}
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeats):
            for n, v in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                losses[n].append(v.step())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[n].append(time.perf_counter() - t0)
            logger.info("repeat %d: %s", r + 1, {n: round(t[-1], 2) for n, t in times.items()})
    tokens = int(batch["att"].sum())
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    results = {n: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t),
                   "speedup_vs_fp32": base / statistics.median(t) if base else None, "times_s": t,
                   "losses": losses[n]} for n, t in times.items()}
    run = {"train": args.train, "tokens_per_step": tokens, "repeats": args.repeats, "results": results,
           "command": "python " + " ".join(sys.argv)}
    for n, r in results.items():
        print(f"{args.train:<8}{n:<15}{r['median_s']:>9.2f} s{r['tokens_per_s']:>9.1f} tok/s"
              f"{(r['speedup_vs_fp32'] or 0):>7.2f}x")
    if args.out:
        out = Path(args.out)
        report = json.loads(out.read_text()) if out.exists() else {}
        report.update({"model": args.model, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
                       "device": str(device), "bf16_features": bf16_features(device),
                       "threads": torch.get_num_threads(), "torch": torch.__version__})
        report.setdefault("runs", {})[args.train] = run
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
