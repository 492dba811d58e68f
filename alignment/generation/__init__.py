"""Text generation behind one interface: transformers, vLLM, or an OpenAI-compatible server."""

from .base import Completion, GenerationError, GenerationSpec, Generator, Prompt, SamplingParams, make_generator

__all__ = ["Completion", "GenerationError", "GenerationSpec", "Generator", "Prompt", "SamplingParams",
           "make_generator"]
