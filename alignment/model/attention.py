"""Grouped-query attention with QKV bias, RoPE, a KV cache, and SDPA.

Masks are built here, once per forward, from the 2-D padding mask and the position ids:
- no padding, no cache offset: no mask at all, SDPA's `is_causal` path;
- padding or a cache offset: a boolean [b, 1, q, k] mask (causal, valid keys);
- packed samples (position ids restart inside a row, no padding mask): the mask also
  restricts every token to its own sample, so packing never attends across samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .dca import DualChunkPositions, dual_chunk_attention
from .rope import apply_rotary


@dataclass
class AttentionMask:
    """What SDPA needs: an explicit boolean mask (True = attend) or the causal flag."""

    mask: torch.Tensor | None  # [b, 1, q, k] bool, or None
    is_causal: bool


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    q_len: int,
    past_len: int,
) -> AttentionMask:
    """attention_mask: [b, past + q] of 1/0 (or None); position_ids: [b, q]."""
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return AttentionMask(mask, False)
    device = position_ids.device
    kv_len = past_len + q_len
    padded = attention_mask is not None and not bool(attention_mask.all())
    segments = None
    if not padded and past_len == 0 and q_len > 1:
        starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # [b, q-1]: a new sample begins
        if bool(starts.any()):
            segments = F.pad(starts.long(), (1, 0)).cumsum(-1)  # [b, q] sample index per token
    if not padded and segments is None and (past_len == 0 or q_len == 1):
        return AttentionMask(None, q_len > 1)

    q_pos = torch.arange(past_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q, k]
    if padded:
        mask = mask & attention_mask[:, None, None, :kv_len].bool()
    if segments is not None:
        mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    # A query with no key at all (a left-pad position) would give NaN; let it see everything.
    mask = mask | ~mask.any(-1, keepdim=True)
    return AttentionMask(mask, False)


class Qwen2Attention(nn.Module):
    """Multi-head attention with `num_key_value_heads` shared K/V heads (GQA)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [b, n, hidden]
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | DualChunkPositions,  # cos, sin: [b, n, head_dim]
        mask: AttentionMask | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [b, hq, n, d]
        k = self.k_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, hkv, n, d]
        v = self.v_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, hkv, n, d]
        if isinstance(position_embeddings, DualChunkPositions):
            k = apply_rotary(k, *position_embeddings.key)  # at p(j): the cache stores final keys
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            out = dual_chunk_attention(q, k, v, position_embeddings)  # [b, hq, n, d]
            return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [b, hkv, past + n, d]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask.mask,
            is_causal=mask.is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [b, hq, n, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))
