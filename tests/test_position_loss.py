"""Loss against position: the chunked per-position loss equals the one from the model's full logits (float64), the
windows are the standard library's source, and `rad eval --position-loss` writes the curve and refuses a length
beyond the model's positions before loading it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rad.cli import main
from rad.errors import RadError
from rad.evaluate.position_loss import bucketed, position_losses, stdlib_text, windows

from .conftest import make_tiny, word_tokenizer


def test_per_position_loss_equals_the_full_logits_reference():
    model = make_tiny("llama", max_position_embeddings=1024).double().eval()
    ids = torch.randint(3, 96, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").view(3, 39).mean(0)
    got = position_losses(model, ids, chunk=7)  # chunks that do not divide the length
    torch.testing.assert_close(got, want.double(), rtol=0, atol=1e-10)


def test_buckets_cover_every_position_once():
    losses = torch.arange(1, 1001, dtype=torch.float64)
    buckets = bucketed(losses, buckets=10)
    assert buckets[0]["from"] == 1 and buckets[-1]["to"] == 1000
    assert all(a["to"] + 1 == b["from"] for a, b in zip(buckets, buckets[1:], strict=False))
    assert sum(b["loss"] * (b["to"] - b["from"] + 1) for b in buckets) == pytest.approx(float(losses.sum()))


def test_windows_are_the_standard_library_in_order():
    text = stdlib_text(10_000)
    assert text.startswith("# argparse.py\n") and len(text) >= 10_000
    tok = word_tokenizer()
    ids = windows(tok, 64, 3)
    assert ids.shape == (3, 64) and torch.equal(ids, windows(tok, 64, 3))
    with pytest.raises(RadError, match="fewer than"):
        windows(tok, 10**7, 100)


def test_rad_eval_position_loss_writes_curves_and_refuses_too_long(tmp_path, caplog):
    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)  # 256 positions
    word_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["eval", str(folder), "--tasks", "", "--position-loss", "128", "--position-windows", "2",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "tiny" / "position_loss.json").read_text())
    assert saved["settings"]["length"] == 128 and saved["curve"][-1]["to"] == 127
    assert (out / "position_loss.png").is_file()
    assert main(["eval", str(folder), "--tasks", "", "--position-loss", "4096", "--out", str(tmp_path / "o2")]) == 2
    assert any("--position-loss asks for 4096 tokens of context" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "o2").exists()
