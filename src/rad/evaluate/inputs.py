"""What an evaluation reads, checked before any model loads: each model spec, each task's data, the CRUXEval
sandbox. `rad eval` checks its models and tasks with these; `rad.preflight` builds every command's input report
on them (so this module, not preflight, is what the evaluation stands on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rad.data import DATASETS, HubStatus, find_rows
from rad.errors import RadError
from rad.evaluate.sandbox import ISOLATION_ENV, SandboxLimits, require_sandbox
from rad.models.loading import resolve_to_folder

# task -> the datasets it reads (passkey is synthetic)
TASK_DATA = {"gsm8k": ("gsm8k_test",), "cruxeval": ("cruxeval",), "humaneval": ("humaneval",), "passkey": ()}
TASK_TITLES = {"gsm8k": "GSM8K", "cruxeval": "CRUXEval-O", "humaneval": "HumanEval", "passkey": "Passkey recall"}
RUNS_CODE = ("cruxeval", "humaneval")  # scored by running model-written code: they need the sandbox
MISSING_TASK_POLICIES = ("skip", "error")


@dataclass
class InputStatus:
    """One input: what it is, whether it was found, where (or what was tried), and what happens now."""

    what: str
    found: bool
    where: str
    note: str = ""


def check_model(spec: str, hub: HubStatus, what: str = "model") -> InputStatus:
    """The model is on this machine (an alias's package, a folder, a .gguf file) or reachable on the hub.

    An alias's safetensors cache is built here when missing (~20 s, once), since every stage needs it."""
    folder = resolve_to_folder(spec)  # RadError (exit 2) for a missing package, path or unknown alias
    if folder is not None:
        return InputStatus(f"{what} {spec}", True, str(folder))
    if hub.online:
        return InputStatus(f"{what} {spec}", True, f"hub:{spec}")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # an unusual cache layout is the same as no cache
        cached = None
    if isinstance(cached, str):
        return InputStatus(f"{what} {spec}", True, f"hub cache {Path(cached).parent}")
    raise RadError(f"The model {spec!r} is a hub id, but the hub is offline ({hub.detail}) and it is not in the "
                   "local hub cache; use an alias, a local folder or a .gguf file, or run where the hub is reachable.")


def check_task_data(tasks: list[str], sources: tuple[str, ...], data_dir: str | None,
                    on_missing: str, sandbox=None) -> tuple[list[str], dict[str, str], list[InputStatus]]:
    """(tasks kept, tasks dropped with why, statuses); with on_missing='error' a missing task stops here.
    CRUXEval also needs its sandbox (`sandbox`: SandboxLimits, default settings): no sandbox is a RadError."""
    if on_missing not in MISSING_TASK_POLICIES:
        raise RadError(f"Unknown policy for missing task data {on_missing!r}; choose {' or '.join(MISSING_TASK_POLICIES)}.")
    kept, dropped, statuses = [], {}, []
    for task in tasks:
        if task not in TASK_DATA:
            raise RadError(f"Unknown task {task!r}; choose from {', '.join(TASK_DATA)}.")
        missing = None
        for name in TASK_DATA[task]:
            rows, located = find_rows(name, data_dir, sources)
            title = f"{TASK_TITLES[task]} data ({DATASETS[name].filename})"
            if rows is None:
                why = f"data not available ({'; '.join(located.tried)}); {located.how_to_get()}"
                statuses.append(InputStatus(title, False, "; ".join(located.tried),
                                            "task dropped" if on_missing == "skip" else "required"))
                missing = why
                break
            statuses.append(InputStatus(title, True, located.where, f"{len(rows)} items"))
        if missing is None:
            kept.append(task)
        elif on_missing == "error":
            raise RadError(f"{TASK_TITLES[task]} cannot be scored: {missing}; or leave the task out.")
        else:
            dropped[task] = missing
    if any(task in kept for task in RUNS_CODE):
        statuses.append(check_sandbox(sandbox))
    return kept, dropped, statuses


def check_sandbox(sandbox=None) -> InputStatus:
    """CRUXEval and HumanEval run model-written code: bubblewrap must work here (a tiny sandboxed run, ~0.2 s), or the user
    opted out explicitly; either way before any model is loaded."""
    sandbox = sandbox or SandboxLimits()
    require_sandbox(sandbox)
    if sandbox.isolation == "none":
        return InputStatus("CRUXEval sandbox", True, f"none ({ISOLATION_ENV}=none)", "NO isolation: opted out")
    return InputStatus("CRUXEval sandbox", True, "bubblewrap", "namespaces, no network, read-only view")
