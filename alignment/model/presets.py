"""Model shapes: the released Qwen2 sizes (from their config.json) and tiny ones for tests and the demo.

Every preset keeps a real vocabulary size (151,936 or 152,064 rows) so the tokenizer, the
chunked loss and the memory plan are exercised as they are on real checkpoints.
"""

from __future__ import annotations

from typing import Any

from .config import Qwen2Config

_COMMON: dict[str, Any] = dict(
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=None,
    hidden_act="silu",
    use_sliding_window=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "qwen2-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=29568, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # Tiny shapes: 4 layers, 128 wide, the full vocabulary. GQA ratios 2 and 4.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, vocab_size=151936, tie_word_embeddings=True),
    "tiny-untied": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=384, vocab_size=151936, tie_word_embeddings=False),
    "tiny-wide": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=151936, tie_word_embeddings=True),
}


def preset_config(name: str, **overrides: Any) -> Qwen2Config:
    """A Qwen2Config for a named shape; `overrides` replace any field (e.g. rope_scaling, initializer_range)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return Qwen2Config(**{**_COMMON, **PRESETS[name], **overrides})
