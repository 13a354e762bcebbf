"""Decoding: the fast decode engine, plain and self-speculative, and text generation on it."""

from rad.decoding.generate import GenerationResult, encode_prompt, generate_text

__all__ = ["GenerationResult", "encode_prompt", "generate_text"]
