"""Cost of one distillation step on the default model, against a plain teacher forward+backward.

Variants (same batch, interleaved over repeats so machine noise hits all alike; medians reported):
  teacher_fwd_bwd   the source model, CE loss, forward + backward through every weight (reference cost)
  mixers_shared     RAD: train only the Mamba2 mixers; the teacher shares the student's frozen tensors
  mixers_separate   the same, with the teacher holding its own copy of every weight
  all               MambaInLlama baseline: train everything (the teacher must own its weights)
A distillation step is teacher forward + student forward + backward + AdamW update; the reference has
no optimiser step (it is the floor any training step pays).
Memory: on CUDA, peak allocated bytes per variant; on CPU, the peak RSS of a fresh process per variant
(`--memory-only VARIANT`), plus the unique bytes of weights, gradients and AdamW state (by storage).

    python bench/distill_step.py --out docs/bench_distill.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rad.distill.config import DistillConfig
from rad.distill.data import DataConfig
from rad.distill.models import load_models
from rad.distill.modules import count_parameters, replaced_attention_layers
from rad.distill.objective import DistillObjective, LossWeights
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid
from rad.models.layers import parse_layers
from rad.models.loading import load_model

logger = logging.getLogger("bench.distill_step")
VARIANTS = ("teacher_fwd_bwd", "mixers_shared", "mixers_separate", "all")


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Variant:
    """One thing to time: `step()` runs one training step on the fixed batch."""

    def __init__(self, name: str, hybrid_dir: Path, model: str, device: torch.device, batch: dict):
        self.name, self.batch, self.device = name, batch, device
        if name == "teacher_fwd_bwd":
            self.model = load_model(model, device=device, dtype="float32").model
            self.model.train()
            self.opt = None
            self.objective = None
            return
        train = "all" if name == "all" else "mixers"
        cfg = DistillConfig(hybrid=str(hybrid_dir), out="unused", train=train, device=str(device),
                            share_weights=name == "mixers_shared")
        models = load_models(cfg, device)
        models.student.train()
        self.models = models
        self.objective = DistillObjective(models.student, models.teacher, LossWeights(),
                                          replaced_attention_layers(models.teacher, models.student))
        params = [p for p in models.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5)

    def step(self) -> None:
        b = self.batch
        if self.objective is None:
            out = self.model(input_ids=b["ids"], attention_mask=b["att"], labels=b["ids"])
            out.loss.backward()
            self.model.zero_grad(set_to_none=True)
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            terms = self.objective(b["ids"], b["att"], b["att"])
        (terms["loss_sum"] / b["att"][:, 1:].sum()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def resident_bytes(self) -> dict:
        if self.objective is None:
            params = list(self.model.parameters())
            return {"weights": _unique_bytes(params), "grads_and_optimizer": _unique_bytes(params)}
        s, t = self.models.student, self.models.teacher
        weights = _unique_bytes(list(s.parameters()) + list(t.parameters()))
        state = [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        grads = [p for p in s.parameters() if p.requires_grad]  # a gradient per trainable weight
        return {"weights": weights, "grads_and_optimizer": _unique_bytes(state) + _unique_bytes(grads)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_hybrid(model: str, layers: str, folder: Path, device: torch.device) -> None:
    loaded = load_model(model, device=device, dtype="float32")
    indices = parse_layers(layers, loaded.model.config.num_hidden_layers)
    cfg = ConversionConfig(layers=indices, init="rad")
    hybrid = convert_to_hybrid(loaded.model, cfg)
    save_hybrid(hybrid, loaded.tokenizer, folder, conversion_record(model, loaded.model, cfg), overwrite=True)


def make_batch(model: str, batch: int, seq: int, device: torch.device) -> dict:
    from rad.distill.data import build_data

    tok = load_model(model, device="cpu", dtype="float32").tokenizer
    data = build_data(DataConfig(seq_len=seq, max_examples=max(8 * batch, 64), eval_examples=2), tok)
    rows = data.train.rows(list(range(batch)))
    return {"ids": rows.input_ids.to(device), "att": rows.attention_mask.to(device)}


def _proc_status_mb(field: str) -> float:
    """VmHWM / VmRSS of this process (ru_maxrss would carry the launching parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_only(args, hybrid_dir: Path, device: torch.device) -> dict:
    batch = make_batch(args.model, args.batch, args.seq_len, device)
    before = _proc_status_mb("VmRSS")
    v = Variant(args.memory_only, hybrid_dir, args.model, device, batch)
    for _ in range(2):
        v.step()
    import gc

    gc.collect()
    out = {"variant": args.memory_only, "peak_rss_MB": _proc_status_mb("VmHWM"), "rss_before_load_MB": before,
           "rss_after_steps_MB": _proc_status_mb("VmRSS"),
           **{k + "_MB": b / 2**20 for k, b in v.resident_bytes().items()}}
    if device.type == "cuda":
        out["cuda_peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="uniform:8", help="layers converted to Mamba2 (rad init)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hybrid-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rad.utils.devices import default_device

    device = torch.device(args.device) if args.device else default_device()
    with tempfile.TemporaryDirectory() as tmp:
        hybrid_dir = Path(args.hybrid_dir) if args.hybrid_dir else Path(tmp) / "hybrid"
        if args.memory_only:
            print(json.dumps(memory_only(args, hybrid_dir, device)))
            return
        if not args.hybrid_dir:
            make_hybrid(args.model, args.layers, hybrid_dir, device)
        batch = make_batch(args.model, args.batch, args.seq_len, device)
        names = [n for n in args.variants.split(",") if n]
        variants = {n: Variant(n, hybrid_dir, args.model, device, batch) for n in names}
        for v in variants.values():
            for _ in range(args.warmup):
                v.step()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeats):
            for n, v in variants.items():
                _sync(device)
                t0 = time.perf_counter()
                v.step()
                _sync(device)
                times[n].append(time.perf_counter() - t0)
            logger.info("repeat %d: %s", r + 1, {n: round(t[-1], 3) for n, t in times.items()})
        tokens = int(batch["att"].sum())
        counts = {}
        for n, v in variants.items():
            model = v.model if v.objective is None else v.models.student
            counts[n] = count_parameters(model)[0] if v.objective is not None else count_parameters(model)[1]
        resident = {n: v.resident_bytes() for n, v in variants.items()}
        del variants
        ref = statistics.median(times["teacher_fwd_bwd"]) if "teacher_fwd_bwd" in times else None
        results = {}
        for n in names:
            med = statistics.median(times[n])
            results[n] = {"median_s": med, "tokens_per_s": tokens / med, "ratio_to_teacher_fwd_bwd":
                          (med / ref) if ref else None, "times_s": times[n], "trainable_params": counts[n],
                          **{k + "_MB": b / 2**20 for k, b in resident[n].items()}}
        if not args.no_memory:
            for n in names:
                cmd = [sys.executable, __file__, "--memory-only", n, "--hybrid-dir", str(hybrid_dir),
                       "--model", args.model, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                       "--device", str(device)] + (["--threads", str(args.threads)] if args.threads else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    logger.warning("memory run %s failed: %s", n, proc.stderr[-500:])
                    continue
                results[n]["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {"model": args.model, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
              "tokens_per_step": tokens, "device": str(device), "threads": torch.get_num_threads(),
              "repeats": args.repeats, "torch": torch.__version__, "results": results}
    print(f"{'variant':<18}{'median s':>10}{'tok/s':>9}{'x ref':>7}{'trainable':>12}{'weights MB':>12}"
          f"{'peak MB':>9}{'RSS after MB':>14}")
    for n, r in results.items():
        mem = r.get("memory", {})
        peak = mem.get("cuda_peak_MB", mem.get("peak_rss_MB", float("nan")))
        print(f"{n:<18}{r['median_s']:>10.3f}{r['tokens_per_s']:>9.0f}{(r['ratio_to_teacher_fwd_bwd'] or 0):>7.2f}"
              f"{r['trainable_params']:>12,}{r['weights_MB']:>12.0f}{peak:>9.0f}"
              f"{mem.get('rss_after_steps_MB', float('nan')):>14.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
