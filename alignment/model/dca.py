"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling") with YaRN's temperature.

This is how Qwen2 runs inputs longer than it was trained on. The sequence is cut into blocks of
L = chunk_size - local_size tokens; token t sits at offset p(t) = t mod L. Keys are rotated at
p(j); a query i attends to each key j <= i in exactly one branch, each with its own query
position (the conventions of vLLM's `DualChunkRotaryEmbedding`, so checkpoints behave alike):

    intra       j in i's block (causal)     p(i)                 -> distance i - j, exact
    successive  j in the block before       min(p(i) + L, C)
    inter       j in any earlier block      min(2L - 1, C)

No query-key distance exceeds C = chunk_size, and with n <= L this is plain causal RoPE.

Work is done query block by query block: every branch is one fused attention call that also
returns the log-sum-exp (SDPA's flash kernel on CPU, its memory-efficient kernel on CUDA, plain
math on other devices) and the branches are merged by their log-sum-exp, so each query gets one
softmax over all its keys, the FLOPs are those of causal attention, and no n x n score or mask
is ever built.

YaRN: DCA keeps every distance within chunk_size, which is at most the trained length, so the
rotation uses the plain `rope_theta` frequencies; YaRN's interpolated ones would move the
distances the model was trained on. What DCA still needs from YaRN is the attention temperature
for attending over more keys than in training: the query at position i is multiplied by
m_i = max(1, 0.1 ln((i + 1) / L0) + 1), YaRN's m at the extension ratio (i + 1) / L0 that this
query faces (L0 = `original_max_position_embeddings`; 0 or absent turns it off). vLLM multiplies
the query by the same formula (logits x m, not YaRN's m^2 on cos and sin) but with one ratio per
sequence, n / L0, for every prompt row. Per query, the prompt's earlier rows get the factor of
their own length, which is what makes cached decoding equal prefill; each new token gets the
same factor as in vLLM.

Cache: keys are stored already rotated at p(j), which does not depend on the query, so
transformers' `DynamicCache` holds them as they are and decoding only rotates the new query.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .loss import matmul_dtype
from .rope import RotaryEmbedding, apply_rotary

INTRA, SUCCESSIVE, INTER = 0, 1, 2  # branch index = which rotated query a key part uses


@dataclass
class DualChunkPositions:
    """What every attention layer needs for one forward: built once per forward by `DualChunkRotary`."""

    key: tuple[torch.Tensor, torch.Tensor]  # cos, sin at p(j) for the new tokens: [b, n, d]
    queries: tuple[torch.Tensor, torch.Tensor]  # cos, sin per branch, temperature folded in: [3, b, n, d]
    row_groups: list[tuple[slice | torch.Tensor, int]]  # rows sharing a left-pad count, and that count
    past_len: int
    block: int  # L


def query_positions(pos: torch.Tensor, block: int, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """Rotation positions of a query at absolute position `pos` in the intra, successive and inter branches."""
    p = pos % block
    return p, (p + block).clamp(max=chunk_size), torch.full_like(p, min(2 * block - 1, chunk_size))


def yarn_temperature(pos: torch.Tensor, original_len: int) -> torch.Tensor:
    """YaRN's m = 0.1 ln(s) + 1 at s = (pos + 1) / L0, never below 1 (float32)."""
    if not original_len:
        return torch.ones_like(pos, dtype=torch.float32)
    return (0.1 * torch.log((pos + 1).float() / original_len) + 1).clamp(min=1)


def left_padding(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Number of leading 0s of each row of a [b, k] 0/1 mask: [b] long."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.dim() != 2:
        raise ValueError("dual chunk attention takes a 2-D padding mask, not a 4-D attention mask")
    return (attention_mask.cumsum(-1) == 0).sum(-1)


class DualChunkRotary(nn.Module):
    """Turns the padding mask into DCA's key and query rotations; replaces `RotaryEmbedding` when DCA is on."""

    def __init__(self, config):
        super().__init__()
        dca = config.dual_chunk_attention_config
        self.chunk_size, local_size = int(dca["chunk_size"]), int(dca["local_size"])
        if not 0 <= local_size < self.chunk_size:
            raise ValueError(f"dual chunk attention needs 0 <= local_size < chunk_size, got {dca}")
        if config.attention_dropout:
            raise ValueError("dual chunk attention does not implement attention dropout")
        self.block = self.chunk_size - local_size
        self.original_len = int(dca.get("original_max_position_embeddings") or 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        params = config.rope_parameters
        plain = {"rope_type": "default", "rope_theta": params["rope_theta"]}
        if "partial_rotary_factor" in params:
            plain["partial_rotary_factor"] = params["partial_rotary_factor"]
        self.rotary = RotaryEmbedding(plain, head_dim, config.max_position_embeddings)

    def forward(
        self,
        x: torch.Tensor,  # [b, n, hidden]
        attention_mask: torch.Tensor | None,  # [b, past + n] of 1/0
        position_ids: torch.Tensor | None,  # [b, n]
        past_len: int,
    ) -> DualChunkPositions:
        b, n = x.shape[:2]
        pads = left_padding(attention_mask, b, x.device)  # [b]
        slots = torch.arange(past_len, past_len + n, device=x.device)
        pos = slots[None, :] - pads[:, None]  # [b, n] position of each new token, < 0 on left pads
        real = pos >= 0
        if position_ids is not None and not bool((position_ids == pos)[real].all()):
            raise ValueError(
                "dual chunk attention needs one sample per row at positions 0, 1, 2, ... after any left "
                "padding; packed samples (positions restarting inside a row) are not supported"
            )
        pos = pos.clamp(min=0)
        m = yarn_temperature(pos, self.original_len)[..., None].to(x.dtype)  # [b, n, 1]
        cos, sin = self.rotary(x, torch.stack(query_positions(pos, self.block, self.chunk_size)))  # [3, b, n, d]
        counts = pads.tolist()
        if len(set(counts)) == 1:
            groups = [(slice(None), counts[0])]
        else:
            groups = [((pads == c).nonzero().squeeze(1), c) for c in sorted(set(counts))]
        return DualChunkPositions(self.rotary(x, pos % self.block), (cos * m, sin * m), groups, past_len, self.block)


def block_parts(start: int, kv_len: int, block: int) -> Iterator[tuple[slice, list[tuple[int, slice, bool]]]]:
    """The work plan over keys at positions 0..kv_len-1 for queries at start..kv_len-1.

    Yields, per query block, the query rows (relative to `start`) and its key parts as
    (branch, key slice, causal). Causal parts are square: query r sees keys up to r.
    """
    for c in range(start // block, -(-kv_len // block)):
        lo, hi = c * block, min((c + 1) * block, kv_len)  # keys of block c
        first = max(lo, start)  # first query of block c
        parts = [(INTRA, slice(first, hi), True)]
        if first > lo:  # queries that continue a block (decoding) see its earlier keys in full
            parts.append((INTRA, slice(lo, first), False))
        if c >= 1:
            parts.append((SUCCESSIVE, slice(lo - block, lo), False))
        if c >= 2:
            parts.append((INTER, slice(0, lo - block), False))
        yield slice(first - start, hi - start), parts


def dual_chunk_attention(
    q: torch.Tensor,  # [b, hq, n, d], not rotated
    k: torch.Tensor,  # [b, hkv, past + n, d], rotated at p(j) (the cache's contents)
    v: torch.Tensor,  # [b, hkv, past + n, d]
    positions: DualChunkPositions,
    scale: float | None = None,
) -> torch.Tensor:  # [b, hq, n, d]; 0 on left-pad queries
    """Causal DCA of the new queries over all keys so far, for left-padded or unpadded rows."""
    b, hq, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    dtype = matmul_dtype(q)  # under autocast rotated k is float32 and v is not
    k, v = k.to(dtype), v.to(dtype)
    past, (cos, sin) = positions.past_len, positions.queries
    if len(positions.row_groups) == 1 and positions.row_groups[0][1] <= past:
        pad = positions.row_groups[0][1]
        return _attend_rows(q, cos, sin, k[:, :, pad:], v[:, :, pad:], past - pad, positions.block, scale)
    out = q.new_zeros(b, hq, n, d)
    for rows, pad in positions.row_groups:
        first = max(past, pad)  # first slot holding a real query
        if first >= past + n:
            continue
        new = slice(first - past, None)
        out[rows, :, new] = _attend_rows(
            q[rows, :, new], cos[:, rows, new], sin[:, rows, new], k[rows, :, pad:], v[rows, :, pad:], first - pad,
            positions.block, scale,
        )
    return out


def _attend_rows(q, cos, sin, k, v, start: int, block: int, scale: float) -> torch.Tensor:
    """Rows without padding: queries at positions start.. over keys at 0..; block by block, merged by LSE.

    Queries are rotated one block at a time, so the three rotated copies never exist for all n.
    """
    outs = []
    for rows, parts in block_parts(start, k.shape[2], block):
        queries = apply_rotary(q[None, :, :, rows], cos[:, :, rows], sin[:, :, rows]).to(k.dtype)  # [3, b, hq, rows, d]
        tensors = [t for branch, keys, _ in parts for t in (queries[branch], k[:, :, keys], v[:, :, keys])]
        outs.append(_MergedAttention.apply(scale, tuple(c for _, _, c in parts), *tensors))
    return torch.cat(outs, dim=2)


class _MergedAttention(torch.autograd.Function):
    """One softmax over the union of several (q, k, v) parts with disjoint keys, from each part's (out, LSE).

    Forward: out = sum_p exp(lse_p - lse) out_p with lse = logsumexp_p lse_p. Backward runs each
    part's attention backward with the merged `out` and `lse`, which is the exact gradient of the
    single softmax, so the merge weights are differentiated too (through lse), not held constant.
    """

    @staticmethod
    def forward(ctx, scale: float, causal: tuple[bool, ...], *qkv: torch.Tensor) -> torch.Tensor:
        parts = [qkv[i : i + 3] for i in range(0, len(qkv), 3)]
        outs, lses = zip(*(attention_with_lse(*p, c, scale) for p, c in zip(parts, causal)))
        if len(parts) == 1:
            out, lse = outs[0], lses[0]
        else:
            part_lse = torch.stack(lses)  # [parts, b, hq, nq]
            lse = part_lse.logsumexp(0)
            weights = (part_lse - lse).exp()
            out = torch.einsum("pbhq,pbhqd->bhqd", weights, torch.stack(outs).to(lse.dtype)).to(outs[0].dtype)
        ctx.save_for_backward(out, lse, *qkv)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, lse, *qkv = ctx.saved_tensors
        grad = grad.contiguous()
        grads = []
        for i, causal in enumerate(ctx.causal):
            grads += attention_with_lse_backward(grad, *qkv[3 * i : 3 * i + 3], out, lse, causal, ctx.scale)
        return None, None, *grads


def attention_with_lse(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, hq, nq, d], lse [b, hq, nq]) of one part: a fused kernel on CPU and CUDA, plain math elsewhere."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    if q.device.type == "cuda":
        return cuda_attend(q, k, v, causal, scale)
    return math_attend(q, k, v, causal, scale)


def attention_with_lse_backward(grad, q, k, v, out, lse, causal: bool, scale: float) -> list[torch.Tensor]:
    """dq, dk, dv of one part given the merged out and lse (softmax over all parts' keys)."""
    if q.device.type == "cpu":
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        return list(op(grad, q, k, v, out, lse, 0.0, causal, scale=scale))
    if q.device.type == "cuda":
        return cuda_attend_backward(grad, q, k, v, out, lse, causal, scale)
    return math_attend_backward(grad, q, k, v, out, lse, causal, scale)


LSE_ALIGN = 32  # the memory-efficient kernel pads its log-sum-exp rows to a multiple of this


def cuda_attend(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` on CUDA: SDPA's memory-efficient kernel (every dtype; no [nq, nk] scores), K/V
    heads expanded because it has no GQA. Causal parts are square, so its causal alignment does not matter."""
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1]), None, True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]


def cuda_attend_backward(grad, q, k, v, out, lse, causal: bool, scale: float) -> list[torch.Tensor]:
    """The memory-efficient kernel's backward with the merged out and lse (padded back to its row alignment)."""
    grad, rows = grad.contiguous(), lse.shape[-1]
    lse = torch.nn.functional.pad(lse, (0, -(-rows // LSE_ALIGN) * LSE_ALIGN - rows)).contiguous()
    no_dropout = torch.empty((), dtype=torch.long)  # philox seed and offset: read only when dropout_p > 0
    heads = q.shape[1]
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, expand_kv_heads(k, heads), expand_kv_heads(v, heads), None, out, lse, no_dropout, no_dropout, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    return [dq, _group_sum(dk, k.shape[1]), _group_sum(dv, k.shape[1])]


def math_attend(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` in plain torch for other devices: materialises the part's [nq, nk] scores."""
    p, lse = _math_probs(q, k, causal, scale)
    return p.to(v.dtype) @ expand_kv_heads(v, q.shape[1]), lse


def math_attend_backward(grad, q, k, v, out, lse, causal: bool, scale: float) -> list[torch.Tensor]:
    """The flash-attention backward in plain torch: ds = p * (grad v^T - rowsum(grad * out))."""
    p, _ = _math_probs(q, k, causal, scale, lse)  # [b, hq, nq, nk] float32
    ds = p * (grad @ expand_kv_heads(v, q.shape[1]).transpose(-1, -2) - (grad * out).sum(-1, keepdim=True)).float()
    dq = (ds.to(q.dtype) @ expand_kv_heads(k, q.shape[1])) * scale
    dk = _group_sum(ds.transpose(-1, -2).to(q.dtype) @ q, k.shape[1]) * scale
    dv = _group_sum(p.transpose(-1, -2).to(grad.dtype) @ grad, k.shape[1])
    return [dq, dk, dv]


def _math_probs(q, k, causal: bool, scale: float, lse: torch.Tensor | None = None):
    """Softmax probabilities of one part (float32), normalised by `lse` if given, else by its own."""
    s = (q @ expand_kv_heads(k, q.shape[1]).transpose(-1, -2)).float() * scale  # [b, hq, nq, nk]
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = s.logsumexp(-1) if lse is None else lse
    return (s - lse[..., None]).exp(), lse


def expand_kv_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat each K/V head for its query group (GQA): [b, hkv, m, d] -> [b, heads, m, d]."""
    return kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _group_sum(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum a K/V gradient over each head's query group (GQA): [b, hq, m, d] -> [b, hkv, m, d]."""
    b, hq, m, d = x.shape
    return x.view(b, kv_heads, hq // kv_heads, m, d).sum(2)


def trained_length_of(config, trained_length: int | None = None) -> int:
    """The length `config`'s checkpoint was trained at: the L0 that YaRN and DCA scale from.

    Never `max_position_embeddings`: released base checkpoints put their extended limit there
    (Qwen2-7B ships 131,072 but was trained at 32,768), and scaling over it would leave YaRN
    interpolating nothing and DCA's temperature off. In order: `trained_length` (given by the
    user), the original length of the config's RoPE scaling (`rope_scaling` /
    `rope_parameters`), or the top-level `original_max_position_embeddings` that `preset_config`
    and so `init` and `upcycle` record (see presets.py).
    """
    found = (
        trained_length
        or config.rope_parameters.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
    )
    if not found:
        raise ValueError(
            f"the trained length is unknown (config.json records no original_max_position_embeddings, and "
            f"max_position_embeddings {config.max_position_embeddings} may be an extended limit): pass the "
            f"trained length (--trained-length, trained_length=), e.g. 32768 for the released Qwen2 models"
        )
    return int(found)


def enable_long_context(
    config,
    chunk_size: int | None = None,
    local_size: int | None = None,
    yarn_factor: float | None = None,
    trained_length: int | None = None,
):
    """A copy of `config` for long inputs: YaRN over the trained length, and/or Dual Chunk Attention.

    - yarn_factor s: `rope_scaling` = YaRN(s) over L0 and max_position_embeddings = s * L0. Plain
      attention then uses YaRN's frequencies and temperature (static YaRN, as Qwen2 ships).
    - chunk_size, local_size: `dual_chunk_attention_config` with original_max_position_embeddings
      L0, the field vLLM reads. DCA ignores YaRN's frequencies and applies YaRN's temperature
      per query (module docstring); readers without DCA (stock transformers) fall back to YaRN.
    L0 is the trained length (`trained_length_of`: `trained_length` if given, else what the config
    records; a ValueError if neither), and the copy records it. Since static YaRN can hurt short
    inputs, switch this on for evaluation and generation (`qwen2-align chat --dca-chunk-size ...`),
    not for training.
    """
    if (chunk_size is None) != (local_size is None):
        raise ValueError("give both chunk_size and local_size for dual chunk attention")
    config = copy.deepcopy(config)
    if yarn_factor is None and chunk_size is None:
        return config
    original = trained_length_of(config, trained_length)
    config.original_max_position_embeddings = original
    if yarn_factor is not None:
        params = dict(config.rope_parameters)
        params.update(rope_type="yarn", factor=float(yarn_factor), original_max_position_embeddings=original)
        config.rope_parameters = params
        config.max_position_embeddings = int(math.ceil(yarn_factor * original))
    if chunk_size is not None:
        config.dual_chunk_attention_config = {
            "chunk_size": int(chunk_size), "local_size": int(local_size), "original_max_position_embeddings": original
        }
    return config
