"""How much of a model survives each GGUF type: top-1 agreement of llama.cpp's logits with transformers' float32.

The same token ids go to both engines: the first `--tokens` tokens of each text (by default three modules of the
CPython standard library this Python ships, code no one here wrote), teacher-forced. For every position the argmax
of llama.cpp's logits is compared with transformers'; beside it the largest |logit difference|. llama.cpp keeps its
default f16 KV cache (what a user serves with), so even an f32 GGUF is not bit-exact here (docs/serve.md).

    python bench/gguf_agreement.py --model runs/k4/student --gguf f16=k4.f16.gguf --gguf q8_0=k4.q8_0.gguf \\
        --gguf q4_k_m=k4.q4_k_m.gguf --out docs/bench_gguf_agreement_qwen_k4.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from rad.export.llama_cpp import logits_of, open_gguf
from rad.models.loading import load_model

logger = logging.getLogger("bench.gguf_agreement")
STDLIB_TEXTS = ("json/decoder.py", "argparse.py", "collections/__init__.py")


def default_texts() -> list[Path]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in STDLIB_TEXTS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="what the GGUFs were exported from (alias or folder)")
    p.add_argument("--gguf", action="append", required=True, help="TYPE=PATH.gguf (one or more)")
    p.add_argument("--text", action="append", default=None, help="a text file (default: three stdlib modules)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON report")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    texts = [Path(t) for t in args.text] if args.text else default_texts()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    sequences = []
    for path in texts:
        ids = loaded.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) < args.tokens:
            sys.exit(f"{path} has {len(ids)} tokens, fewer than --tokens {args.tokens}; give a longer text.")
        sequences.append(ids[: args.tokens])
    with torch.no_grad():
        reference = [loaded.model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]
    del loaded
    report = {"model": args.model, "texts": [str(t) for t in texts], "tokens_per_text": args.tokens,
              "kv_cache": "f16", "command": "python " + " ".join(sys.argv), "types": {}}
    for spec in args.gguf:
        name, path = spec.split("=", 1)
        llm = open_gguf(path, n_ctx=args.tokens + 8, threads=args.threads, logits_all=True)
        same = total = 0
        worst = 0.0
        for ids, ref in zip(sequences, reference, strict=True):
            got = logits_of(llm, ids)
            same += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
            worst = max(worst, float(np.abs(got - ref[:, : got.shape[1]]).max()))
        llm.close()
        report["types"][name] = {"path": path, "top1_agreement": same / total, "positions": total,
                                 "max_abs_logit_diff": worst, "file_bytes": Path(path).stat().st_size}
        print(f"{name:<8} top-1 agreement {same / total:7.2%} over {total} positions  max |dlogit| {worst:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
