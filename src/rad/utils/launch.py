"""What a multi-process launch (`accelerate launch`, torchrun) asked for, checked against what runs.

accelerate 1.16 sets up FSDP only for accelerator devices (its state's FSDP branch is taken for MULTI_GPU, XPU,
NPU, ...): on CPUs an FSDP config silently becomes DDP (MULTI_CPU) or fails in accelerate's constructor, and a
DeepSpeed config on CPUs starts every process believing it is alone (num_processes 1 of WORLD_SIZE 2, found here).
Training then would either run another engine than the user chose or run the same steps n times over. rad's
distillation itself runs under DDP only (see `check_engine_device`). All of it is refused before any model loads.
"""

from __future__ import annotations

import os

from rad.errors import RadError


def launched_world() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RadError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number of processes; unset it or "
                       "launch with accelerate launch / torchrun.") from None


def requested_engine(environ=None) -> str | None:
    """The sharding engine an accelerate config asked for: "FSDP", "DeepSpeed" or None (DDP / one process)."""
    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    return None


def check_engine_device(cpu: bool, command: str) -> None:
    """Before `Accelerator()`: refuse an FSDP or DeepSpeed launch. On CPUs accelerate cannot run them (with the
    shipped FSDP config its own constructor fails: "FSDP parameter initialization with `sync_module_states=True` is
    not supported on cpu"); on GPUs rad's checkpoints and final student read each parameter whole, which under
    sharding would be each process's shard, and no GPU has been lent to test a gathered version."""
    import accelerate
    import torch

    engine = requested_engine()
    if engine is None:
        return
    if cpu or not torch.cuda.is_available():
        where = "--device cpu" if cpu else "this machine, which has no GPU"
        raise RadError(f"The accelerate config asks for {engine}, but accelerate {accelerate.__version__} runs "
                       f"{engine} only on GPUs (and similar accelerators), not on {where}. Launch {command} on CPUs "
                       "with configs/cpu_2proc.yaml (DDP), or run the config on GPUs.")
    raise RadError(f"{command} trains under DDP, not {engine}: its checkpoints and final student would hold each "
                   f"process's shard of the weights rather than the weights (docs/scaling.md). Launch it with "
                   "configs/ddp.yaml: the mixers it trains are under 1% of the parameters, so DDP replicates little "
                   "optimiser state.")


def check_launch(accelerator, command: str) -> None:
    """Refuse a launch whose processes did not come up as asked (see the module docstring)."""
    import accelerate

    engine = requested_engine()
    running = accelerator.distributed_type.name
    device = accelerator.device.type
    world = launched_world()
    if engine == "FSDP" and running != "FSDP":
        raise RadError(f"The accelerate config asks for FSDP, but accelerate {accelerate.__version__} runs FSDP only "
                       f"on GPUs (and similar accelerators); on {device} it would run {running} instead. Launch "
                       f"{command} on CPUs with configs/cpu_2proc.yaml (DDP), or run the FSDP config on GPUs.")
    if engine == "DeepSpeed" and running != "DEEPSPEED":
        raise RadError(f"The accelerate config asks for DeepSpeed, but accelerate set up {running} on {device}; check "
                       "that deepspeed is installed (pip install deepspeed) and that GPUs are visible.")
    if accelerator.num_processes != world:
        what = f"{engine} " if engine else ""
        raise RadError(f"The launcher started {world} processes but accelerate's {what}state sees "
                       f"{accelerator.num_processes} on {device} (accelerate {accelerate.__version__} does not join "
                       f"{what or 'these '}processes into one group here); launch {command} on CPUs with "
                       "configs/cpu_2proc.yaml (DDP), or on GPUs.")


def refuse_launcher(command: str) -> None:
    """For commands that run in one process: several copies would all do the whole job into one folder."""
    world = launched_world()
    if world > 1:
        raise RadError(f"{command} runs in one process, but a launcher started {world}; run it without accelerate "
                       "launch / torchrun (its cost is one teacher pass and small per-layer steps).")
