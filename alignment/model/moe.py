"""Qwen2 mixture of experts: a top-k router over fine-grained experts plus a gated shared expert.

For tokens x [T, H], exactly as transformers' `qwen2_moe` and vLLM compute it:
    p    = softmax(gate(x)) in float32                                  [T, E]
    w, e = top-k of p, renormalised to sum 1 only if norm_topk_prob     [T, k]
    y    = sum_j w_j * Expert_{e_j}(x) + sigmoid(shared_expert_gate(x)) * SharedExpert(x)
Every expert is a SwiGLU `Qwen2MLP` module of its own, so parameter names are the on-disk Hub
names (`mlp.gate.weight`, `mlp.experts.E.{gate,up,down}_proj.weight`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate.weight`) that stock transformers and vLLM read and write: no conversion
on load or save. (transformers 5 keeps experts fused in 3-D parameters in memory and converts
to these per-expert keys in `save_pretrained`.)

The routed experts run grouped (`_GroupedExperts`): the T*k (token, expert) slots are sorted by
expert, the tokens gathered once, and each non-empty expert does one matmul per projection
over its contiguous rows; empty experts cost nothing. Forward and backward are written by hand
so that the elementwise work runs once over all slots, the routing weight scales the narrow
[S, moe_intermediate] activations instead of the [S, hidden] outputs, and no [S, hidden]
tensor is kept for backward (the gathered input is gathered again there). Experts whose
projections are wrapped (PEFT LoRA adapters) run module by module instead, so adapters train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .mlp import Qwen2MLP


def is_moe_layer(config, layer_idx: int) -> bool:
    """Stock qwen2_moe's rule: sparse unless in `mlp_only_layers` or off the `decoder_sparse_step` grid."""
    return (
        getattr(config, "num_experts", 0) > 0
        and layer_idx not in config.mlp_only_layers
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (in the logits' dtype) and expert ids [T, k] from float32 probabilities."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, experts = probs.topk(top_k, dim=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


def _spans(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, rows of the sorted slots) for every expert that received at least one slot."""
    spans, start = [], 0
    for e, c in enumerate(counts):
        if c:
            spans.append((e, slice(start, start + c)))
        start += c
    return spans


def _sum_slots(rows: torch.Tensor, tok: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum the [S, H] rows of the expert-sorted slots into their tokens: [T, H]."""
    return rows.new_zeros(num_tokens, rows.shape[-1]).index_add_(0, tok, rows)


class _GroupedExperts(torch.autograd.Function):
    """sum_j w[t, j] * Expert_{e[t, j]}(x[t]), one matmul per non-empty expert and projection."""

    @staticmethod
    def forward(ctx, x, weights, order, counts, top_k, *params):
        # x: [T, H]; weights: [T * k] routing weight of slot s = t * k + j; order: [S] slots sorted
        # by expert; counts: slots per expert; params: E gate, E up, then E down weights.
        n = len(counts)
        gate_w, up_w, down_w = params[:n], params[n : 2 * n], params[2 * n :]
        spans = _spans(counts)
        tok = order // top_k  # [S] token of each sorted slot
        xs = x.index_select(0, tok)  # [S, H]
        g = x.new_empty(order.numel(), gate_w[0].shape[0])  # [S, I]
        u = torch.empty_like(g)
        for e, rows in spans:
            torch.mm(xs[rows], gate_w[e].T, out=g[rows])
            torch.mm(xs[rows], up_w[e].T, out=u[rows])
        ws = weights.index_select(0, order)  # [S]
        h = F.silu(g).mul_(u).mul_(ws[:, None])  # [S, I]
        for e, rows in spans:
            torch.mm(h[rows], down_w[e].T, out=xs[rows])  # xs is free now: reuse it for the outputs
        ctx.save_for_backward(x, g, u, ws, order, tok, *params)
        ctx.spans = spans
        return _sum_slots(xs, tok, x.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, g, u, ws, order, tok, *params = ctx.saved_tensors
        n = len(params) // 3
        gate_w, up_w, down_w = params[:n], params[n : 2 * n], params[2 * n :]
        need_x, need_w = ctx.needs_input_grad[:2]
        need_params = any(ctx.needs_input_grad[5:])
        dy = grad_out.contiguous().index_select(0, tok)  # [S, H]

        acc = torch.promote_types(g.dtype, torch.float32)  # elementwise math in at least float32
        gf, uf, wf = g.to(acc), u.to(acc), ws.to(acc)[:, None]
        sig = torch.sigmoid(gf)
        silu = gf * sig
        act = silu * uf  # [S, I]
        grads = [None] * (3 * n)
        dh = torch.empty_like(g)  # d loss / d (w * act)
        h = (act * wf).to(g.dtype) if need_params else None
        for e, rows in ctx.spans:
            torch.mm(dy[rows], down_w[e], out=dh[rows])
            if need_params:
                grads[2 * n + e] = dy[rows].T @ h[rows]
        dh = dh.to(acc)
        dws = None
        if need_w:
            dws = torch.empty_like(ws)
            dws[order] = (dh * act).sum(-1).to(ws.dtype)
        dact = dh.mul_(wf)
        du = (dact * silu).to(g.dtype)
        dg = dact.mul_(uf).mul_(sig * (1 + gf * (1 - sig))).to(g.dtype)

        xs = x.index_select(0, tok) if need_params else None
        dxs = dy  # dy is consumed: reuse it for d loss / d xs
        for e, rows in ctx.spans:
            if need_params:
                grads[e] = dg[rows].T @ xs[rows]
                grads[n + e] = du[rows].T @ xs[rows]
            if need_x:
                torch.mm(dg[rows], gate_w[e], out=dxs[rows])
                dxs[rows].addmm_(du[rows], up_w[e])
        if need_params:  # experts that got no tokens still get a (zero) gradient, as a fused parameter would
            grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        dx = _sum_slots(dxs, tok, x.shape[0]) if need_x else None
        return (dx, dws, None, None, None, *grads)


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_by_expert(
    x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts: list[int], top_k: int, modules: nn.ModuleList
) -> torch.Tensor:
    """`_GroupedExperts`' sum, each non-empty expert called as a module on its sorted slots (autograd does backward)."""
    tok = order // top_k  # [S] token of each sorted slot
    slot_weights = weights.index_select(0, order)[:, None]  # [S, 1]
    out = x.new_zeros(x.shape)  # [T, H]
    for e, rows in _spans(counts):
        out.index_add_(0, tok[rows], modules[e](x.index_select(0, tok[rows])) * slot_weights[rows])
    return out


def grouped_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, modules: nn.ModuleList
) -> torch.Tensor:
    """x: [T, H]; weights, experts: [T, k] from `route`; modules: the expert MLPs. Returns [T, H].

    The grouped kernel reads each projection's `.weight` and nothing else, so it runs only when
    every projection is a plain `nn.Linear`. Wrapped ones (PEFT's LoRA layers, whose adapters
    would otherwise get neither a say in the output nor a gradient) go through each expert's
    own forward instead: slower, but the wrapper's forward is what runs.
    """
    flat = experts.reshape(-1)  # [S]
    order = flat.argsort(stable=True)  # [S] slots grouped by expert
    counts = torch.bincount(flat, minlength=len(modules)).tolist()
    projections = [getattr(m, proj) for proj in _PROJECTIONS for m in modules]
    if any(type(p) is not nn.Linear for p in projections):
        return _expert_by_expert(x, weights.reshape(-1), order, counts, experts.shape[-1], modules)
    params = [p.weight for p in projections]
    return _GroupedExperts.apply(x, weights.reshape(-1), order, counts, experts.shape[-1], *params)


class Qwen2SparseMoeBlock(nn.Module):
    """Router + `num_experts` experts of width `moe_intermediate_size` + a sigmoid-gated shared expert."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Qwen2MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_expert = Qwen2MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [b, n, H] -> output [b, n, H], router logits [b * n, E]."""
        b, n, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        router_logits = self.gate(x)  # [T, E]
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob)
        routed = grouped_experts(x, weights, experts, self.experts)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).view(b, n, hidden), router_logits
