"""Create and load checkpoints in the standard Hugging Face layout (config, safetensors, tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GenerationConfig

from .atomic import atomic_dir
from .model import Qwen2Config, Qwen2ForCausalLM, enable_long_context, preset_config
from .tokenizer import CONTROL_TOKEN_IDS, ENDOFTEXT, IM_END, qwen2_tokenizer

# "auto" keeps the dtype the checkpoint was saved in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def chat_generation_config() -> GenerationConfig:
    """Qwen2-Instruct's sampling defaults; generation stops at <|im_end|> or <|endoftext|>."""
    return GenerationConfig(
        bos_token_id=CONTROL_TOKEN_IDS[ENDOFTEXT],
        eos_token_id=[CONTROL_TOKEN_IDS[IM_END], CONTROL_TOKEN_IDS[ENDOFTEXT]],
        pad_token_id=CONTROL_TOKEN_IDS[ENDOFTEXT],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )


def init_checkpoint(preset: str, out: str | os.PathLike, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Write a randomly initialised model of a preset shape, with tokenizer and generation config."""
    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(DTYPES[dtype])
    model.generation_config = chat_generation_config()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        qwen2_tokenizer().save_pretrained(tmp)
    return Path(out)


def load_causal_lm(
    name_or_path: str | os.PathLike, dtype: str = "float32", long_context: dict | None = None
) -> Qwen2ForCausalLM:
    """Our backbone from a local checkpoint or a Hub id (any standard `qwen2` checkpoint).

    `long_context` (keyword arguments of `enable_long_context`: chunk_size, local_size,
    yarn_factor) changes the loaded config only, e.g. for evaluation; the checkpoint is untouched.
    """
    kwargs = {}
    if long_context:
        kwargs["config"] = enable_long_context(Qwen2Config.from_pretrained(str(name_or_path)), **long_context)
    return Qwen2ForCausalLM.from_pretrained(str(name_or_path), dtype=DTYPES[dtype], **kwargs)

