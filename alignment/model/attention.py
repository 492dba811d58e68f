"""Grouped-query attention with QKV bias, RoPE, a KV cache, and the attention kernel chosen in one place.

`build_attention_layout` reads the 2-D padding mask and the position ids once per forward and
says how the tokens attend:
- no padding, no cache offset, one sample per row: SDPA's `is_causal` path, no mask at all;
- packed samples (position ids restart inside a row) and/or padding at either end of the rows:
  causal *segments*, each attending only to itself, described by the cumulative lengths
  (`cu_seqlens`) over the flattened tokens; no n x n mask is ever built
  (a packed 32K row would need a 1 GiB boolean mask, and the math kernel it forces on CUDA
  ~112 GiB of scores per layer for 28 heads);
- anything else (a KV-cache offset with padding, holes inside a row, a caller's 4-D mask):
  a boolean [b, 1, q, k] mask.

`attend` then picks the kernel from the layout, device and dtype (the one place that does):
- segments on CUDA in bf16/fp16: flash attention's variable-length kernel (`varlen_attn`),
  which handles GQA itself;
- segments elsewhere: segments of similar length stacked as a batch, one fused call per
  batch (SDPA's flash kernel on CPU, its memory-efficient one on CUDA), so time and memory are
  those of the unpacked samples;
- causal or mask: SDPA. On CUDA, K/V heads are expanded to the query heads whenever a mask is
  given or the dtype is float32: with `enable_gqa` SDPA would otherwise fall back to its math
  kernel (as transformers also does).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .dca import (DualChunkPositions, attention_with_lse, attention_with_lse_backward, dual_chunk_attention,
                  expand_kv_heads)
from .loss import matmul_dtype
from .rope import apply_rotary


@dataclass
class SegmentGroup:
    """Real segments of similar length stacked as a right-padded batch [s, m]: under a causal mask a
    right pad is never a key of a real query, so one fused call over the batch is exact."""

    index: torch.Tensor  # [s, m] flat token index; pads repeat the segment's last token
    in_segment: torch.Tensor  # [s, m] bool: a real token, not a pad
    start: int | None  # equal, adjacent segments: the group is tokens start .. start + s * m, a view

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """[tokens, heads, d] -> [s, heads, m, d]."""
        s, m = self.index.shape
        if self.start is not None:
            grouped = flat[self.start : self.start + s * m].view(s, m, *flat.shape[1:])
        else:
            grouped = flat[self.index]
        return grouped.transpose(1, 2)

    def is_every_token(self, tokens: int) -> bool:
        """One group of equal samples in order: the gathered batch is all the tokens, reshaped."""
        return self.start == 0 and self.index.numel() == tokens

    def scatter(self, into: torch.Tensor, grouped: torch.Tensor) -> None:
        """Write the real tokens of [s, heads, m, d] into [tokens, heads, d]."""
        values = grouped.transpose(1, 2)  # [s, m, heads, d]
        if self.start is not None:
            into[self.start : self.start + values.shape[0] * values.shape[1]] = values.flatten(0, 1)
        else:
            into[self.index[self.in_segment]] = values[self.in_segment]


@dataclass
class Segments:
    """Causal blocks of tokens that attend only within themselves; with the padding blocks they cover every token."""

    cu_seqlens: torch.Tensor  # [num_segments + 1] int32: segment starts over the flattened b * n tokens, then b * n
    max_len: int
    groups: list[SegmentGroup]  # the real segments, for the kernels that take a batch


GROUP_FILL = 0.8  # a segment joins a group if it is at least this fraction of the group's longest


@dataclass
class AttentionLayout:
    """How the tokens of one forward attend: built once per forward, used by every layer."""

    is_causal: bool
    mask: torch.Tensor | None = None  # [b, 1, q, k] bool (True = attend)
    segments: Segments | None = None

    @property
    def kind(self) -> str:
        return "segments" if self.segments is not None else "mask" if self.mask is not None else "causal"


def build_attention_layout(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    q_len: int,
    past_len: int,
) -> AttentionLayout:
    """attention_mask: [b, past + q] of 1/0, a caller's 4-D mask, or None; position_ids: [b, q]."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return AttentionLayout(False, attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past_len == 0 and q_len > 1:
        starts = torch.ones_like(position_ids, dtype=torch.bool)  # [b, q]: a segment begins here
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        valid = None
        if padded:
            valid = attention_mask.bool()  # [b, q]
            starts[:, 1:] |= valid[:, 1:] != valid[:, :-1]
            first_real = valid & ~F.pad(valid[:, :-1], (1, 0))
            if bool((first_real.sum(-1) > 1).any()):  # holes inside a row: only a mask says that
                return _mask_layout(attention_mask, q_len, past_len)
        elif not bool(starts[:, 1:].any()):
            return AttentionLayout(is_causal=True)
        return AttentionLayout(False, segments=_segments(starts, valid))
    if not padded:
        return AttentionLayout(is_causal=q_len > 1)  # decoding one token, or one token alone
    return _mask_layout(attention_mask, q_len, past_len)


def _segments(starts: torch.Tensor, valid: torch.Tensor | None) -> Segments:
    b, n = starts.shape
    device = starts.device
    flat_starts = starts.flatten().nonzero().squeeze(1)  # [num_segments]; column 0 always starts one
    edges = flat_starts.tolist() + [b * n]
    is_real = [True] * flat_starts.numel() if valid is None else valid.flatten()[flat_starts].tolist()
    real = sorted((-(end - first), first) for first, end, r in zip(edges, edges[1:], is_real) if r)
    groups = []
    while real:
        longest = -real[0][0]
        size = next((i for i, (length, _) in enumerate(real) if -length < GROUP_FILL * longest), len(real))
        group, real = real[:size], real[size:]
        firsts = [first for _, first in group]
        adjacent = all(-length == longest for length, _ in group) and firsts == list(
            range(firsts[0], firsts[0] + longest * len(group), longest))
        lengths = torch.tensor([-length for length, _ in group], device=device)[:, None]  # [s, 1]
        offsets = torch.arange(longest, device=device)[None]  # [1, m]
        index = torch.tensor(firsts, device=device)[:, None] + torch.minimum(offsets, lengths - 1)
        groups.append(SegmentGroup(index, offsets < lengths, firsts[0] if adjacent else None))
    cu_seqlens = torch.tensor(edges, dtype=torch.int32, device=device)
    return Segments(cu_seqlens, max(e - f for f, e in zip(edges, edges[1:])), groups)


def _mask_layout(attention_mask: torch.Tensor, q_len: int, past_len: int) -> AttentionLayout:
    """Causal over the padding mask's real keys: for what segments cannot say (holes, a cache offset)."""
    kv_len = past_len + q_len
    device = attention_mask.device
    q_pos = torch.arange(past_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q, k]
    mask = mask & attention_mask[:, None, None, :kv_len].bool()
    # A query with no key at all (a left-pad position) would give NaN; let it see everything.
    mask = mask | ~mask.any(-1, keepdim=True)
    return AttentionLayout(False, mask)


def attention_kernel(layout: AttentionLayout, q: torch.Tensor) -> str:
    """The kernel `attend` runs for this layout and query tensor (reported by benchmarks and the GPU check)."""
    if layout.segments is None:
        return "sdpa-" + layout.kind
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _has_varlen_attention():
        return "flash-varlen"
    return "fused-segments"


@functools.cache
def _has_varlen_attention() -> bool:
    """torch >= 2.10 ships flash attention's variable-length kernel as `torch.nn.attention.varlen`."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def attend(
    q: torch.Tensor,  # [b, hq, n, d]
    k: torch.Tensor,  # [b, hkv, past + n, d]
    v: torch.Tensor,  # [b, hkv, past + n, d]
    layout: AttentionLayout,
    dropout: float = 0.0,
) -> torch.Tensor:  # [b, hq, n, d]
    if layout.segments is not None:
        if dropout:
            raise ValueError("attention dropout is not implemented for packed or padded rows")
        dtype = matmul_dtype(q)  # under autocast, rotated q and k are float32 and v is not: the fused kernels
        q, k, v = (t.to(dtype) for t in (q, k, v))  # take one dtype (SDPA casts for itself)
    kernel = attention_kernel(layout, q)
    if kernel == "flash-varlen":
        return _flash_varlen(q, k, v, layout.segments)
    if kernel == "fused-segments":
        return _SegmentAttention.apply(q, k, v, layout.segments)
    if q.is_cuda and k.shape[1] != q.shape[1] and (layout.mask is not None or q.dtype == torch.float32):
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, is_causal=layout.is_causal,
                                          dropout_p=dropout, enable_gqa=k.shape[1] != q.shape[1])


class _SegmentAttention(torch.autograd.Function):
    """Causal attention within segments: per group of similar-length segments, one fused call that also
    returns the log-sum-exp (`dca.attention_with_lse`: SDPA's flash kernel on CPU, its memory-efficient
    kernel on CUDA), gathered from and scattered back to the flattened tokens.

    Only the inputs (views, no copies), the output and the log-sum-exps are kept for the backward,
    which gathers each group again and runs the kernel's backward: the group copies live one group at
    a time, so peak memory is that of unpacked attention. Padding tokens get zero output."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
        b, hq, n, d = q.shape
        flat = _flatten(q, k, v)
        out, lses = None, []
        for group in segments.groups:
            group_out, lse = attention_with_lse(*(group.gather(t) for t in flat), True, d**-0.5)
            if group.is_every_token(b * n):
                out = group_out.transpose(1, 2).reshape(b * n, hq, d)
            else:
                out = flat[0].new_zeros(b * n, hq, d) if out is None else out
                group.scatter(out, group_out)
            lses.append(lse)
        out = flat[0].new_zeros(b * n, hq, d) if out is None else out
        ctx.segments = segments
        ctx.save_for_backward(q, k, v, out, *lses)
        return out.view(b, n, hq, d).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, *lses = ctx.saved_tensors
        b, hq, n, d = q.shape
        flat = _flatten(q, k, v)
        grad = grad.transpose(1, 2).reshape(b * n, hq, d)
        grads = None
        for group, lse in zip(ctx.segments.groups, lses):
            group_grad = group.gather(grad)
            if group.start is None:  # pads repeat a real token: they must bring no gradient
                group_grad = group_grad * group.in_segment[:, None, :, None]
            parts = attention_with_lse_backward(group_grad, *(group.gather(t) for t in flat), group.gather(out), lse,
                                                True, d**-0.5)
            if group.is_every_token(b * n):
                grads = [part.transpose(1, 2).reshape(b * n, -1, d) for part in parts]
                continue
            grads = [torch.zeros_like(t) for t in flat] if grads is None else grads
            for total, part in zip(grads, parts):
                group.scatter(total, part)
        grads = [torch.zeros_like(t) for t in flat] if grads is None else grads
        return *(g.view(b, n, -1, d).transpose(1, 2) for g in grads), None


def _flatten(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """[b, heads, n, d] -> [b * n, heads, d]: a view for the layout the projections leave ([b, n, heads, d])."""
    return [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in tensors]


def _flash_varlen(q, k, v, segments: Segments) -> torch.Tensor:
    """Flash attention over the flattened tokens, segment by segment (CUDA, bf16/fp16)."""
    from torch.nn.attention.varlen import varlen_attn  # only in torch builds that have it (checked above)

    b, hq, n, d = q.shape
    flat = _flatten(q, k, v)
    cu, longest = segments.cu_seqlens, segments.max_len
    out = varlen_attn(*flat, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=k.shape[1] != hq)
    return out.view(b, n, hq, d).transpose(1, 2)


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
        layout: AttentionLayout | None,
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
        out = attend(q, k, v, layout, self.attention_dropout if self.training else 0.0)  # [b, hq, n, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))
