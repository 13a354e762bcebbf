"""Saved hybrids load with plain transformers (no rad), and the CLI turns bad input into one clear error."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rad.cli import main
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid

from .conftest import make_tiny

FRESH_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.load(ids_path)).logits
    assert not any(name == "rad" or name.startswith("rad.") for name in sys.modules), "rad was imported"
    torch.save({"logits": logits, "class": type(model).__name__}, out_path)
    """
)


def _load_in_fresh_process(folder: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)
    subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder), str(ids_path), str(out_path)], check=True)
    return torch.load(out_path)


def test_round_trip_real_model_without_rad(default_model, prompt_ids, tmp_path):
    config = ConversionConfig(layers=[2, 9, 17, 25], init="mil")
    hybrid = convert_to_hybrid(default_model.model, config)
    out = save_hybrid(hybrid, default_model.tokenizer, tmp_path / "hybrid",
                      conversion_record("smollm2-135m", default_model.model, config))
    record = json.loads((out / "rad_conversion.json").read_text())
    assert record["converted_layers"] == [2, 9, 17, 25] and record["init"] == "mil"
    assert {"rad", "torch", "transformers"} <= set(record["versions"])
    assert (out / "model.safetensors").is_file()
    loaded = _load_in_fresh_process(out, prompt_ids, tmp_path)
    with torch.no_grad():
        expected = hybrid(prompt_ids).logits
    assert loaded["class"] == "BambaForCausalLM"
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=1e-5)


def _run_cli(args, caplog):
    caplog.clear()
    code = main(args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return code, errors


@pytest.fixture
def gpt2_folder(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama_folder(tmp_path, default_model):
    folder = tmp_path / "tiny"
    make_tiny("llama", vocab_size=49152).save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    return folder


def test_cli_convert_and_info_on_a_tiny_model(tiny_llama_folder, tmp_path, caplog, capsys):
    out = tmp_path / "hybrid"
    code, errors = _run_cli(["convert", str(tiny_llama_folder), "--layers", "1,3", "--out", str(out)], caplog)
    assert (code, errors) == (0, [])
    assert json.loads((out / "rad_conversion.json").read_text())["converted_layers"] == [1, 3]
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer_map"] == ["attention", "mamba2", "attention", "mamba2"]
    assert info["kv_bytes_per_token"] * 2 == info["all_attention_kv_bytes_per_token"]
    # The same folder again is refused rather than silently overwritten.
    code, errors = _run_cli(["convert", str(tiny_llama_folder), "--layers", "1", "--out", str(out)], caplog)
    assert code == 2 and "already exists" in errors[0]


@pytest.mark.parametrize("d_state, expected", [("head_dim", 8), ("half", 4), ("6", 6)])
def test_cli_d_state_takes_a_number_or_a_fraction_of_the_head(d_state, expected, tiny_llama_folder, tmp_path, caplog):
    # The tiny model: hidden 48 over 6 heads -> head_dim 8; 2 key/value heads.
    out = tmp_path / "hybrid"
    code, errors = _run_cli(["convert", str(tiny_llama_folder), "--layers", "1", "--n-groups", "kv",
                             "--d-state", d_state, "--out", str(out)], caplog)
    assert (code, errors) == (0, [])
    geometry = json.loads((out / "rad_conversion.json").read_text())["geometry"]
    assert (geometry["n_groups"], geometry["d_state"]) == (2, expected)


def test_cli_d_state_refuses_other_words(tiny_llama_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tiny_llama_folder), "--layers", "1", "--d-state", "quarter", "--out",
              str(tmp_path / "h")])
    assert exit_info.value.code == 2
    assert "head_dim, half or a positive whole number" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_bad_inputs_get_one_clear_error(tmp_path, gpt2_folder, tiny_llama_folder, caplog):
    corrupt = tmp_path / "corrupt"
    make_tiny("llama").save_pretrained(corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["info", "no-such-alias"], "Unknown model"),
        (["convert", str(gpt2_folder), "--layers", "0", "--out", out], "supported families are llama, qwen2, mistral"),
        (["convert", str(tiny_llama_folder), "--layers", "1,4", "--out", out], "out of range"),
        (["convert", str(tiny_llama_folder), "--layers", "1,1", "--out", out], "twice"),
        (["info", str(corrupt)], "corrupt or incomplete"),
        (["info", str(not_a_model)], "not a model checkpoint"),
        (["generate", str(tiny_llama_folder), "--prompt", ""], "prompt is empty"),
    ]
    for args, words in cases:
        code, errors = _run_cli(args, caplog)
        assert code == 2, args
        assert len(errors) == 1 and words in errors[0], (args, errors)
        assert "\n" not in errors[0]


def test_cli_exit_code_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "rad.cli", "convert", "nope", "--layers", "1", "--out", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_speculative_generate_reports_acceptance(tiny_llama_folder, caplog, capsys):
    import logging

    caplog.set_level(logging.INFO, logger="rad")
    code = main(["generate", str(tiny_llama_folder), "--prompt", "hello there", "--speculative", "--skip", "1,2",
                 "--max-new-tokens", "12"])
    assert code == 0
    assert any("speed-up" in r.getMessage() and "acceptance" in r.getMessage() for r in caplog.records)
    code, errors = _run_cli(["generate", str(tiny_llama_folder), "--prompt", "hi", "--speculative"], caplog)
    assert code == 2 and "--skip" in errors[0]
