"""Shared fixtures: tiny random models of each supported family, and the real default model."""

from __future__ import annotations

import os
import shutil
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

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
        return Qwen2Config(**common)
    if family == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(**common)
    raise ValueError(family)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}


def _randomise_biases(model):
    # Qwen2's q/k/v biases start at zero; make them matter so a dropped bias fails the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def make_tiny(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, **overrides))
    return _randomise_biases(model).eval()


@pytest.fixture(params=["llama", "qwen2", "mistral"])
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
