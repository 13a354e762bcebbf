"""Compute precision for training: bf16 where the device multiplies bf16 fast, float32 elsewhere.

bf16 matmuls run 4x faster than float32 on a CPU with AVX512-BF16 / AMX (measured, docs/distill.md) and on
any CUDA GPU with bf16 support, while bf16 master weights would lose small Adam updates (bf16 keeps 8 bits
of mantissa). So what trains keeps float32 weights and optimiser state, frozen weights (which never
change) may be stored in bf16 once (`store_frozen`), and `compute_dtype` autocasts the mixed products.
Loss reductions (log-softmax, KL, MSE) stay float32 at their call sites (rad.distill.loss).

`rad distill` uses this; any other trainer (rad.align) can: `resolve_precision(setting, device)` then
`with compute_dtype(dtype, device): ...`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from rad.errors import RadError
from rad.utils.devices import resolve_dtype

PRECISIONS = ("auto", "bf16", "fp32")
_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def bf16_features(device: torch.device | str) -> list[str]:
    """The hardware features that make bf16 matmuls fast on `device` (empty: none, bf16 would be emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ["cuda-bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []
    if device.type != "cpu":
        return []
    probes = {"avx512-bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    found = []
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)  # private probes; absent in some torch builds
        if check is not None and check():
            found.append(name)
    return found


def resolve_precision(setting: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype of `setting` (auto | bf16 | fp32) on `device`: auto is bf16 where it is fast."""

    if setting not in PRECISIONS:
        raise RadError(f"Unknown precision {setting!r}; use one of {', '.join(PRECISIONS)}.")
    if setting == "fp32":
        return torch.float32
    fast = bool(bf16_features(device))
    if setting == "bf16" and not fast:
        raise RadError(f"Precision bf16 needs a device with fast bf16 matmuls (CUDA with bf16, or a CPU with "
                       f"AVX512-BF16 or AMX), which {torch.device(device)} is not; use fp32 or auto.")
    return torch.bfloat16 if fast else torch.float32


def generation_dtype(setting: str | None, device: torch.device | str) -> torch.dtype | None:
    """The dtype answers are generated in on `device`: None keeps the model's own; `auto` is bf16 where the device
    multiplies bf16 fast and the model's own elsewhere. An explicit bf16 on a device without fast bf16 is refused:
    emulated bf16 matmuls ran at 1 GFLOP/s against fp32's 133 on an AVX2-only CPU (torch 2.13, 2 threads)."""

    if setting is None:
        return None
    if setting == "auto":
        return torch.bfloat16 if bf16_features(device) else None
    dtype = resolve_dtype(setting, device)
    if dtype == torch.bfloat16 and not bf16_features(device):
        raise RadError(f"Generating in {setting} needs a device with fast bf16 matmuls (CUDA with bf16, or a CPU with "
                       f"AVX512-BF16 or AMX), which {torch.device(device)} is not (bf16 would be emulated, about 100x "
                       "slower); use auto or float32.")
    return dtype


def precision_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32': the name config.json and the resume identity record."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def describe_precision(setting: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """One log line: what was asked, what runs, and why."""
    features = bf16_features(device)
    why = f"{torch.device(device).type} has {', '.join(features)}" if features else \
        f"{torch.device(device).type} has no fast bf16"
    if dtype == torch.float32:
        return f"Precision {setting}: fp32 compute ({why})"
    return (f"Precision {setting}: bf16 compute, fp32 trainable weights, optimiser state and loss reductions, "
            f"frozen weights stored in bf16 ({why})")


@contextlib.contextmanager
def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Autocast to `dtype` on `device`'s type; nothing at all for float32 (so fp32 runs stay bitwise as before)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


@torch.no_grad()
def store_frozen(modules: Iterable[torch.nn.Module], dtype: torch.dtype) -> int:
    """Cast every frozen parameter of `modules` to `dtype` in place, once per tensor (a teacher sharing the
    student's frozen tensors is cast with it); returns the bytes saved. What trains is left as it is."""
    seen: set[int] = set()
    saved = 0
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or p.requires_grad or p.dtype == dtype or not p.is_floating_point():
                continue
            seen.add(id(p))
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    return saved
