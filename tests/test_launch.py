"""Launches that would not run as asked are refused before any model loads (rad.utils.launch)."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from rad.cli import main
from rad.errors import RadError
from rad.utils.launch import check_engine_device, check_launch, refuse_launcher, requested_engine


def test_the_engine_an_accelerate_config_asked_for():
    assert requested_engine({}) is None
    assert requested_engine({"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "True"}) == "DeepSpeed"


@pytest.mark.parametrize("variable, engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_and_deepspeed_on_cpus_are_refused(variable, engine, monkeypatch):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(RadError, match=f"asks for {engine}, but accelerate .* only on GPUs"):
        check_engine_device(cpu=True, command="rad distill")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a GPU machine: refused for rad's own reason
    with pytest.raises(RadError, match=f"trains under DDP, not {engine}: its checkpoints"):
        check_engine_device(cpu=False, command="rad distill")
    monkeypatch.delenv(variable)
    check_engine_device(cpu=True, command="rad distill")  # DDP or one process: fine anywhere


def test_processes_that_do_not_form_one_group_are_refused(monkeypatch):
    accelerator = Accelerator(cpu=True)  # one process, as accelerate's DeepSpeed-on-CPU state was seen to be
    check_launch(accelerator, "rad distill")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RadError, match="started 2 processes but accelerate's state sees 1"):
        check_launch(accelerator, "rad distill")


def test_align_under_a_launcher_is_refused_before_any_work(tmp_path, monkeypatch, caplog):
    refuse_launcher("rad align")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RadError, match="runs in one process, but a launcher started 2"):
        refuse_launcher("rad align")
    assert main(["align", str(tmp_path / "no-hybrid"), "--out", str(tmp_path / "out")]) == 2
    assert any("runs in one process" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RadError, match="not a number of processes"):
        refuse_launcher("rad align")
