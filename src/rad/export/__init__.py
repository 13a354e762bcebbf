"""Serving: the hybrid (or its teacher) written where people run models; llama.cpp's GGUF first (docs/serve.md)."""

from rad.export.config import FORMATS, TYPES, ExportConfig
from rad.export.gguf import ExportResult, export_gguf

__all__ = ["FORMATS", "TYPES", "ExportConfig", "ExportResult", "export_gguf"]
