"""rad: Redundancy-Aware Distillation of Transformers into hybrid Transformer + Mamba2 models."""

from rad.errors import RadError

__version__ = "0.1.0"

__all__ = ["RadError", "__version__"]
