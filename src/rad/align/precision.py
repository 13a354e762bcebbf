"""Which precision the teacher pass runs in: `auto` is bf16 where the hardware computes it natively.

SWAP POINT: `bf16_supported` is alignment's own small detection. A shared switch for distillation is being
added in `rad.utils.precision`; when it lands, point `bf16_supported` (or `resolve_precision`) at it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rad.errors import RadError

PRECISIONS = ("auto", "bf16", "fp32")
# CPU flags of native bf16 arithmetic (AVX512-BF16 dot products, AMX tiles); without them oneDNN emulates bf16
# and a bf16 forward is slower than fp32.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise RadError(f"Unknown precision {precision!r}; use {', '.join(PRECISIONS)}.")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`bf16` or `fp32`: `auto` is bf16 where `bf16_supported`, else fp32; an explicit choice is kept."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision
