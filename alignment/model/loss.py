"""Losses through the LM head, computed in row chunks so full-vocabulary logits never exist.

With a 151,936-row vocabulary the head dominates small models: a batch of 8 x 256 tokens
holds 1.2 GB of float32 logits, freshly allocated (and page-faulted) every step. Here the head
runs on a few hundred labelled rows at a time, writing into one reused workspace:

- `causal_lm_loss` (SFT): the loss is a plain sum, so each chunk's gradient is known as soon as
  its softmax is: it is computed in the forward pass (3 matmuls per chunk, nothing stored but
  the [N, H] and [V, H] gradients), and backward only scales it.
- `token_logprobs` (DPO and friends): per-token log-probs whose upstream gradient differs per
  token, so backward recomputes each chunk's logits (4 matmuls per chunk).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ROWS = 256  # rows of logits per chunk: 156 MB of float32 at 151,936 columns
_workspace: dict[tuple, torch.Tensor] = {}


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] scratch buffer reused across calls on CPU (fresh pages cost more than the matmul)."""
    if device.type != "cpu":
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    key = (rows, vocab, dtype)
    if key not in _workspace:
        _workspace[key] = torch.empty(rows, vocab, dtype=dtype)
    return _workspace[key]


def _chunks(n: int):
    for s in range(0, n, CHUNK_ROWS):
        yield slice(s, min(s + CHUNK_ROWS, n))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits [r, V] of rows h [r, H], written into the workspace."""
    r, vocab = h.shape[0], weight.shape[0]
    out = torch.mm(h, weight.T, out=_logits_buffer(CHUNK_ROWS, vocab, h.dtype, h.device)[:r])
    if out.dtype == torch.float32:
        return out
    return _logits_buffer(CHUNK_ROWS, vocab, torch.float32, h.device)[:r].copy_(out)


def _grad_into(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_h, grad_w, rows: slice) -> None:
    """Chain d/dlogits = g [r, V] through logits = h W^T into grad_h[rows] and grad_w (float32)."""
    if g.dtype != h.dtype:  # bf16 training: reuse the low-precision logits buffer, free by now
        g = _logits_buffer(CHUNK_ROWS, g.shape[1], h.dtype, h.device)[: g.shape[0]].copy_(g)
    if grad_h is not None:
        torch.mm(g, weight, out=grad_h[rows])
    if grad_w is not None:
        if g.dtype == torch.float32:
            grad_w.addmm_(g.T, h)
        else:
            grad_w += (g.T @ h).float()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """scale * sum_i -log softmax(h_i W^T)[t_i], gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, need_h: bool, need_w: bool):
        # hidden: [N, H], weight: [V, H], targets: [N]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for rows in _chunks(hidden.shape[0]):
            logits = _chunk_logits(hidden[rows], weight)  # [r, V]
            lse = torch.logsumexp(logits, dim=-1)  # [r]
            t = targets[rows, None]
            loss += (lse - logits.gather(1, t).squeeze(1)).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g.scatter_add_(1, t, torch.full_like(lse[:, None], -1.0)).mul_(scale)  # scale * (softmax - onehot)
                _grad_into(g, hidden[rows], weight, grad_h, grad_w, rows)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.need[0]:
            grad_h = saved.pop(0)
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if ctx.need[1]:
            grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h_i W^T)[t_i] for each row; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        # hidden: [N, H], weight: [V, H], targets: [N] -> logprobs [N] float32
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for rows in _chunks(hidden.shape[0]):
            logits = _chunk_logits(hidden[rows], weight)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for rows in _chunks(hidden.shape[0]):
            g = _chunk_logits(hidden[rows], weight).sub_(lse[rows, None]).exp_()  # softmax
            t, go = targets[rows, None], grad_out[rows, None].float()
            g.scatter_add_(1, t, torch.full_like(go, -1.0)).mul_(-go)  # go * (onehot - softmax)
            _grad_into(g, hidden[rows], weight, grad_h, grad_w, rows)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None


def _labelled(hidden: torch.Tensor, labels: torch.Tensor):
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    keep = (flat_y != IGNORE_INDEX).nonzero().squeeze(1)
    return flat_h, flat_y, keep


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the LM head; 0 where the label is IGNORE_INDEX.

    hidden: [..., H] aligned with labels (position t predicts labels[t]); weight: [V, H];
    labels: [...]. Returns float32 [...].
    """
    flat_h, flat_y, keep = _labelled(hidden, labels)
    out = torch.zeros(flat_y.shape, dtype=torch.float32, device=hidden.device)
    if keep.numel():
        out = out.index_put((keep,), _ChunkedTokenLogprobs.apply(flat_h[keep], weight, flat_y[keep]))
    return out.view(labels.shape)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy, the same value as transformers' ForCausalLMLoss.

    `labels` are unshifted (token t is predicted at t-1); `shift_labels` are already shifted
    (TRL's padding-free batches). The mean is over labelled tokens, or the sum divided by
    `num_items_in_batch` (gradient accumulation).
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    flat_h, flat_y, keep = _labelled(hidden, shift_labels)
    if num_items_in_batch is None:
        num_items_in_batch = keep.numel()
    denom = float(num_items_in_batch)
    if not keep.numel():
        return flat_h.sum() * 0.0
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    return _FusedLinearCrossEntropy.apply(flat_h[keep], weight, flat_y[keep], 1.0 / max(denom, 1.0), need_h, need_w)
