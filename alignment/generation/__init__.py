"""Text generation behind one interface: transformers, vLLM, or an OpenAI-compatible server."""

from .base import Completion, GenerationError, GenerationSpec, Generator, Prompt, Sampling, SamplingParams
from .openai_backend import OpenAIGenerator
from .policy_server import PolicyServerGenerator, policy_tag
from .transformers_backend import TransformersGenerator
from .vllm_backend import VLLMGenerator

BACKENDS: dict[str, type[Generator]] = {"transformers": TransformersGenerator, "vllm": VLLMGenerator,
                                        "vllm-server": PolicyServerGenerator, "openai": OpenAIGenerator}


def make_generator(spec: GenerationSpec) -> Generator:
    """The backend a recipe's `generation:` section names."""
    if not spec.model:
        raise GenerationError("generation.model: name a checkpoint directory, Hub id or served model")
    return BACKENDS[spec.backend](spec)


__all__ = ["BACKENDS", "Completion", "GenerationError", "GenerationSpec", "Generator", "PolicyServerGenerator", "Prompt",
           "Sampling", "SamplingParams", "policy_tag", "TransformersGenerator", "VLLMGenerator", "make_generator"]
