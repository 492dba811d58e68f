"""Create and load checkpoints in the standard Hugging Face layout (config, safetensors, tokenizer)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from .atomic import atomic_dir
from .model import (CAUSAL_LM_CLASSES, SEQUENCE_CLASSIFICATION_CLASSES, Qwen2ForCausalLM,
                    Qwen2ForSequenceClassification, enable_long_context, preset_config)
from .tokenizer import CONTROL_TOKEN_IDS, ENDOFTEXT, IM_END, qwen2_tokenizer

# "auto" keeps the dtype the checkpoint was saved in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def chat_generation_config(tokenizer: PreTrainedTokenizerBase | None = None) -> GenerationConfig:
    """Qwen2-Instruct's sampling defaults; generation stops at <|im_end|> or <|endoftext|> (their ids in
    `tokenizer`, Qwen2's by default)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (ENDOFTEXT, IM_END)} if tokenizer \
        else CONTROL_TOKEN_IDS
    return GenerationConfig(
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )


def local_device() -> torch.device:
    """This process's device: its GPU under `accelerate launch` / torchrun (LOCAL_RANK), else the only GPU,
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_checkpoint(preset: str, out: str | os.PathLike, seed: int = 0, dtype: str = "float32",
                    tokenizer: PreTrainedTokenizerBase | None = None, **overrides) -> Path:
    """Write a randomly initialised model of a preset shape, with tokenizer and generation config.

    With a `tokenizer` of its own (`reduced_tokenizer`), the vocabulary is that tokenizer's, rounded up to a
    multiple of 64 rows as Qwen2's 151,936 is, and the control tokens' ids are its ids."""
    if tokenizer is not None:
        overrides = {"vocab_size": -(-len(tokenizer) // 64) * 64, "bos_token_id": tokenizer.convert_tokens_to_ids(
            ENDOFTEXT), "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END)} | overrides
    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = CAUSAL_LM_CLASSES[config.model_type](config).to(DTYPES[dtype])
    model.generation_config = chat_generation_config(tokenizer)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        (tokenizer or qwen2_tokenizer()).save_pretrained(tmp)
    return Path(out)


def _model_type(name_or_path: str | os.PathLike) -> str:
    model_type = PretrainedConfig.get_config_dict(str(name_or_path))[0].get("model_type")
    if model_type not in CAUSAL_LM_CLASSES:
        raise ValueError(f"{name_or_path}: model_type {model_type!r} is not one of {', '.join(CAUSAL_LM_CLASSES)}")
    return model_type


def causal_lm_class(name_or_path: str | os.PathLike) -> type[Qwen2ForCausalLM]:
    """Our causal LM for a checkpoint's `model_type` (`qwen2` or `qwen2_moe`)."""
    return CAUSAL_LM_CLASSES[_model_type(name_or_path)]


def reward_model_class(name_or_path: str | os.PathLike) -> type[Qwen2ForSequenceClassification]:
    """Our sequence-scoring model (reward model) for a checkpoint's `model_type`."""
    return SEQUENCE_CLASSIFICATION_CLASSES[_model_type(name_or_path)]


def load_causal_lm(
    name_or_path: str | os.PathLike, dtype: str = "float32", long_context: dict | None = None
) -> Qwen2ForCausalLM:
    """Our backbone from a local checkpoint or a Hub id (any standard `qwen2` or `qwen2_moe` checkpoint).

    `long_context` (keyword arguments of `enable_long_context`: chunk_size, local_size,
    yarn_factor, trained_length) changes the loaded config only, e.g. for evaluation; the
    checkpoint is untouched.
    """
    cls = causal_lm_class(name_or_path)
    kwargs = {}
    if long_context:
        kwargs["config"] = enable_long_context(cls.config_class.from_pretrained(str(name_or_path)), **long_context)
    return cls.from_pretrained(str(name_or_path), dtype=DTYPES[dtype], **kwargs)


def checkpoint_tensors(path: str | os.PathLike) -> tuple[list[tuple[str, list[int]]], Iterator[tuple[str, torch.Tensor]]]:
    """A checkpoint folder's tensors by name: their shapes, and an iterator reading each in turn from its
    safetensors file (one tensor in memory at a time)."""
    files = sorted(Path(path).glob("*.safetensors"))
    layout = []
    for file in files:
        with safe_open(file, framework="pt") as weights:
            layout += [(name, list(weights.get_slice(name).get_shape())) for name in weights.keys()]

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(file, framework="pt") as weights:
                for name in weights.keys():
                    yield name, weights.get_tensor(name)

    return layout, read()
