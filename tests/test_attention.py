"""Attention layouts: packed and padded rows as causal segments (no n x n mask), checked against a float64 reference."""

import resource

import pytest
import torch

from alignment.model import preset_config
from alignment.model.attention import attend, attention_kernel, build_attention_layout
from alignment.model.modeling import Qwen2Model


def _allowed(attention_mask, position_ids):
    """The explicit [b, n, n] rule: causal, same sample (positions restart at a new one), real keys."""
    n = position_ids.shape[1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = starts.cumsum(-1)  # [b, n]
    same_sample = sample[:, :, None] == sample[:, None, :]
    return torch.ones(n, n, dtype=torch.bool).tril()[None] & same_sample & attention_mask.bool()[:, None, :]


def _reference(q, k, v, allowed, real):
    """Float64 softmax attention over the allowed keys; zeros at padded queries."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    out = torch.nan_to_num(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)) @ v
    return out * real.bool()[:, None, :, None]


def _batch(seed: int = 0):
    """4 rows of 40 tokens: packed samples, right padding after packed samples, left padding, all padding."""
    n = 40
    mask = torch.ones(4, n, dtype=torch.long)
    position_ids = torch.arange(n).repeat(4, 1)
    position_ids[0] = torch.cat([torch.arange(7), torch.arange(20), torch.arange(13)])
    position_ids[1, :30] = torch.cat([torch.arange(11), torch.arange(19)])
    mask[1, 30:] = 0
    mask[2, :9] = 0
    position_ids[2] = (mask[2].cumsum(-1) - 1).clamp(min=0)
    mask[3] = 0
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 4, n, 16, generator=g, requires_grad=True)
    k = torch.randn(4, 2, n, 16, generator=g, requires_grad=True)
    v = torch.randn(4, 2, n, 16, generator=g, requires_grad=True)
    return q, k, v, mask, position_ids


def _equal_samples():
    """2 rows of 4 samples of 10 tokens: one group that is every token (the view path)."""
    q, k, v, _, _ = _batch(seed=2)
    position_ids = torch.arange(40).remainder(10).repeat(2, 1)
    return q[:2], k[:2], v[:2], torch.ones(2, 40, dtype=torch.long), position_ids


@pytest.mark.parametrize("batch", [_batch, _equal_samples])
def test_packed_and_padded_rows_match_the_float64_reference_forward_and_backward(batch):
    q, k, v, mask, position_ids = batch()
    layout = build_attention_layout(mask, position_ids, q.shape[2], 0)
    assert layout.kind == "segments" and layout.mask is None
    assert attention_kernel(layout, q) == "fused-segments"
    ours = attend(q, k, v, layout)
    ref = _reference(q, k, v, _allowed(mask, position_ids), mask)
    assert (ours.double() - ref).abs().max().item() < 1e-5
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert (g.double() - r).abs().max().item() < 1e-5, name


def test_layout_kinds():
    n = 12
    ones = torch.ones(2, n, dtype=torch.long)
    positions = torch.arange(n).repeat(2, 1)
    assert build_attention_layout(None, positions, n, 0).kind == "causal"
    assert build_attention_layout(ones, positions, n, 0).kind == "causal"
    packed = positions.clone()
    packed[1, 5:] = torch.arange(n - 5)
    segments = build_attention_layout(None, packed, n, 0).segments
    assert segments.cu_seqlens.tolist() == [0, 12, 17, 24] and segments.max_len == 12
    assert [tuple(group.index.shape) for group in segments.groups] == [(1, 12), (1, 7), (1, 5)]  # 5 < 0.8 x 7
    assert [group.start for group in segments.groups] == [0, 17, 12]
    equal = torch.arange(n).remainder(4).repeat(2, 1)
    (group,) = build_attention_layout(None, equal, n, 0).segments.groups
    assert tuple(group.index.shape) == (6, 4) and group.start == 0  # adjacent, equal: a view
    holes = ones.clone()
    holes[0, 4] = 0  # a hole inside a row: only a mask says who sees whom
    assert build_attention_layout(holes, positions, n, 0).kind == "mask"
    left_padded = ones.clone()
    left_padded[1, :3] = 0
    assert build_attention_layout(left_padded, positions[:, -1:], 1, n - 1).kind == "mask"  # decoding with padding
    assert build_attention_layout(ones, positions[:, -1:], 1, n - 1).kind == "causal"


def test_holes_take_the_mask_path_and_match_the_reference():
    q, k, v, _, _ = _batch(seed=1)
    n = q.shape[2]
    mask = torch.ones(4, n, dtype=torch.long)
    mask[:, 10:14] = 0
    position_ids = torch.arange(n).repeat(4, 1)
    layout = build_attention_layout(mask, position_ids, n, 0)
    assert layout.kind == "mask"
    ours = attend(q, k, v, layout) * mask[:, None, :, None]
    ref = _reference(q, k, v, _allowed(mask, position_ids), mask)  # positions run on: one sample per row
    assert (ours.double() - ref).abs().max().item() < 1e-5


def test_a_packed_row_too_long_for_an_n_by_n_mask_trains():
    """262,144 tokens in one packed row: its boolean n x n mask alone would be 64 GiB; this needs well under 4 GiB."""
    n, sample = 2**18, 512
    config = preset_config("tiny", num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=1024)
    model = Qwen2Model(config)
    position_ids = torch.arange(n).remainder(sample)[None]
    ids = torch.randint(0, 1024, (1, n))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hidden = model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden.float().pow(2).mean().backward()
    grew_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 2**20
    assert torch.isfinite(model.layers[0].self_attn.q_proj.weight.grad).all()
    assert grew_gib < 4, f"peak memory grew by {grew_gib:.1f} GiB"
    with torch.no_grad():  # the last sample alone gives the same hidden states: nothing attends across samples
        alone = model(input_ids=ids[:, -sample:], use_cache=False).last_hidden_state
    assert (hidden[0, -sample:] - alone[0]).abs().max().item() < 1e-4


def test_under_autocast_mixed_dtypes_run_in_the_autocast_dtype():
    """Under bf16 autocast the rotated q and k are float32 and v is bf16: the fused kernels get one dtype."""
    q, k, v, mask, position_ids = _batch(seed=3)
    layout = build_attention_layout(mask, position_ids, q.shape[2], 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v.bfloat16(), layout)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = _reference(q, k, v, _allowed(mask, position_ids), mask)
    assert (out.double() - ref).abs().max().item() < 0.05 and q.grad is not None
