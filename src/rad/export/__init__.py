"""Serving: the hybrid (or its teacher) written where people run models: llama.cpp's GGUF (a file) and a vLLM
folder (docs/serve.md)."""

from rad.export.config import FORMATS, TYPES, ExportConfig
from rad.export.gguf import ExportResult, export_gguf
from rad.export.vllm import VllmExport, check_vllm, export_vllm, vllm_problems


def export(config: ExportConfig) -> ExportResult | VllmExport:
    """`rad export`: the writer of `config.format`."""
    return export_vllm(config) if config.format == "vllm" else export_gguf(config)


__all__ = ["FORMATS", "TYPES", "ExportConfig", "ExportResult", "VllmExport", "check_vllm", "export", "export_gguf",
           "export_vllm", "vllm_problems"]
