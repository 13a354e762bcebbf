"""Decoding: plain generation (and, later, the self-speculative engine)."""

from rad.decoding.generate import GenerationResult, encode_prompt, generate_text

__all__ = ["GenerationResult", "encode_prompt", "generate_text"]
