"""`rad run`: the whole RAD pipeline in one command, from one YAML file.

One run is the stage layer's unit (`rad.stages.run.run_stages`: search → convert → distil → evaluate → speed →
`report.md`, each stage skipped when its folder is complete, a run folder continued only under the settings it
was made with); this module adds what the command owns: its presets and the settings loader.
"""

from __future__ import annotations

from pathlib import Path

from rad.config import load_settings, preset_file
from rad.stages.run import run_stages
from rad.stages.run_config import RunConfig


def load_run_config(preset: str | None = None, config_path: str | None = None, overrides=()) -> RunConfig:
    """Preset (smoke, default, paper) and/or a YAML file, then `key.sub=value` overrides (YAML-parsed)."""
    return load_settings(RunConfig, preset_file(preset) if preset else None, config_path, overrides)


def run_pipeline(config: RunConfig) -> Path:
    """Run (or continue) every stage of `rad run`; returns the path of report.md."""
    return run_stages(config)
