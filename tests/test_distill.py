"""Targeted (self-)distillation: loss, trainable selection, weight sharing, loop, checkpoints, data, CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rad.distill import (
    DataConfig,
    DistillConfig,
    DistillSummary,
    LossWeights,
    build_data,
    kl_divergence,
    run_distill,
)
from rad.distill.checkpoint import list_checkpoints, verify_checkpoint
from rad.distill.loss import chunked_distill_terms
from rad.distill.modules import check_same_vocabulary, select_trainable, share_frozen_weights
from rad.distill.objective import DistillObjective
from rad.errors import RadError
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid
from rad.models.mixers.mamba2 import RAD_GATE_GAIN
from tests.conftest import REPO, SHARED_DATA, make_tiny, word_tokenizer

PY = sys.executable


# ---------------------------------------------------------------- loss


def _reference_kl(s, t, mask, temp):
    s, t = s.double() / temp, t.double() / temp
    p = torch.softmax(t, -1)
    kl = (p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    return (kl * mask).sum() / mask.sum() * temp * temp


def test_kl_zero_reference_masking_and_chunking():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 17, 50, generator=g) * 3
    t = torch.randn(3, 17, 50, generator=g) * 3
    mask = torch.ones(3, 17)
    mask[1, 10:] = 0  # padding
    mask[2, :4] = 0  # a prompt
    assert kl_divergence(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    for temp in (1.0, 2.0):
        ref = _reference_kl(s, t, mask, temp)
        full = kl_divergence(s, t, mask, temperature=temp)
        chunked = kl_divergence(s, t, mask, temperature=temp, chunk=5)
        assert full.dtype == torch.float32
        assert full.item() == pytest.approx(ref.item(), rel=1e-5)
        assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    # Masked positions do not matter at all.
    s2 = s.clone()
    s2[1, 10:] = 1e4
    assert kl_divergence(s2, t, mask).item() == pytest.approx(kl_divergence(s, t, mask).item(), rel=1e-6)


def test_chunked_hidden_state_loss_matches_full_logits_and_gradients():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 40, bias=False), torch.nn.Linear(8, 40, bias=False)
    hs = torch.randn(2, 13, 8, requires_grad=True)
    ht = torch.randn(2, 13, 8)
    mask = (torch.rand(2, 13) > 0.3).float()
    labels = torch.randint(0, 40, (2, 13)).masked_fill(mask == 0, -100)
    terms = chunked_distill_terms(hs, ht, mask, head_s, head_t, labels=labels, temperature=1.5, chunk=4)
    (g_chunk,) = torch.autograd.grad(terms["kl_sum"] + terms["ce_sum"], hs)
    s_logits, t_logits = head_s(hs), head_t(ht)
    ref_kl = kl_divergence(s_logits, t_logits, mask, temperature=1.5) * mask.sum()
    ref_ce = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), reduction="sum")
    (g_full,) = torch.autograd.grad(ref_kl + ref_ce, hs)
    assert terms["kl_sum"].item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert terms["ce_sum"].item() == pytest.approx(ref_ce.item(), rel=1e-5)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- tiny hybrids


def _tiny_pair(layers=(1, 3), vocab_size=96, seed=0):
    src = make_tiny("llama", seed=seed, vocab_size=vocab_size)
    cfg = ConversionConfig(layers=list(layers))
    return src, convert_to_hybrid(src, cfg), cfg


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    """A tiny Llama (real tokenizer, vocab 49152) saved as a source, and its 2-mixer rad hybrid."""
    root = tmp_path_factory.mktemp("tiny_distill")
    src, hybrid, cfg = _tiny_pair(vocab_size=49152)
    src.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    save_hybrid(hybrid, tokenizer, root / "hybrid", conversion_record(str(root / "src"), src, cfg))
    data = root / "data.jsonl"
    lines = [json.dumps({"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}.\n#### "
                         f"{2 * i + 1}"}) for i in range(60)]
    data.write_text("\n".join(lines) + "\n")
    return root


def _config(tiny_dirs, out, **kw):
    data = kw.pop("data", DataConfig(spec=str(tiny_dirs / "data.jsonl"), seq_len=32, eval_examples=6))
    base = dict(hybrid=str(tiny_dirs / "hybrid"), out=str(out), steps=4, micro_batch=2, grad_accum=1, lr=1e-3,
                data=data, eval_every=2, eval_sequences=4, save_every=2, device="cpu", progress=False,
                tensorboard=False, plots=False)
    base.update(kw)
    return DistillConfig(**base)


def test_the_gated_norm_lr_follows_the_init_of_a_fresh_hybrid():
    import dataclasses

    from rad.distill.config import resolve_norm_lr_scale
    from rad.distill.train import _param_groups

    src = make_tiny("llama", vocab_size=96)
    config = DistillConfig(hybrid="h", out="o")
    assert config.mixer_norm_lr_scale is None  # the default: decided by the hybrid, once loaded
    records = {init: conversion_record("src", src, ConversionConfig(layers=[1], init=init))
               for init in ("rad", "rad-zero-in-proj", "mil", "random")}
    assert {i: resolve_norm_lr_scale(config, r) for i, r in records.items()} == {
        "rad": 100.0, "rad-zero-in-proj": 1.0, "mil": 1.0, "random": 1.0}
    trained = dataclasses.replace(records["rad"], distillation={"steps": 4})  # its gains have moved: plain lr
    assert resolve_norm_lr_scale(config, trained) == 1.0 and resolve_norm_lr_scale(config, None) == 1.0
    assert resolve_norm_lr_scale(dataclasses.replace(config, mixer_norm_lr_scale=3.0), records["rad"]) == 3.0
    hybrid = convert_to_hybrid(src, ConversionConfig(layers=[1, 3]))
    select_trainable(hybrid, "mixers")
    rest, norms = _param_groups(hybrid, dataclasses.replace(config, mixer_norm_lr_scale=100.0))
    assert len(norms["params"]) == 2 and norms["lr"] == pytest.approx(100 * config.lr) and "lr" not in rest
    assert all(p.dim() == 1 and bool((p == RAD_GATE_GAIN).all()) for p in norms["params"])  # the two gated-norm gains
    assert len(_param_groups(hybrid, dataclasses.replace(config, mixer_norm_lr_scale=1.0))) == 1
    with pytest.raises(RadError, match="mixer_norm_lr_scale must be a positive number"):
        DistillConfig(hybrid="h", out="o", mixer_norm_lr_scale=0.0)


@pytest.mark.parametrize("train", ["mixers", "mixers+mlp", "all"])
def test_only_chosen_parameters_change_and_teacher_shares_frozen_weights(train):
    src, student, _ = _tiny_pair()
    teacher = make_tiny("llama", vocab_size=96)  # a fresh copy of the source: same values
    names = set(select_trainable(student, train))
    report = share_frozen_weights(teacher, student)
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters(remove_duplicate=False))
    # Frozen twins share storage; trainable ones (and replaced attention) do not.
    emb = s_params["model.embed_tokens.weight"]
    assert t_params["model.embed_tokens.weight"].data_ptr() == emb.data_ptr() or train == "all"
    mlp_name = "model.layers.1.mlp.down_proj.weight"
    shared_mlp = t_params[mlp_name].data_ptr() == s_params["model.layers.1.feed_forward.down_proj.weight"].data_ptr()
    assert shared_mlp == (train == "mixers")
    kept_mlp = t_params["model.layers.0.mlp.up_proj.weight"].data_ptr()
    assert (kept_mlp == s_params["model.layers.0.feed_forward.up_proj.weight"].data_ptr()) == (train != "all")
    assert t_params["model.layers.0.self_attn.q_proj.weight"].data_ptr() == \
        s_params["model.layers.0.self_attn.q_proj.weight"].data_ptr() or train == "all"
    assert report.shared_tensors > 0 or train == "all"
    assert all(not p.requires_grad for p in teacher.parameters())

    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    t_before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    objective = DistillObjective(student, teacher, LossWeights(align=0.1), [1, 3])
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (2, 12))
    att = torch.ones_like(ids)
    terms = objective(ids, att, att)
    terms["loss_sum"].backward()
    opt.step()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert changed <= names | {"lm_head.weight"}  # lm_head is tied to the embedding
    for k in before:
        if k not in names and not (k == "lm_head.weight" and "model.embed_tokens.weight" in names):
            assert torch.equal(before[k], after[k]), k
    # The teacher never moves, whatever trains.
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k


def test_tokenizer_mismatch_is_refused(tokenizer):
    with pytest.raises(RadError, match="vocabulary"):
        check_same_vocabulary(tokenizer, tokenizer, 49152, 32000)

    class Other:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(RadError, match="same tokenizer"):
        check_same_vocabulary(tokenizer, Other(), 49152, 49152)


def test_tokenizer_mismatch_in_a_run(tiny_dirs, tmp_path, tokenizer):
    other = make_tiny("llama", vocab_size=96)
    other.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    with pytest.raises(RadError, match="vocabulary"):
        run_distill(_config(tiny_dirs, tmp_path / "out", teacher=str(tmp_path / "teacher")))


# ---------------------------------------------------------------- data


def test_data_chat_rendering_masking_split_and_errors(tmp_path, tokenizer):
    records = [{"prompt": f"Say {i}.", "response": f"I say {i}."} for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = build_data(DataConfig(spec=str(path), seq_len=40, pack=False, mask_prompt=True, eval_examples=4),
                      tokenizer)
    assert data.examples == 20 and len(data.eval) == 4 and len(data.train) == 16
    text = tokenizer.decode(data.train.input_ids[0][data.train.attention_mask[0].bool()])
    assert "<|im_start|>assistant" in text  # chat template used
    counted = tokenizer.decode(data.train.input_ids[0][data.train.loss_mask[0].bool()])
    assert "I say" in counted and "Say" not in counted.replace("I say", "")
    train_rows = {tuple(r.tolist()) for r in data.train.input_ids}
    assert not train_rows & {tuple(r.tolist()) for r in data.eval.input_ids}
    packed = build_data(DataConfig(spec=str(path), seq_len=40, eval_examples=4), tokenizer)
    assert packed.train.attention_mask[:-1].all()  # packed rows are full

    plain = tmp_path / "plain.jsonl"  # no prompt/response split: --mask-prompt could not mask anything
    plain.write_text("".join(json.dumps({"text": f"Line {i} of plain text."}) + "\n" for i in range(8)))
    with pytest.raises(RadError, match="--mask-prompt needs records with a prompt and a response"):
        build_data(DataConfig(spec=str(plain), seq_len=40, mask_prompt=True, eval_examples=2), tokenizer)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RadError, match="empty"):
        build_data(DataConfig(spec=str(empty)), tokenizer)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"foo": 1, "bar": 2}\n{"foo": 3, "bar": 4}\n')
    with pytest.raises(RadError, match="fields bar, foo"):
        build_data(DataConfig(spec=str(wrong)), tokenizer)
    with pytest.raises(RadError, match="no field 'question'"):
        build_data(DataConfig(spec=str(path), prompt_field="question", response_field="response"), tokenizer)
    with pytest.raises(RadError, match="GSM8K test"):
        build_data(DataConfig(spec="reasoning-gym/gsm_symbolic"), tokenizer)
    with pytest.raises(RadError, match="does not exist"):
        build_data(DataConfig(spec=str(tmp_path / "missing.jsonl")), tokenizer)


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_train.jsonl").is_file(), reason="no ../shared/data here")
def test_default_data_is_gsm8k_train(tokenizer):
    data = build_data(DataConfig(seq_len=64, max_examples=30, eval_examples=3), tokenizer)
    assert data.source.endswith("gsm8k_train.jsonl")


def test_default_data_without_shared_or_hub_falls_back_to_python_docs(tokenizer, monkeypatch, tmp_path):
    # A clone with no ../shared/data beside it on a machine without the hub: an empty data folder and
    # cache, and the hub forced offline (it is unreachable here anyway).
    import rad.distill.data as data_module

    (tmp_path / "data").mkdir()  # an empty data folder (a RAD_DATA_DIR that is no folder is an error)
    monkeypatch.setenv("RAD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAD_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = build_data(DataConfig(seq_len=64, max_examples=20, eval_examples=2), tokenizer)
    assert data.source == data_module.OFFLINE_SOURCE
    from pydoc_data.topics import topics

    first_topic = topics[sorted(topics)[0]].strip()
    decoded = tokenizer.decode(torch.cat([data.train.input_ids, data.eval.input_ids]).flatten().tolist())
    assert first_topic[:40] in decoded.replace("\n", " ") or first_topic[:40] in decoded
    assert len(data.train) > 0 and len(data.eval) > 0


# ---------------------------------------------------------------- loop, checkpoints, resume


def test_nan_loss_stops_with_last_good_checkpoint_intact(tiny_dirs, tmp_path, monkeypatch):
    original = DistillObjective.forward
    calls = {"train": 0}

    def poisoned(self, input_ids, attention_mask, loss_mask, labels=None):
        terms = original(self, input_ids, attention_mask, loss_mask, labels)
        if self.training:
            calls["train"] += 1
            if calls["train"] > 2:
                terms["loss_sum"] = terms["loss_sum"] * float("nan")
        return terms

    monkeypatch.setattr(DistillObjective, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(RadError, match=r"loss became nan at step 3.*step-0000002"):
        run_distill(_config(tiny_dirs, out, eval_every=0))
    (ckpt,) = list_checkpoints(out / "checkpoints")
    assert verify_checkpoint(ckpt).step == 2


_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from rad.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args, launcher=None, timeout=240):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    cmd = (launcher or [PY, "-c", _SCRIPT]) + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _cli_args(tiny_dirs, out, steps=6, extra=()):
    return ["distill", str(tiny_dirs / "hybrid"), "--data", str(tiny_dirs / "data.jsonl"), "--seq-len", "32",
            "--eval-examples", "6", "--steps", str(steps), "--micro-batch", "2", "--save-every", "2",
            "--eval-every", "3", "--eval-sequences", "4", "--out", str(out), "--device", "cpu", "--no-progress",
            "--align-weight", "0.05", *extra]


# Runs `run_distill` on a JSON DistillConfig in a fresh process; the test, not rad, SIGKILLs it at a step.
_RUN_SCRIPT = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
from rad.distill import DataConfig, DistillConfig, LossWeights, run_distill
spec, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
config = DistillConfig(**{**spec, "data": DataConfig(**spec["data"]), "loss": LossWeights(**spec["loss"]),
                          "betas": tuple(spec["betas"])})

def kill(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

run_distill(config, on_step=kill if kill_at else None)
"""


def _run_in_subprocess(config: DistillConfig, kill_at: int = 0, timeout=240):
    from dataclasses import asdict

    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    cmd = [PY, "-c", _RUN_SCRIPT, json.dumps(asdict(config)), str(kill_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_sigkill_and_resume_is_bitwise_identical(tiny_dirs, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    settings = dict(steps=6, eval_every=3, loss=LossWeights(align=0.05), tensorboard=True, plots=True)
    r = _run_in_subprocess(_config(tiny_dirs, full, **settings))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run_in_subprocess(_config(tiny_dirs, broken, **settings), kill_at=5)
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL after step 5, last checkpoint at step 4
    assert [p.name for p in list_checkpoints(broken / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert not (broken / "student").exists()
    r = _run_in_subprocess(_config(tiny_dirs, broken, resume=True, **settings))
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(str(full / "student" / "model.safetensors"))
    b = load_file(str(broken / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (broken / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    full_log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if r["kind"] == "train"] == [r["loss"] for r in full_log if r["kind"] == "train"]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 3, 6]
    assert [p.name for p in list_checkpoints(broken / "checkpoints")] == ["step-0000004", "step-0000006"]
    # The final student is a stock transformers checkpoint.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(full / "student")
    assert type(model).__name__ == "BambaForCausalLM"


def test_corrupt_or_partial_checkpoint_is_detected(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    run_distill(_config(tiny_dirs, out, steps=2, eval_every=0))
    (ckpt,) = list_checkpoints(out / "checkpoints")
    weights = ckpt / "trainable.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RadError, match="corrupt"):
        run_distill(_config(tiny_dirs, out, steps=4, eval_every=0, resume=True))
    (ckpt / "state.json").unlink()
    with pytest.raises(RadError, match="partial"):
        run_distill(_config(tiny_dirs, out, steps=4, eval_every=0, resume=True))
    with pytest.raises(RadError, match="--resume"):
        run_distill(_config(tiny_dirs, out, steps=4, eval_every=0))


def _saves_and_prunes(start: int, steps: int, save_every: int, keep: int, on_disk: list[int]) -> int:
    """Step by step, as the training loop does: save at every multiple of save_every and at the last step, then
    keep the newest `keep` (all for 0); returns the most checkpoints on disk at once."""
    peak = len(on_disk)
    for step in range(start + 1, steps + 1):
        if save_every and (step % save_every == 0 or step == steps):
            on_disk.append(step)
            peak = max(peak, len(on_disk))
            if keep:
                del on_disk[:-keep]
    return peak


def test_the_room_asked_for_checkpoints_is_the_most_a_run_keeps_at_once(tmp_path):
    """A 1-step run asks room for one checkpoint, not keep + 1 (CI's 4.5 GiB /tmp refused the smoke sweep's
    baseline for 3 checkpoints it never writes); a resumed run counts what already lies on disk."""
    from rad.distill.checkpoint import checkpoint_bytes_still_needed

    per = 10
    for steps in range(1, 8):
        for save_every in range(4):
            for keep in range(4):
                for start in range(steps + 1):
                    earlier: list[int] = []
                    _saves_and_prunes(0, start, save_every, keep, earlier)  # a run stopped at `start`
                    root = tmp_path / f"{steps}-{save_every}-{keep}-{start}"
                    for step in earlier:
                        (root / f"step-{step:07d}").mkdir(parents=True)
                        (root / f"step-{step:07d}" / "weights").write_bytes(b"x" * per)
                    peak = _saves_and_prunes(start, steps, save_every, keep, list(earlier))
                    got = checkpoint_bytes_still_needed(root, per, steps=steps, save_every=save_every, keep=keep)
                    assert got == peak * per - len(earlier) * per, (steps, save_every, keep, start, earlier)


def test_a_checkpoint_is_about_three_times_the_trainable_weights(tiny_dirs, tmp_path):
    """The per-checkpoint size the disk check assumes (weights and AdamW's two moments) is what is written."""
    out = tmp_path / "run"
    run_distill(_config(tiny_dirs, out, steps=1, eval_every=0))
    (ckpt,) = list_checkpoints(out / "checkpoints")
    trainable = sum(v.numel() * v.element_size() for v in load_file(ckpt / "trainable.safetensors").values())
    written = sum(f.stat().st_size for f in ckpt.iterdir())
    assert 3 * trainable <= written <= 3 * trainable * 1.25 + 64 * 1024, (written, trainable)


def test_restart_without_a_checkpoint_starts_a_fresh_log(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    run_distill(_config(tiny_dirs, out, steps=1, eval_every=1, save_every=0))
    assert not list_checkpoints(out / "checkpoints")  # nothing to resume: the next run starts over
    result = run_distill(_config(tiny_dirs, out, steps=1, eval_every=1, save_every=0))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in log] == [("eval", 0), ("train", 1), ("eval", 1)]
    assert [r["step"] for r in result.evals] == [0, 1]


def test_two_processes_match_one_process(tiny_dirs, tmp_path):
    """Same global batch (4): 1 process x accum 2 x micro 2 vs 2 processes x micro 2 (gloo)."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = _cli(_cli_args(tiny_dirs, one, steps=4, extra=["--grad-accum", "2"]))
    assert r.returncode == 0, r.stderr[-2000:]
    launcher = [PY, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu_2proc.yaml"),
                "--main_process_port", "29517", "-m", "rad.cli"]
    r = _cli(_cli_args(tiny_dirs, two, steps=4), launcher=launcher)
    assert r.returncode == 0, (r.stdout[-1000:], r.stderr[-3000:])
    assert r.stderr.count("rad: Data ") == 1, r.stderr[-3000:]  # info lines from the main process only

    def curve(folder):
        rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"], [r["eval_kl"] for r in rows if r["kind"] == "eval"]

    (l1, e1), (l2, e2) = curve(one), curve(two)
    assert len(l1) == len(l2) == 4
    # Tolerance: float32 sums in a different order (gloo all-reduce), amplified a little by AdamW.
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(e2), torch.tensor(e1), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_self_distillation_on_the_default_model_lowers_held_out_kl(default_model, tmp_path):
    cfg = ConversionConfig(layers=[8, 14, 20, 26], init="rad")
    hybrid = convert_to_hybrid(default_model.model, cfg)
    save_hybrid(hybrid, default_model.tokenizer, tmp_path / "hybrid",
                conversion_record("smollm2-135m", default_model.model, cfg))
    del hybrid
    # the default data, ../shared/data/gsm8k_train.jsonl, or an offline stand-in
    spec = None if (SHARED_DATA / "gsm8k_train.jsonl").is_file() else _arithmetic_data(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads against another process thrash
    try:
        result = _short_self_distillation(tmp_path, spec)
    finally:
        torch.set_num_threads(threads)
    s = DistillSummary.load(tmp_path / "out")
    assert s == result.summary and s.self_distillation and s.shared_teacher_bytes > 400e6  # one copy of ~513 MB of weights
    first, last = result.evals[0], result.evals[-1]
    assert first["step"] == 0 and last["step"] == 10
    assert last["eval_kl"] < 0.9 * first["eval_kl"], (first, last)


@pytest.mark.slow
def test_kl_only_distillation_from_the_rad_init_never_rises_on_the_default_model(default_model, tmp_path):
    """The `rad` init: 8 KL-only steps at the default lr never lift held-out KL above step 0.
    The paper's literal init (gain 1) does rise under the same settings (measured: 0.775 -> 1.10 by step 3),
    so this test can fail; the `rad` init goes 0.775 -> 0.443 monotonically (docs/distill.md)."""
    spec = None if (SHARED_DATA / "gsm8k_train.jsonl").is_file() else _arithmetic_data(tmp_path)
    curves = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads against another process thrash
    try:
        for init in ("rad", "rad-zero-in-proj"):
            cfg = ConversionConfig(layers=[4, 9, 14, 19, 24], init=init)
            hybrid = convert_to_hybrid(default_model.model, cfg)
            save_hybrid(hybrid, default_model.tokenizer, tmp_path / init,
                        conversion_record("smollm2-135m", default_model.model, cfg))
            del hybrid
            result = run_distill(DistillConfig(
                hybrid=str(tmp_path / init), out=str(tmp_path / f"out-{init}"), steps=8, micro_batch=2,
                loss=LossWeights(kl=1.0, align=0.0),  # lr, warm-up and the gated-norm lr: the defaults
                data=DataConfig(spec=spec, seq_len=64, max_examples=200, eval_examples=8),
                eval_every=1, eval_sequences=8, save_every=0, device="cpu", progress=False, tensorboard=False,
                plots=False))
            curves[init] = [e["eval_kl"] for e in result.evals]
    finally:
        torch.set_num_threads(threads)
    new, old = curves["rad"], curves["rad-zero-in-proj"]
    assert len(new) == len(old) == 9 and new[0] == pytest.approx(old[0], rel=1e-5)  # both start as the draft
    assert max(new[1:]) <= new[0], new
    assert new[-1] < 0.9 * new[0], new
    assert max(old[1:]) > old[0], old


def _arithmetic_data(tmp_path) -> str:
    """Offline stand-in for GSM8K train: short arithmetic answers."""
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a} times {b}?", "answer":
                                        f"{a} times {b} is {a * b}. The answer is {a * b}."}) + "\n"
                            for a in range(2, 22) for b in range(3, 13)))
    return str(path)


def _short_self_distillation(tmp_path, spec):
    return run_distill(DistillConfig(
        hybrid=str(tmp_path / "hybrid"), out=str(tmp_path / "out"), steps=10, micro_batch=2, lr=3e-4,
        warmup_ratio=0.1, loss=LossWeights(align=1.0),
        data=DataConfig(spec=spec, seq_len=64, max_examples=200, eval_examples=8),
        eval_every=10, eval_sequences=8, save_every=0, device="cpu", progress=False, tensorboard=False,
        plots=False,
    ))


def test_fused_head_loss_matches_autograd_reference():
    from rad.distill.loss import fused_distill_terms

    torch.manual_seed(1)
    w_s = torch.randn(40, 8, requires_grad=True)
    w_t = torch.randn(40, 8)
    hs = torch.randn(2, 13, 8, requires_grad=True)
    ht = torch.randn(2, 13, 8)
    mask = (torch.rand(2, 13) > 0.3).float()
    labels = torch.randint(0, 40, (2, 13)).masked_fill(mask == 0, -100)
    fused = fused_distill_terms(hs, ht, mask, w_s, w_t, labels=labels, temperature=2.0, chunk=5)
    g_fused = torch.autograd.grad(fused["kl_sum"] + 0.5 * fused["ce_sum"], (hs, w_s))
    ref = chunked_distill_terms(hs, ht, mask, lambda h: h @ w_s.t(), lambda h: h @ w_t.t(), labels=labels,
                                temperature=2.0, chunk=13)
    g_ref = torch.autograd.grad(ref["kl_sum"] + 0.5 * ref["ce_sum"], (hs, w_s))
    for k in ("kl_sum", "ce_sum", "agree_sum", "teacher_ce_sum"):
        assert fused[k].item() == pytest.approx(ref[k].item(), rel=1e-5), k
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- resume identity (tiny word tokenizer: fast tier)


def _word_data(path, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    path.write_text("".join(json.dumps({"text": " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (20,),
                                                                                           generator=gen))}) + "\n"
                            for _ in range(n)))
    return path


def _save_hybrid_of(src, folder, tokenizer, init="rad", seed=0):
    cfg = ConversionConfig(layers=[1, 3], init=init, seed=seed)
    save_hybrid(convert_to_hybrid(src, cfg), tokenizer, folder, conversion_record(str(folder.parent / "src"), src, cfg),
                overwrite=True)
    return folder


def test_naming_the_hybrids_own_source_as_teacher_is_self_distillation(tmp_path):
    """`--teacher SOURCE` gets self-distillation's defaults (alignment on), as leaving --teacher out does; a
    different teacher has other layers and gets none."""
    from rad.distill.config import DEFAULT_ALIGN_WEIGHT

    src = make_tiny("llama")
    src.save_pretrained(tmp_path / "src")
    hybrid = str(_save_hybrid_of(src, tmp_path / "hybrid", word_tokenizer()))
    source = str(tmp_path / "src")
    assert DistillConfig(hybrid=hybrid, out="o").loss.align == DEFAULT_ALIGN_WEIGHT > 0
    assert DistillConfig(hybrid=hybrid, out="o", teacher=source).loss.align == DEFAULT_ALIGN_WEIGHT
    assert DistillConfig(hybrid=hybrid, out="o", teacher=str(tmp_path / "." / "src")).loss.align == DEFAULT_ALIGN_WEIGHT
    assert DistillConfig(hybrid=hybrid, out="o", teacher="smollm2-135m").loss.align == 0.0
    assert DistillConfig(hybrid=str(tmp_path / "missing"), out="o", teacher=source).loss.align == 0.0


@pytest.fixture(scope="module")
def word_dirs(tmp_path_factory):
    """A tiny Llama with a 96-word tokenizer, its rad hybrid and some data, and a run stopped after step 2 of 4
    with a checkpoint there: what every resume below starts from."""
    root = tmp_path_factory.mktemp("resume_identity")
    tok = word_tokenizer()
    src = make_tiny("llama")
    src.save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    _save_hybrid_of(src, root / "hybrid", tok)
    _word_data(root / "data.jsonl")
    _word_data(root / "other.jsonl", seed=1)

    class Stop(Exception):
        pass

    def stop(step):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        run_distill(_word_config(root, root / "stopped"), on_step=stop)
    assert [p.name for p in list_checkpoints(root / "stopped" / "checkpoints")] == ["step-0000002"]
    return root


def _word_config(root, out, **kw):
    data = dict(spec=str(root / "data.jsonl"), seq_len=16, eval_examples=4)
    data.update(kw.pop("data", {}))
    base = dict(hybrid=str(root / "hybrid"), out=str(out), steps=4, micro_batch=2, grad_accum=1, lr=1e-3,
                data=DataConfig(**data), eval_every=2, eval_sequences=2, save_every=2, device="cpu",
                progress=False, tensorboard=False, plots=False)
    base.update(kw)
    return DistillConfig(**base)


def _stopped_copy(word_dirs, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(word_dirs / "stopped", out)
    return out


# (change on --resume, the setting the refusal must name)
RESULT_CHANGING = {
    "lr": (dict(lr=5e-4), "optimizer.lr"),
    "warmup_ratio": (dict(warmup_ratio=0.5), "optimizer.warmup_ratio"),
    "min_lr_ratio": (dict(min_lr_ratio=0.1), "optimizer.min_lr_ratio"),
    "weight_decay": (dict(weight_decay=0.1), "optimizer.weight_decay"),
    "betas": (dict(betas=(0.9, 0.95)), "optimizer.betas"),
    "max_grad_norm": (dict(max_grad_norm=0.5), "optimizer.max_grad_norm"),
    "steps": (dict(steps=6), "steps"),
    "other data": (dict(data=dict(spec="OTHER")), "data.content"),
    "seq_len": (dict(data=dict(seq_len=12)), "data.seq_len"),
    "max_examples": (dict(data=dict(max_examples=30)), "data.content"),
    "held-out split": (dict(data=dict(eval_examples=6)), "data.content"),
    "seed": (dict(seed=1, data=dict(seed=1)), "seed"),
    "global batch": (dict(micro_batch=4), "global_batch"),
    "train set": (dict(train="all"), "train"),
    "loss weights": (dict(loss=LossWeights(align=0.5)), "loss.align"),
    "temperature": (dict(loss=LossWeights(align=1.0, temperature=2.0)), "loss.temperature"),
    "eval_sequences": (dict(eval_sequences=3), "eval_sequences"),
    "student dtype": (dict(dtype="bfloat16"), "precision.student"),
    "teacher": (dict(teacher="OTHER_TEACHER"), "teacher"),
    "init student": (dict(hybrid="REMADE"), "student"),
}


@pytest.mark.parametrize("name", list(RESULT_CHANGING))
def test_resume_refuses_every_result_changing_setting(word_dirs, tmp_path, name):
    change, setting = RESULT_CHANGING[name]
    change = dict(change)
    if change.get("data", {}).get("spec") == "OTHER":
        change["data"] = {"spec": str(word_dirs / "other.jsonl")}
    if change.get("teacher") == "OTHER_TEACHER":  # same vocabulary, other weights
        make_tiny("llama", seed=5).save_pretrained(tmp_path / "teacher")
        word_tokenizer().save_pretrained(tmp_path / "teacher")
        change["teacher"] = str(tmp_path / "teacher")
    if change.get("hybrid") == "REMADE":  # the hybrid's folder re-made at the same place with another init
        import shutil

        shutil.copytree(word_dirs / "src", tmp_path / "src")
        hybrid = _save_hybrid_of(make_tiny("llama"), tmp_path / "hybrid", word_tokenizer(), init="mil")
        change["hybrid"] = str(hybrid)
    out = _stopped_copy(word_dirs, tmp_path)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(RadError, match=rf"was made with other settings \(.*{setting} .* -> "):
        run_distill(_word_config(word_dirs, out, resume=True, **change))
    assert sorted(p.name for p in out.rglob("*")) == before  # refused before any step, nothing written


def test_resume_with_allowed_changes_uses_and_records_them(word_dirs, tmp_path, caplog):
    import shutil

    # The same models by content at other paths, another micro-batch split of the same global batch, another
    # evaluation and checkpoint cadence: accepted, used from step 2 on, recorded in config.json.
    shutil.copytree(word_dirs / "hybrid", tmp_path / "moved-hybrid")
    shutil.copytree(word_dirs / "src", tmp_path / "teacher-copy")
    out = _stopped_copy(word_dirs, tmp_path)
    result = run_distill(_word_config(word_dirs, out, resume=True, hybrid=str(tmp_path / "moved-hybrid"),
                                      teacher=str(tmp_path / "teacher-copy"), micro_batch=1, grad_accum=2,
                                      loss=LossWeights(align=1.0),  # a given --teacher defaults to align 0
                                      eval_every=1, save_every=1))
    config = json.loads((out / "config.json").read_text())
    assert (config["micro_batch"], config["grad_accum"], config["eval_every"]) == (1, 2, 1)
    assert config["mixer_norm_lr_scale"] == 100.0  # resolved from the fresh rad hybrid's init, and recorded
    assert [e["step"] for e in result.evals] == [0, 2, 3, 4]  # before: every 2 steps; after: every step
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003", "step-0000004"]
    summary = DistillSummary.load(out)
    assert summary.steps == 4 and summary.final_eval.step == 4 and summary.settings["global_batch"] == 2
    # Through the CLI, a changed learning rate is exit 2 with one sentence, not a traceback.
    from rad.cli import main

    caplog.clear()
    code = main(["distill", str(word_dirs / "hybrid"), "--data", str(word_dirs / "data.jsonl"), "--seq-len", "16",
                 "--eval-examples", "4", "--steps", "4", "--micro-batch", "2", "--lr", "0.002", "--eval-every", "2",
                 "--eval-sequences", "2", "--save-every", "2", "--out", str(out), "--resume", "--device", "cpu",
                 "--no-progress"])
    assert code == 2 and "optimizer.lr 0.001 -> 0.002" in caplog.text and "Traceback" not in caplog.text


def test_distill_artefacts_round_trip_and_malformed_files_are_clear_errors(word_dirs, tmp_path):
    from rad.distill.checkpoint import CheckpointState

    summary = DistillSummary.load(_finished_copy(word_dirs, tmp_path))
    assert summary.first_eval.step == 0 and summary.final_eval.step == 4 and summary.settings["data"]["content"]
    summary.save(tmp_path / "again")
    assert DistillSummary.load(tmp_path / "again") == summary
    (tmp_path / "again" / "summary.json").write_text('{"hybrid": "x"}')
    with pytest.raises(RadError, match="is not a rad distillation summary .*re-run `rad distill"):
        DistillSummary.load(tmp_path / "again")
    with pytest.raises(RadError, match="has no summary.json"):
        DistillSummary.load(tmp_path / "nowhere")
    # state.json as an older rad wrote it: its flat train/steps/global_batch/seed become the checked settings.
    legacy = CheckpointState.from_json({"step": 2, "files": {}, "train": "mixers", "global_batch": 2, "steps": 4,
                                        "seed": 0, "data_position": 4, "train_sequences": 20})
    assert legacy.settings == {"train": "mixers", "global_batch": 2, "steps": 4, "data": {"seed": 0}}
    (ckpt,) = list_checkpoints(word_dirs / "stopped" / "checkpoints")
    state = verify_checkpoint(ckpt)
    assert CheckpointState.from_json(state.to_json()) == state and state.step == 2 and state.settings["steps"] == 4


def test_resume_of_an_older_checkpoint_checks_what_it_recorded(word_dirs, tmp_path, caplog):
    out = _stopped_copy(word_dirs, tmp_path)
    (ckpt,) = list_checkpoints(out / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    old = {"step": state["step"], "files": state["files"], "train": "mixers", "global_batch": 2, "steps": 4,
           "seed": 0, "data_position": 4, "train_sequences": state["train_sequences"]}
    (ckpt / "state.json").write_text(json.dumps(old))
    with pytest.raises(RadError, match="steps 4 -> 5"):
        run_distill(_word_config(word_dirs, out, resume=True, steps=5))
    caplog.set_level(logging.WARNING, logger="rad")
    run_distill(_word_config(word_dirs, out, resume=True))
    assert "does not record" in caplog.text and "optimizer.lr" in caplog.text


def _finished_copy(word_dirs, tmp_path):
    out = _stopped_copy(word_dirs, tmp_path)
    run_distill(_word_config(word_dirs, out, resume=True))
    return out


def test_every_distill_setting_is_either_checked_or_allowed_on_resume():
    """A new DistillConfig field must be classified: checked on resume, or explicitly allowed to change."""
    from dataclasses import fields

    from rad.distill.config import ALLOWED_ON_RESUME

    checked = {"train", "steps", "data", "lr", "min_lr_ratio", "weight_decay", "betas", "warmup_ratio",
               "max_grad_norm", "mixer_norm_lr_scale", "loss", "eval_sequences", "precision", "dtype", "teacher_dtype", "seed"}
    names = {f.name for f in fields(DistillConfig)}
    assert names == checked | set(ALLOWED_ON_RESUME), names ^ (checked | set(ALLOWED_ON_RESUME))


# ---------------------------------------------------------------- precision (bf16 compute, fp32 masters)

needs_cpu_bf16 = pytest.mark.skipif(not __import__("rad.utils.precision").utils.precision.bf16_features("cpu"),
                                    reason="this CPU has no fast bf16 (AVX512-BF16 or AMX)")


@needs_cpu_bf16
def test_bf16_stores_frozen_weights_once_and_trains_fp32_masters():
    from rad.utils.precision import compute_dtype, store_frozen

    src, student, _ = _tiny_pair()
    teacher = make_tiny("llama", vocab_size=96)
    names = set(select_trainable(student, "mixers"))
    share_frozen_weights(teacher, student)
    saved = store_frozen([student, teacher], torch.bfloat16)
    assert saved > 0
    for name, p in student.named_parameters():
        assert p.dtype == (torch.float32 if name in names else torch.bfloat16), name
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())  # its own and the shared ones
    frozen = {k: v.detach().clone() for k, v in student.state_dict().items() if k not in names}
    objective = DistillObjective(student, teacher, LossWeights(align=0.1), [1, 3])
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (2, 12))
    with compute_dtype(torch.bfloat16, "cpu"):
        terms = objective(ids, torch.ones_like(ids), torch.ones_like(ids))
    assert terms["kl_sum"].dtype == terms["align_sum"].dtype == torch.float32  # the reductions stay fp32
    terms["loss_sum"].backward()
    opt.step()
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in trainable)
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim() > 0)
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # the frozen weights never move


@needs_cpu_bf16
def test_bf16_distillation_matches_fp32_and_another_precision_is_refused_on_resume(word_dirs, tmp_path):
    from safetensors.torch import load_file as load_tensors

    from rad.distill.checkpoint import load_checkpoint

    results = {p: run_distill(_word_config(word_dirs, tmp_path / p, precision=p, steps=6, eval_every=6))
               for p in ("fp32", "bf16")}
    kl = {p: r.summary.final_eval.eval_kl for p, r in results.items()}
    first = {p: r.summary.first_eval.eval_kl for p, r in results.items()}
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.05)  # the same init, measured in bf16 and fp32
    assert kl["bf16"] == pytest.approx(kl["fp32"], rel=0.05)  # the same run, within 5%
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["precision"] == "bf16" and results["bf16"].summary.settings["precision"]["compute"] == "bf16"
    # The checkpoint's trainable weights and AdamW moments are fp32; the saved student is the hybrid's fp32
    # frozen weights, bitwise, plus what trained.
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "bf16" / "checkpoints")[-1], torch.device("cpu"))
    assert all(v.dtype == torch.float32 for v in ckpt.weights.values())
    assert all(v.dtype == torch.float32 for st in ckpt.optimizer["state"].values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)
    hybrid = load_tensors(word_dirs / "hybrid" / "model.safetensors")
    saved = load_tensors(tmp_path / "bf16" / "student" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())
    for name, value in hybrid.items():
        if name not in ckpt.weights:
            assert torch.equal(saved[name], value), name
    with pytest.raises(RadError, match=r"was made with other settings \(.*precision.compute bf16 -> fp32"):
        run_distill(_word_config(word_dirs, tmp_path / "bf16", precision="fp32", steps=6, eval_every=6,
                                 resume=True))


def test_an_fsdp_launch_on_cpus_is_refused_instead_of_silently_running_ddp(tiny_dirs, tmp_path):
    """accelerate runs FSDP only on GPUs: on CPUs configs/fsdp.yaml would become DDP without a word. rad says so
    (exit 2, one sentence) before loading a model; configs/cpu_2proc.yaml is the CPU command."""
    launcher = [PY, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "fsdp.yaml"),
                "--num_processes", "2", "--main_process_port", "29519", "-m", "rad.cli"]
    r = _cli(_cli_args(tiny_dirs, tmp_path / "fsdp", steps=2), launcher=launcher)
    assert r.returncode != 0
    assert "asks for FSDP, but accelerate" in r.stderr and "only on GPUs" in r.stderr and "configs/cpu_2proc.yaml" in r.stderr, r.stderr[-3000:]
    assert "exitcode: 2" in r.stderr  # rad's exit; the launcher then prints its own traceback of a failed child
    assert "src/rad/" not in r.stderr, r.stderr[-3000:]  # no traceback through rad's code
    assert not (tmp_path / "fsdp" / "checkpoints").exists()


def test_a_run_config_s_keep_checkpoints_reaches_the_distillation(tiny_dirs, tmp_path):
    """`rad run` / `rad sweep` YAML (DistillSettings) bounds the checkpoints a run keeps, as `rad distill` does:
    a baseline student's are GBs each at Qwen."""
    from rad.config import build
    from rad.distill.config import DistillSettings
    from rad.stages import distill_stage

    common = dict(seed=0, device="cpu", sources=("data-dir",), progress=False)
    kept = {}
    for keep in (1, 0):
        distill = build(DistillSettings, {"steps": 4, "seq_len": 16, "micro_batch": 2, "save_every": 1,
                                          "keep_checkpoints": keep, "data": str(tiny_dirs / "data.jsonl"),
                                          "eval_examples": 4, "eval_sequences": 2, "eval_every": 0,
                                          "tensorboard": False, "precision": "fp32"}, "run config")
        out = tmp_path / f"keep{keep}"
        distill_stage(distill, tiny_dirs / "hybrid", out, "mixers", **common)
        kept[keep] = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert len(kept[1]) == 1 and kept[1][0].endswith("4")  # only the newest
    assert len(kept[0]) == 4  # 0 keeps every one
