"""Does a rad hybrid compute the same logits in transformers 4.57 as in the transformers 5 that wrote it?

Builds (once) a throwaway virtual environment with torch (this interpreter's version, the CPU wheel) and
transformers 4.57 under the cache folder, saves tiny hybrids with this interpreter's transformers through
`rad.models.convert.save_hybrid`, loads each one in the 4.57 environment with plain `AutoModelForCausalLM`,
and compares float32 logits on the same ids. Each case states the outcome docs/loaders.md claims for it; the
script exits 1 when a case disagrees with its claim, so the document stays true.

    PYTHONPATH=src python tools/check_loaders.py                 # tiny hybrids (~1 min once the venv exists)
    PYTHONPATH=src python tools/check_loaders.py --real          # also SmolLM2-135M hybrids (rad and mil init)
    PYTHONPATH=src python tools/check_loaders.py --venv DIR      # another environment folder

Building the environment took 78 s with a warm pip cache and 156 s without one (2 busy CPU cores), so the
test suite does not build it; tests/test_loaders.py checks config.json against what 4.57 and vLLM read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("check_loaders")

TRANSFORMERS_SPEC = "transformers==4.57.*"
ATOL = 1e-5
EXACT, DIFFERS = "exact", "differs"

# Runs inside the 4.57 environment: no rad there, only what a user of that version has.
LOAD_IN_OLD_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from transformers import AutoModelForCausalLM
    results = {}
    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        saved = torch.load(folder + "/reference.pt")
        with torch.no_grad():
            logits = model(saved["ids"]).logits
        c = model.config
        results[folder] = {
            "max_abs_diff": (logits - saved["logits"]).abs().max().item(),
            "read": {"rope_theta": c.rope_theta, "partial_rotary_factor": c.partial_rotary_factor,
                     "rope_scaling": c.rope_scaling, "attention_bias": c.attention_bias},
        }
    print(json.dumps({"transformers": transformers.__version__, "results": results}))
    """
)


@dataclass
class Case:
    """One hybrid to save and compare, and the outcome docs/loaders.md claims for it."""

    name: str
    family: str
    layers: list[int]
    init: str
    expected: str
    source_overrides: dict = field(default_factory=dict)
    n_groups: int | None = None
    drop_loader_keys: bool = False  # config.json as rad wrote it before the top-level keys existed
    real: bool = False


def tiny_cases() -> list[Case]:
    theta = {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    return [
        Case("llama θ=1e5, rad init", "llama", [1, 3], "rad", EXACT, theta),
        Case("llama θ=1e5, rad init, no top-level keys", "llama", [1, 3], "rad", DIFFERS, theta, drop_loader_keys=True),
        Case("llama3 scaling θ=5e4, rad init", "llama", [1, 3], "rad", EXACT, llama3),
        Case("qwen2 q/k/v biases, rad init", "qwen2", [1, 3], "rad", EXACT),
        Case("llama θ=1e5, random init, n_groups=1", "llama", [1, 3], "random", EXACT, theta, n_groups=1),
        Case("llama θ=1e5, random init, n_groups=heads", "llama", [1, 3], "random", DIFFERS, theta),
        Case("llama θ=1e5, mil init (n_groups=heads)", "llama", [1, 3], "mil", DIFFERS, theta),
    ]


def real_cases() -> list[Case]:
    layers = [2, 9, 17, 25]
    return [
        Case("SmolLM2-135M, rad init", "smollm2-135m", layers, "rad", EXACT, real=True),
        Case("SmolLM2-135M, rad init, no top-level keys", "smollm2-135m", layers, "rad", DIFFERS, real=True,
             drop_loader_keys=True),
        Case("SmolLM2-135M, mil init", "smollm2-135m", layers, "mil", DIFFERS, real=True),
    ]


def default_venv() -> Path:
    cache = Path(os.environ.get("RAD_CACHE", Path.home() / ".cache" / "rad"))
    return cache / "loaders" / "transformers-4.57"


def ensure_venv(venv: Path) -> Path:
    """The environment's python, building the environment first when it is missing (atomically: a sibling
    folder renamed into place, so an interrupted build is rebuilt next time)."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    torch_version = torch.__version__.split("+")[0]  # pinned: an unpinned torch pulls a multi-GB CUDA build
    tmp = venv.with_name(venv.name + f".building-{os.getpid()}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("Building %s (torch==%s, %s) ...", venv, torch_version, TRANSFORMERS_SPEC)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, TRANSFORMERS_SPEC, "safetensors"], check=True)
    tmp.rename(venv)
    logger.info("Built in %.0f s", time.perf_counter() - start)
    return python


def _tiny_source(family: str, overrides: dict):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, **overrides)
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # Qwen2's biases start at zero; make them matter
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.5)
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    return model.eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_case(case: Case, root: Path, name: str, real_model=None) -> Path:
    """Convert, save with `save_hybrid` (what `rad convert` writes) and store reference logits next to it."""
    from rad.models.convert import (
        LOADER_KEYS,
        ConversionConfig,
        conversion_record,
        convert_to_hybrid,
        save_hybrid,
    )

    if case.real:
        source, tokenizer = real_model.model, real_model.tokenizer
    else:
        source, tokenizer = _tiny_source(case.family, case.source_overrides), _tiny_tokenizer()
    config = ConversionConfig(layers=case.layers, init=case.init, n_groups=case.n_groups)
    hybrid = convert_to_hybrid(source, config)
    out = root / name
    save_hybrid(hybrid, tokenizer, out, conversion_record(case.family, source, config))
    if case.drop_loader_keys:
        path = out / "config.json"
        data = {k: v for k, v in json.loads(path.read_text()).items() if k not in LOADER_KEYS}
        path.write_text(json.dumps(data, indent=2))
    vocab = hybrid.config.vocab_size
    ids = torch.randint(3, vocab, (2, 64 if case.real else 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hybrid(ids).logits.float()
    torch.save({"ids": ids, "logits": logits}, out / "reference.pt")
    return out


def run(cases: list[Case], python: Path, real_model=None) -> tuple[str, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="rad-loaders-") as tmp:
        folders = {case.name: save_case(case, Path(tmp), f"case{i}", real_model) for i, case in enumerate(cases)}
        proc = subprocess.run([str(python), "-c", LOAD_IN_OLD_TRANSFORMERS, *map(str, folders.values())],
                              check=True, capture_output=True, text=True)
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for case in cases:
        result = answer["results"][str(folders[case.name])]
        outcome = EXACT if result["max_abs_diff"] <= ATOL else DIFFERS
        rows.append({"case": case.name, "expected": case.expected, "outcome": outcome,
                     "max_abs_diff": result["max_abs_diff"], "read": result["read"]})
    return answer["transformers"], rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=None, help="environment folder (built when missing)")
    parser.add_argument("--real", action="store_true", help="also check SmolLM2-135M hybrids (loads the model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    python = ensure_venv(args.venv or default_venv())
    cases, real_model = tiny_cases(), None
    if args.real:
        from rad.models.loading import load_model

        real_model = load_model("smollm2-135m", device="cpu", dtype="float32")
        cases += real_cases()
    version, rows = run(cases, python, real_model)
    print(f"| case (saved by transformers 5, loaded by transformers {version}) | claimed | outcome | max |Δlogit| |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['expected']} | {row['outcome']} | {row['max_abs_diff']:.2e} |")
    wrong = [row["case"] for row in rows if row["outcome"] != row["expected"]]
    if wrong:
        logger.error("Outcome differs from docs/loaders.md for: %s", "; ".join(wrong))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
