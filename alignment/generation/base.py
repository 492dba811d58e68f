"""One interface for every generation backend: prompts in, n completions per prompt out.

A prompt is either chat messages ([{role, content}, ...], rendered with the model's chat
template plus the assistant header) or a raw string (sent as is). Backends:
`transformers` (our backbone, in process), `vllm` (offline engine), `vllm-server` (online DPO's
policy served by `qwen2-align serve-policy`, which takes new weights from the trainer) and `openai` (any
OpenAI-compatible server, e.g. `vllm serve`). A recipe's `generation:` section picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from ..precision import resolve_dtype

Prompt = list[dict] | str


class GenerationError(RuntimeError):
    """A backend failed in a way retries did not fix; the message is one line and holds no secrets."""


@dataclass
class Sampling:
    """How to sample: the fields a recipe's `generation:` section and one generate() call share."""

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)


@dataclass
class SamplingParams(Sampling):
    """One generate() call's sampling. `seeds`, one per prompt, makes each prompt's completions depend on its
    own seed alone, not on the prompts it is batched with: a run split over processes samples exactly what
    one process does. Otherwise `seed` seeds the call."""

    seed: int | None = None
    seeds: list[int] | None = None


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


@dataclass
class GenerationSpec(Sampling):
    """The recipe's `generation:` section: which backend and model, and how to sample."""

    backend: Literal["transformers", "vllm", "vllm-server", "openai"] = "transformers"
    model: str = ""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    temperature: float = 0.7
    batch_size: int = 16  # transformers: prompts per generate() call
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    cpu_kvcache_gib: int = 4  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    enforce_eager: bool = False  # no compiled graphs: a faster start, slower decoding
    # openai; vllm-server (online DPO's policy on a `qwen2-align serve-policy` server: its URL, no /v1)
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable, never the key itself
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 3
    # Long context for this generation only, the checkpoint is not changed (see enable_long_context):
    dca_chunk_size: int | None = None  # Dual Chunk Attention chunk size C
    dca_local_size: int | None = None  # DCA local window w
    yarn_factor: float | None = None  # YaRN factor over the trained length
    trained_length: int | None = None  # the length the model was trained at, where config.json does not record it

    def long_context(self) -> dict:
        """Keyword arguments of `enable_long_context`; empty unless YaRN or DCA is asked for."""
        given = {"chunk_size": self.dca_chunk_size, "local_size": self.dca_local_size, "yarn_factor": self.yarn_factor}
        given = {k: v for k, v in given.items() if v is not None}
        if given and self.trained_length is not None:
            given["trained_length"] = self.trained_length
        return given

    def load_dtype(self) -> str:
        """The dtype to load the model in: `auto` on a machine without a GPU is what the matmul probe
        picks, elsewhere as given (`auto` keeps the checkpoint's dtype)."""
        if self.dtype != "auto" or torch.cuda.is_available():
            return self.dtype
        dtype, why = resolve_dtype("auto", "cpu")
        print(f"generation: {why}")
        return dtype

    def sampling(self, seed: int | None = None, **overrides) -> SamplingParams:
        shared = {f.name: getattr(self, f.name) for f in fields(Sampling)}
        return SamplingParams(**(shared | {"stop": list(self.stop), "seed": seed} | overrides))


class Generator(ABC):
    """Subclasses implement `generate`; use as a context manager to release engines and pools."""

    @abstractmethod
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order."""

    def close(self) -> None:
        """Release the engine, threads or connections."""

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
