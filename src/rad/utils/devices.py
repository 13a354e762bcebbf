"""Device and dtype defaults, decided in one place and always overridable."""

from __future__ import annotations

import torch

from rad.errors import RadError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` checked against this machine (None: `default_device()`); a bad or absent one is a RadError."""

    if device is None or device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RadError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or mps (or leave it out).") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RadError(f"Device {device!r} asks for CUDA, but this machine has no usable CUDA GPU; "
                           "use cpu or leave the device out.")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise RadError(f"Device {device!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0.."
                           f"cuda:{count - 1}.")
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RadError(f"Device {device!r} asks for Apple's MPS, which this machine lacks; use cpu or leave "
                           "the device out.")
    elif resolved.type != "cpu":
        raise RadError(f"Device type {resolved.type!r} is not supported; use cpu, cuda, cuda:N or mps.")
    return resolved


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where it is fast (CUDA), float32 elsewhere (CPU matmuls in bf16 are slow and inexact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:

    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise RadError(f"Unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or 'auto'.")
    return _DTYPES[dtype]


def default_chunk_size(device: torch.device | str) -> int:
    """Mamba2 scan chunk: 256 suits GPU kernels; the pure-torch CPU scan is 1.5-2x faster at 64 (measured)."""
    return 256 if torch.device(device).type == "cuda" else 64


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device` (a CPU: MemAvailable; a GPU: free memory); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits_in_memory(needed: int, device: torch.device | str, what: str, advice: str) -> None:
    """Refuse an allocation that cannot fit (`d_state` 10^8: a 77 GB request), before it is tried."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise RadError(f"{what} needs about {needed / 2**30:.1f} GiB on {torch.device(device)}, which has "
                       f"{free / 2**30:.1f} GiB available; {advice}.")
