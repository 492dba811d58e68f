"""Model shapes: the released Qwen2 sizes (from their config.json) and tiny ones for tests and the demo.

Presets with `num_experts` are `qwen2_moe` shapes and give a `Qwen2MoeConfig`.

Every preset keeps a real vocabulary size (151,936 or 152,064 rows) so the tokenizer, the
chunked loss and the memory plan are exercised as they are on real checkpoints.
"""

from __future__ import annotations

from typing import Any

from .config import Qwen2Config, Qwen2MoeConfig

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
    # Upcycled from qwen2-7b: 64 routed experts of width 2560, 8 active, one shared expert of width 8 x 2560.
    "qwen2-57b-a14b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=151936, tie_word_embeddings=False,
                           num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                           shared_expert_intermediate_size=20480, norm_topk_prob=False, router_aux_loss_coef=0.001,
                           decoder_sparse_step=1, mlp_only_layers=[]),
    # Tiny shapes: 4 layers, 128 wide, the full vocabulary. GQA ratios 2 and 4.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, vocab_size=151936, tie_word_embeddings=True),
    "tiny-untied": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=384, vocab_size=151936, tie_word_embeddings=False),
    "tiny-wide": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=151936, tie_word_embeddings=True),
    # `tiny` with MoE layers, the shape `make upcycle` builds from `tiny`: 8 experts of width 96
    # (a quarter of tiny's FFN), 2 active, a shared expert as wide as tiny's FFN.
    "tiny-moe": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=384, vocab_size=151936, tie_word_embeddings=True,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                     shared_expert_intermediate_size=384, norm_topk_prob=False, router_aux_loss_coef=0.001,
                     decoder_sparse_step=1, mlp_only_layers=[]),
}


def preset_config(name: str, **overrides: Any) -> Qwen2Config | Qwen2MoeConfig:
    """The config of a named shape; `overrides` replace any field (e.g. rope_scaling, initializer_range).

    A preset is a model we train ourselves, so its max_position_embeddings (or the original length
    of a RoPE scaling given in `overrides`) is the trained length. It is recorded as the top-level
    `original_max_position_embeddings`, which checkpoints from `init` and `upcycle` keep in
    config.json, so YaRN and DCA (`enable_long_context`) scale from it with no --trained-length.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {**_COMMON, **PRESETS[name], **overrides}
    scaling = fields.get("rope_scaling") or fields.get("rope_parameters") or {}
    fields.setdefault(
        "original_max_position_embeddings",
        scaling.get("original_max_position_embeddings") or fields["max_position_embeddings"],
    )
    return (Qwen2MoeConfig if "num_experts" in fields else Qwen2Config)(**fields)
