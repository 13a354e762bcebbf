"""The settings every orchestrator shares beyond each stage's own: the model, the output folder, device, seed."""

from __future__ import annotations

from rad.config import check_seed
from rad.errors import RadError
from rad.utils.devices import resolve_device


def check_run_settings(config) -> None:
    """What `rad run`, `rad sweep` and `rad ablate` share beyond each stage's own checks: the model, out, device,
    seed, and the speed contexts of a config that has them."""
    if not str(config.model).strip():
        raise RadError("The model setting is empty; give an alias (smollm2-135m), a folder or a hub id.")
    if not str(config.out).strip():
        raise RadError("The out setting is empty; give the folder the run writes to.")
    check_seed(config.seed)
    resolve_device(config.device)
    for context in getattr(config, "speed_contexts", []):
        if context < 1:
            raise RadError(f"speed_contexts must be positive token counts, got {context}.")
