"""Rotary position embeddings: plain RoPE from `rope_theta`, and YaRN (NTK-by-parts).

YaRN, for rotary pair i of d/2 with base b, original length L0 and factor s:
    dim(r)  = d * ln(L0 / (2 pi r)) / (2 ln b)
    low     = floor(dim(beta_fast)), high = ceil(dim(beta_slow))   (clamped to [0, d-1])
    ramp_i  = clamp((i - low) / (high - low), 0, 1)
    inv_freq_i = theta_i * (1 - ramp_i) + theta_i / s * ramp_i
Fast-rotating pairs (ramp 0) keep theta_i; slow ones are interpolated by s. cos and sin are
multiplied by the attention factor m = 0.1 ln(s) + 1, so attention logits scale by m^2.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale (attention factor)."""
    base = float(rope_parameters["rope_theta"])
    dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [d/2]
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope type {rope_type!r} is not supported (use default or yarn)")

    if not rope_parameters.get("original_max_position_embeddings"):  # max_position_embeddings is the scaled limit
        raise ValueError("YaRN needs rope_parameters['original_max_position_embeddings'], the trained length")
    original_len = int(rope_parameters["original_max_position_embeddings"])
    factor = rope_parameters.get("factor") or max_position_embeddings / original_len
    attention_factor = rope_parameters.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)

    beta_fast = rope_parameters.get("beta_fast") or 32
    beta_slow = rope_parameters.get("beta_slow") or 1
    low = _yarn_correction_dim(beta_fast, dim, base, original_len)
    high = _yarn_correction_dim(beta_slow, dim, base, original_len)
    if rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [d/2]
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in float32 then cast to the activations' dtype."""

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.args = (rope_parameters, head_dim, max_position_embeddings)
        inv_freq, self.attention_scaling = rope_frequencies(*self.args)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) table, e.g. after loading on the meta device."""
        with torch.no_grad():
            self.inv_freq.copy_(rope_frequencies(*self.args)[0])

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [b, n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, n, d]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., b, heads, n, d]; cos/sin: [..., b, n, d]."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    return x * cos + rotate_half(x) * sin
