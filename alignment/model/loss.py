"""Losses through the LM head, computed in row chunks so full-vocabulary logits never exist.

With a 151,936-row vocabulary the head dominates small models: a batch of 8 x 256 tokens
holds 1.2 GB of float32 logits, freshly allocated (and page-faulted) every step. Here the head
runs on `CHUNK_ROWS` labelled rows at a time, writing into reused workspaces, and each chunk
is folded (`_fold_chunk`) a cache-sized row block at a time: max, shift-and-exp (casting bf16
logits to float32 on the way), sum, and the gradient written over the logits; then the matmuls.

- `causal_lm_loss` (SFT): the loss is a plain sum, so each chunk's gradient is known as soon as
  its softmax is: it is computed in the forward pass (3 matmuls per chunk, nothing stored but
  the [N, H] and [V, H] gradients), and backward only scales it.
- `token_logprobs` (DPO and friends): per-token log-probs whose upstream gradient differs per
  token, so backward recomputes each chunk's logits (4 matmuls per chunk). It can also return
  per-token statistics for logging (entropy, mean logit, whether the label is the argmax).

Under autocast the matmuls run in the autocast dtype (bf16); the softmax and every gradient term
are formed in float32 and cast once for the backward matmuls, and the weight gradient is
accumulated in float32: the same roundings as stock `cross_entropy` under autocast.

Both read the LM head's weight directly, never calling the module, so under sharding they
fetch the whole weight themselves, as TRL's `add_fused_lm_head` does: FSDP2 can hold it as a
sharded DTensor (`full_tensor()` all-gathers it, its backward reduce-scatters the gradient), and
DeepSpeed ZeRO-3 keeps it partitioned outside its module's forward (`_gathered`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
CHUNK_ROWS = 256  # rows of logits per chunk (per matmul): 156 MB of float32 at 151,936 columns
CACHE_ROWS = 8  # rows per elementwise sweep: 4.9 MB of float32, stays in cache (8 beat 4, 16 and 32 here)
_workspace: dict[tuple, torch.Tensor] = {}


def _buffer(slot: int, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] scratch buffer, reused across calls on CPU (fresh pages cost more than the matmul).
    One made under `torch.inference_mode` cannot be written outside it (scoring, then training): it is
    made again."""
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    key = (slot, vocab, dtype)
    stale = key in _workspace and _workspace[key].is_inference() and not torch.is_inference_mode_enabled()
    if key not in _workspace or _workspace[key].shape[0] < rows or stale:
        _workspace[key] = torch.empty(CHUNK_ROWS if rows > CACHE_ROWS else CACHE_ROWS, vocab, dtype=dtype)
    return _workspace[key][:rows]


def _whole(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor: an FSDP2 DTensor is all-gathered (differentiably)."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def _gathered(weight: torch.Tensor):
    """A context in which a ZeRO-3 partitioned weight is whole (TRL's; a null context otherwise, and for a
    whole model loaded beside a ZeRO-3 trainer, whose weights DeepSpeed never partitioned).

    TRL is imported only under ZeRO-3: the model runs without it (e.g. `benchmarks/gpu_check.py`)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or not hasattr(weight, "ds_status"):
        return contextlib.nullcontext()
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(weight)


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's where autocast is on for its device, else its own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def _chunks(n: int):
    for s in range(0, n, CHUNK_ROWS):
        yield slice(s, min(s + CHUNK_ROWS, n))


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Logits [r, V] of rows h [r, H] in the compute dtype (h and w already cast), in workspace 0."""
    return torch.mm(h, w.T, out=_buffer(0, h.shape[0], w.shape[0], h.dtype, h.device))


def _fold_chunk(z: torch.Tensor, targets: torch.Tensor, grad: bool = False, stats: bool = False,
                row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of logits z [r, V]: target logit, logsumexp, max and, with `stats`, entropy, mean
    logit and log sum_v p_v^2 (WPO's weights) (float32 [6, r], in that order). With `grad`, z is overwritten with
    row_scale * (softmax(z) - onehot(targets)), the gradient of the row losses (row_scale [r]
    float32, default 1).

    The elementwise passes (max, shift-and-exp in float32, sum, scale) run over `CACHE_ROWS`
    rows at a time, so a row block stays in cache between passes instead of streaming a
    [r, V] float32 tensor through memory four times: memory traffic, not the matmuls, is what
    bounds the head on CPU. The gradient is formed in float32 and cast once: in bf16, p near 1
    rounds to 1 and the target's term p - 1 would vanish (confident tokens, i.e. most of SFT
    on a pretrained model)."""
    out = torch.zeros(6, z.shape[0], dtype=torch.float32, device=z.device)
    target, lse, m, entropy, mean, log_sum_sq = out
    for i in range(0, z.shape[0], CACHE_ROWS):
        rows = slice(i, i + CACHE_ROWS)
        zs = z[rows]
        k, vocab = zs.shape
        m[rows] = zs.amax(-1)
        target[rows] = zs.gather(1, targets[rows, None]).squeeze(1)
        zf = zs if zs.dtype == torch.float32 or not stats else _buffer(2, k, vocab, torch.float32, z.device).copy_(zs)
        if stats:
            mean[rows] = zf.mean(-1)
        in_place = z.dtype == torch.float32 and not stats
        e = zs.sub_(m[rows, None]) if in_place else torch.sub(
            zf, m[rows, None], out=_buffer(1, k, vocab, torch.float32, z.device))
        s = e.exp_().sum(-1)
        lse[rows] = m[rows] + s.log()
        if stats:  # entropy = lse - sum_v p_v z_v, the dot products taken row by row without a temporary
            entropy[rows] = lse[rows] - torch.bmm(e[:, None, :], zf[:, :, None]).view(-1) / s
            log_sum_sq[rows] = torch.bmm(e[:, None, :], e[:, :, None]).view(-1).log() - 2 * s.log()
        if grad:
            weight = torch.ones_like(s) if row_scale is None else row_scale[rows]
            e.mul_((weight / s)[:, None])
            # minus the one-hot, by indexing (scatter_add_ converts a whole bf16 tensor to float and back)
            e[torch.arange(k, device=z.device), targets[rows]] -= weight
            if e.data_ptr() != zs.data_ptr():
                zs.copy_(e)
    return out


def _backprop_chunk(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, grad_h, grad_w, rows: slice, scale: float):
    """Chain d/dlogits = scale * g [r, V] through logits = h w^T into grad_h[rows] and grad_w (float32).
    g is in h's dtype: `_fold_chunk` writes the gradient over the logits."""
    if grad_h is not None:
        torch.mm(g, w, out=grad_h[rows]).mul_(scale)
    if grad_w is not None:
        if g.dtype == torch.float32:
            grad_w.addmm_(g.T, h, alpha=scale)
        else:
            grad_w.add_(g.T @ h, alpha=scale)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """scale * sum_i -log softmax(h_i W^T)[t_i], gradients computed during the forward pass.

    Also returns how many labels are the argmax (no gradient), for the token-accuracy metric."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, need_h: bool, need_w: bool):
        # hidden: [N, H], weight: [V, H], targets: [N]
        dtype = matmul_dtype(hidden)
        h_all, w = hidden.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        need = need_h or need_w
        for rows in _chunks(hidden.shape[0]):
            z = _logits(h_all[rows], w)  # [r, V]
            target, lse, m, *_ = _fold_chunk(z, targets[rows], grad=need)
            loss += (lse - target).sum()
            correct += (target >= m).sum()
            if need:
                _backprop_chunk(z, h_all[rows], w, grad_h, grad_w, rows, scale)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.need = (need_h, need_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return loss * scale, correct

    @staticmethod
    def backward(ctx, grad_out, _):
        saved = list(ctx.saved_tensors)
        grad_h = (saved.pop(0) * grad_out).to(ctx.dtypes[0]) if ctx.need[0] else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if ctx.need[1] else None
        return grad_h, grad_w, None, None, None, None


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h_i W^T)[t_i] per row (+ statistics for logging and WPO); backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_stats: bool):
        # hidden: [N, H], weight: [V, H], targets: [N] -> logprobs [N] float32
        # (+ entropy, mean logit, log sum p^2, is_top1)
        dtype = matmul_dtype(hidden)
        h_all, w = hidden.to(dtype), weight.to(dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy, mean, log_sum_sq = torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)
        top1 = torch.empty_like(out, dtype=torch.bool)
        for rows in _chunks(n):
            target, lse, m, entropy[rows], mean[rows], log_sum_sq[rows] = _fold_chunk(
                _logits(h_all[rows], w), targets[rows], stats=with_stats)
            top1[rows] = target >= m
            out[rows] = target - lse
        ctx.save_for_backward(hidden, weight, targets)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(entropy, mean, log_sum_sq, top1)
        return out, entropy, mean, log_sum_sq, top1

    @staticmethod
    def backward(ctx, grad_out, *_):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        with _gathered(weight):  # the recomputation needs the whole weight again (ZeRO-3 re-partitioned it)
            h_all, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
            grad_h = torch.empty(hidden.shape, dtype=ctx.dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for rows in _chunks(hidden.shape[0]):
                z = _logits(h_all[rows], w)  # then z := go * (onehot - softmax)
                _fold_chunk(z, targets[rows], grad=True, row_scale=-grad_out[rows].float())
                _backprop_chunk(z, h_all[rows], w, grad_h, grad_w, rows, 1.0)
        return (grad_h.to(hidden.dtype) if need_h else None), (grad_w.to(weight.dtype) if need_w else None), None, None


def _labelled(hidden: torch.Tensor, labels: torch.Tensor):
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    keep = (flat_y != IGNORE_INDEX).nonzero().squeeze(1)
    return flat_h, flat_y, keep


@dataclass
class TokenStats:
    """Per-token results, shaped like the labels and zero where the label is ignored."""

    log_probs: torch.Tensor  # differentiable
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, with_stats: bool = False):
    """Log-probability of each label under the LM head; 0 where the label is IGNORE_INDEX.

    hidden: [..., H] aligned with labels (position t predicts labels[t]); weight: [V, H], the LM
    head's parameter as the trainer holds it (possibly sharded); labels: [...]. Returns float32
    [...], or `TokenStats` when `with_stats`.
    """
    weight = _whole(weight)
    flat_h, flat_y, keep = _labelled(hidden, labels)
    full = [torch.zeros(flat_y.shape, dtype=torch.float32, device=hidden.device) for _ in range(4)]
    full.append(torch.zeros(flat_y.shape, dtype=torch.bool, device=hidden.device))
    if keep.numel():
        with _gathered(weight):
            parts = _ChunkedTokenLogprobs.apply(flat_h[keep], weight, flat_y[keep], with_stats)
        full = [f.index_put((keep,), p) for f, p in zip(full, parts)]
    shaped = [f.view(labels.shape) for f in full]
    if not with_stats:
        return shaped[0]
    return TokenStats(*shaped)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Next-token cross-entropy, the same value as transformers' ForCausalLMLoss.

    `labels` are unshifted (token t is predicted at t-1); `shift_labels` are already shifted
    (TRL's padding-free batches). The mean is over labelled tokens, or the sum divided by
    `num_items_in_batch` (gradient accumulation). `weight` is the LM head's parameter as the
    trainer holds it (possibly sharded); the gradients are computed here, so backward needs no
    weight. Returns (loss, labels that were the argmax, labelled tokens).
    """
    weight = _whole(weight)
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    flat_h, flat_y, keep = _labelled(hidden, shift_labels)
    if num_items_in_batch is None:
        num_items_in_batch = keep.numel()
    if not keep.numel():
        return flat_h.sum() * 0.0, torch.zeros((), dtype=torch.long), 0
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    scale = 1.0 / max(float(num_items_in_batch), 1.0)
    with _gathered(weight):
        loss, correct = _FusedLinearCrossEntropy.apply(flat_h[keep], weight, flat_y[keep], scale, need_h, need_w)
    return loss, correct, keep.numel()
