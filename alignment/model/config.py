"""Qwen2 configurations: the standard HF `qwen2` and `qwen2_moe` config.json, plus the DCA field vLLM reads.

We extend transformers' own config classes (they already parse `rope_theta`, `rope_scaling` and
`rope_parameters`) and, on save, also write the legacy `rope_theta` / `rope_scaling` keys:
readers older than transformers 5 (and some serving stacks) only know those, and without them
they silently fall back to base 10,000 and no YaRN.

The trained length (what YaRN and DCA scale from) is the original length of the RoPE scaling
when there is one, else an optional top-level `original_max_position_embeddings`, which our
presets write (stock transformers and vLLM keep it and ignore it for plain RoPE);
`max_position_embeddings` alone is not trusted (`dca.trained_length_of`).
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config as _HFQwen2Config
from transformers import Qwen2MoeConfig as _HFQwen2MoeConfig


class Qwen2Config(_HFQwen2Config):
    """`model_type` "qwen2". `dual_chunk_attention_config` = {chunk_size, local_size,
    original_max_position_embeddings} switches on Dual Chunk Attention (as in vLLM)."""

    dual_chunk_attention_config: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return with_legacy_rope_keys(super().to_dict())


class Qwen2MoeConfig(_HFQwen2MoeConfig):
    """`model_type` "qwen2_moe" (Qwen2-57B-A14B): transformers' fields (`num_experts`,
    `num_experts_per_tok`, `moe_intermediate_size`, `shared_expert_intermediate_size`,
    `norm_topk_prob`, `router_aux_loss_coef`, `decoder_sparse_step`, `mlp_only_layers`,
    `output_router_logits`) and, like `Qwen2Config`, `dual_chunk_attention_config`."""

    dual_chunk_attention_config: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return with_legacy_rope_keys(super().to_dict())


def with_legacy_rope_keys(d: dict[str, Any]) -> dict[str, Any]:
    """Add `rope_theta` and (for scaled RoPE) `rope_scaling` beside `rope_parameters`."""
    params = d.get("rope_parameters") or {}
    if "rope_theta" in params:
        d["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        d["rope_scaling"] = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
        d["rope_scaling"]["type"] = rope_type
    if d.get("dual_chunk_attention_config") is None:
        d.pop("dual_chunk_attention_config", None)
    return d
