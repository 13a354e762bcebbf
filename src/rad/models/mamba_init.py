"""Moved to `rad.models.mixers` (the mixer seam). This alias stays only until distill/train.py, which another
branch is splitting, asks the seam (`rad.models.mixers.init_defaults`); delete it at that merge."""

from rad.models.mixers.mamba2 import INIT_DEFAULTS, INITS, RAD_GATE_GAIN

__all__ = ["INIT_DEFAULTS", "INITS", "RAD_GATE_GAIN"]
