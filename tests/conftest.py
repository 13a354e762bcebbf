"""Shared fixtures: tiny random models of each supported family, and the real default model.

Test tiers (markers registered in pyproject.toml; `make test` runs them all, `make test-fast` neither):

- `slow`: needs the real default model, or takes long anyway. Set automatically on every test whose
  fixtures reach `default_model` (directly or through another fixture, e.g. for its tokenizer), and set
  by hand with `@pytest.mark.slow` on tiny-model tests that take over ~15 s (under `--durations`).
- `subprocess`: spawns processes (the CLI, search/distill workers, lm_eval, writers). Set automatically
  on every test that uses the `subprocess` or `multiprocessing` module in its body, in a helper function
  of its own module, or in one of its fixtures; add it by hand otherwise. (The evaluation sandbox in
  src/ spawns a short-lived interpreter too; its unit tests stay in the fast tier.)
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Under pytest-xdist (`make test` runs one worker per core) each worker gets one thread, so the workers
# do not fight over the cores; a plain `pytest` run keeps two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Variables a user's shell often sets that change what rad does (offline hub, another HF cache, no GPU). The suite
# runs without them, whatever the shell says; a test that depends on one sets it itself (monkeypatch). Removed at
# import, before any test or subprocess reads the environment.
USER_ENVIRONMENT = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_DATASETS_CACHE",
                    "HF_HUB_CACHE", "HF_ENDPOINT", "RAD_DATA_DIR", "RAD_DATA_CACHE")
for _name in USER_ENVIRONMENT:
    os.environ.pop(_name, None)


def tiny_config(family: str, **overrides):
    common = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if family == "llama":
        common.setdefault(
            "rope_parameters",
            {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        common.setdefault("tie_word_embeddings", True)
        return LlamaConfig(**common)
    if family == "qwen2":
        # Qwen2.5's q/k/v biases (randomised by make_tiny) and an untied head: both are conversion pitfalls
        common.setdefault("tie_word_embeddings", False)
        return Qwen2Config(**common)
    if family == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(**common)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "mistral")  # every family conversion and the fast decoder support
MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}


def _randomise_biases(model):
    # Qwen2's q/k/v biases start at zero; make them matter so a dropped bias fails the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def word_tokenizer():
    """A fast word-level tokenizer over the tiny models' 96 ids ("w3 w17 ..."): real tokenizer code, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tiny(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, **overrides))
    return _randomise_biases(model).eval()


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """A fresh RAD_CACHE for the session, so the GGUF -> safetensors path runs for real once."""
    old = os.environ.get("RAD_CACHE")
    root = tmp_path_factory.mktemp("rad_cache")
    os.environ["RAD_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("RAD_CACHE", None)
    else:
        os.environ["RAD_CACHE"] = old
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def default_model(isolated_cache):
    from rad.models.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def prompt_ids(default_model):
    tok = default_model.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


# ---------------------------------------------------------------- tiers

REAL_MODEL_FIXTURES = {"default_model", "prompt_ids"}
_SPAWNING_MODULES = (subprocess, multiprocessing)


def _spawns(func, module, seen: set) -> bool:
    """Whether `func`, or a function of `module` it names (followed transitively), refers to subprocess or
    multiprocessing by name (`subprocess.run`, `Popen` imported from it, ...)."""
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    codes, names = [code], set()
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    namespace = vars(module) if module is not None else {}
    for name in names:
        obj = namespace.get(name)
        if obj is None:
            continue
        if obj in _SPAWNING_MODULES or getattr(obj, "__module__", None) in ("subprocess", "multiprocessing"):
            return True
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ and _spawns(obj, module, seen):
            return True
    return False


@pytest.fixture(autouse=True)
def _one_torch_thread_on_tiny_models(request):
    """Tiny models gain nothing from a second intra-op thread, and on a shared 2-core machine two spinning
    OpenMP threads against another busy process run ~10x slower (measured: 151 s instead of 14 s for
    test_speculative + test_evaluate). Tests on the real model keep the session's two threads."""
    if REAL_MODEL_FIXTURES & set(request.fixturenames):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("subprocess") or not isinstance(item, pytest.Function):
            continue
        funcs = [(item.function, item.module)]
        for name in item.fixturenames:
            for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
                funcs.append((fixturedef.func, inspect.getmodule(fixturedef.func)))
        seen: set = set()
        if any(_spawns(func, module, seen) for func, module in funcs):
            item.add_marker(pytest.mark.subprocess)
