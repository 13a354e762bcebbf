"""Find every input a command will need before its first stage starts, and say in one place what was found.

Without this a run found a missing dataset only when its stage came, half an hour in. Now `rad run`,
`rad ablate` and `rad eval` resolve the model, each task's data, the distillation data and the held-out
texts within the first seconds: a missing required input stops the command at once (exit 2, one sentence
saying what to do), a missing task is dropped with a visible note when the settings allow it, and the
hub is probed once, so an offline machine never waits on retries. The result (`inputs.json` in the output
folder) travels into the report, which then says which tasks could not be scored and why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rad.data import (
    PYTHON_DOCS,
    PYTHON_DOCSTRINGS,
    SOURCES,
    HubStatus,
    find_rows,
    probe_hub,
    python_docs_records,
    usable_sources,
)
from rad.distill.data import locate_data, locate_named
from rad.errors import RadError
from rad.evaluate.inputs import TASK_TITLES, InputStatus, check_model, check_task_data
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"


@dataclass
class InputReport:
    """Everything a command resolved before starting; saved as inputs.json and shown in the report."""

    hub: HubStatus
    sources: tuple[str, ...]
    inputs: list[InputStatus] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # the tasks that will be scored
    dropped_tasks: dict[str, str] = field(default_factory=dict)  # task -> why, and how to get its data
    distill_data: str | None = None  # where the default distillation data comes from

    def log(self) -> None:
        logger.info("Inputs (%s):", self.hub.describe())
        for item in self.inputs:
            mark = "found" if item.found else "MISSING"
            logger.info("  %-26s %-7s %s%s", item.what, mark, item.where, f"  [{item.note}]" if item.note else "")
        for task, why in self.dropped_tasks.items():
            logger.warning("%s will not be scored: %s", TASK_TITLES.get(task, task), why)

    def save(self, folder: Path) -> Path:
        return atomic_write_text(Path(folder) / INPUTS_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> InputReport:
        return load_artefact(Path(folder) / INPUTS_FILE, cls.from_json, "a rad input report",
                             "delete it and re-run the command to resolve the inputs again")

    @classmethod
    def from_json(cls, data: dict) -> InputReport:
        return cls(hub=HubStatus(**data["hub"]), sources=tuple(data["sources"]),
                   inputs=[InputStatus(**i) for i in data["inputs"]], tasks=list(data["tasks"]),
                   dropped_tasks=dict(data["dropped_tasks"]), distill_data=data.get("distill_data"))

    def markdown(self) -> str:
        lines = [f"Resolved before the first stage; {self.hub.describe()}.", "",
                 "| input | found | where |", "|---|---|---|"]
        for item in self.inputs:
            where = item.where + (f" ({item.note})" if item.note else "")
            lines.append(f"| {item.what} | {'yes' if item.found else '**no**'} | {where} |")
        for task, why in self.dropped_tasks.items():
            lines += ["", f"**{TASK_TITLES.get(task, task)} was not scored**: {why}."]
        return "\n".join(lines) + "\n"


def check_distill_data(spec: str | None, sources: tuple[str, ...]) -> InputStatus:
    """The default distillation data (GSM8K train, else Python's docs, noted), or the user's --data."""
    if spec is None:
        rows, located = find_rows("gsm8k_train", sources=sources)
        if rows is not None:
            return InputStatus("distillation data", True, located.where, f"{len(rows)} records")
        if python_docs_records():
            return InputStatus("distillation data", True, PYTHON_DOCS,
                               "fallback: no GSM8K train (" + "; ".join(located.tried) + ")")
        raise RadError("No distillation data: GSM8K train is nowhere (" + "; ".join(located.tried) + ") and this "
                       "Python has no pydoc_data; set distill.data to a file or hub id.")
    location = locate_data(spec, sources)
    if location.kind == "named":
        found = locate_named(location.where, sources)
        return InputStatus("distillation data", True, location.where,
                           ", ".join(f"{part}: {len(rows)} records from {loc.where}" for part, rows, loc in found))
    where = f"hub:{location.where}" if location.kind == "hub" else location.where
    return InputStatus("distillation data", True, where)


def check_heldout_texts(sources: tuple[str, ...], data_dir: str | None) -> InputStatus:
    """The texts for KL / perplexity / agreement: the tail of GSM8K train, else stdlib docstrings (noted)."""
    rows, located = find_rows("gsm8k_train", data_dir, tuple(s for s in sources if s != "package"))
    if rows is not None:
        return InputStatus("held-out texts (teacher)", True, located.where, "last items of GSM8K train")
    return InputStatus("held-out texts (teacher)", True, PYTHON_DOCSTRINGS,
                       "fallback: no GSM8K train; standard-library docstrings")


def check_inputs(model: str, tasks: list[str], *, on_missing_task: str = "skip", distill: bool = True,
                 distill_data: str | None = None, teacher_texts: bool = True, data_dir: str | None = None,
                 hub: HubStatus | None = None, extra_models: tuple[str, ...] = ()) -> InputReport:
    """Resolve everything a run needs, log it, and raise RadError (before any work) for what is required."""
    hub = hub or probe_hub()
    sources = usable_sources(hub, SOURCES)
    report = InputReport(hub=hub, sources=sources)
    report.inputs.append(check_model(model, hub))
    for spec in extra_models:
        report.inputs.append(check_model(spec, hub, what="model"))
    if distill:
        status = check_distill_data(distill_data, sources)
        report.inputs.append(status)
        report.distill_data = status.where
    report.tasks, report.dropped_tasks, statuses = check_task_data(list(tasks), sources, data_dir, on_missing_task)
    report.inputs += statuses
    if teacher_texts:
        report.inputs.append(check_heldout_texts(sources, data_dir))
    report.log()
    return report
