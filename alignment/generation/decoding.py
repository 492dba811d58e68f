"""Batched decoding for the `transformers` backend: a KV-cached loop over our backbone that computes the logits
of each row's last position only and samples them without sorting the vocabulary.

Why not `GenerationMixin.generate`: its top-k and top-p warpers sort all 151,936 logits of every row at every
step, then `torch.multinomial` walks them again; on CPU that was most of a decoding step (benchmarks/generation.py).
It also applies `top_k=50` whenever a config leaves top-k unset, so it sampled another distribution than vLLM
for the same recipe.

Sampling follows the order of vLLM and transformers: repetition penalty, temperature, top-k, then top-p over
what top-k kept (the most likely tokens until the mass of those before reaches top_p); one draw per row by
inverse CDF from a uniform of the call's generator. Top-p looks at the 64 most likely tokens first; a row whose
nucleus is wider (a near-flat distribution, such as an untrained model's) draws from the whole vocabulary until
the token is in its nucleus, which is exact and needs no sort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

FIRST_CANDIDATES = 64  # the most likely tokens top-p looks at before the whole vocabulary


@dataclass
class Sampler:
    """How the next token is drawn from a row's logits; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = -1  # <= 0: no top-k
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def next_tokens(self, logits: torch.Tensor, uniforms: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """logits [r, vocab] (float32), uniforms [r] in [0, 1) -> token ids [r]; `generator` gives the uniforms of
        any redraw (top-p over a wide nucleus)."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        vocab = logits.size(-1)
        if 0 < self.top_k < vocab:
            values, ids = logits.topk(self.top_k, -1)  # [r, k], most likely first
            return ids.gather(-1, self._nucleus_draw(torch.softmax(values, -1), uniforms)[:, None]).squeeze(-1)
        if self.top_p >= 1:
            return _inverse_cdf(torch.softmax(logits, -1), uniforms)
        log_total = logits.logsumexp(-1, keepdim=True)  # [r, 1]
        values, ids = logits.topk(min(FIRST_CANDIDATES, vocab), -1)
        probs = (values - log_total).exp()
        tokens = ids.gather(-1, self._nucleus_draw(probs, uniforms)[:, None]).squeeze(-1)
        wide = probs.sum(-1) < self.top_p  # rows whose nucleus the candidates miss
        if bool(wide.all()):
            return self._draw_in_wide_nucleus((logits - log_total).exp(), uniforms, generator)
        if bool(wide.any()):
            tokens[wide] = self._draw_in_wide_nucleus((logits[wide] - log_total[wide]).exp(), uniforms[wide], generator)
        return tokens

    def _nucleus_draw(self, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Index drawn from the top-p nucleus of probabilities [r, c] sorted most likely first."""
        if self.top_p < 1:
            above = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
            probs = probs.masked_fill(above >= self.top_p, 0.0)
        return _inverse_cdf(probs, uniforms)

    def _draw_in_wide_nucleus(self, probs: torch.Tensor, uniforms: torch.Tensor,
                              generator: torch.Generator) -> torch.Tensor:
        """A token from the top-p nucleus of unsorted probabilities [r, vocab], without sorting them: draw from the
        whole distribution and redraw while the token is outside the nucleus (the tokens more likely than it hold
        top_p or more). Exact, and it accepts with the nucleus's probability, at least top_p."""
        cdf = probs.cumsum(-1)
        tokens = torch.empty(probs.size(0), dtype=torch.long, device=probs.device)
        pending = torch.arange(probs.size(0), device=probs.device)  # rows still to draw, by index in `tokens`
        while True:
            drawn = _searched(cdf, uniforms)
            chosen = probs.gather(-1, drawn[:, None])  # [p, 1]
            inside = torch.where(probs > chosen, probs, 0.0).sum(-1) < self.top_p
            tokens[pending[inside]] = drawn[inside]
            if bool(inside.all()):
                return tokens
            outside = ~inside
            probs, cdf, pending = probs[outside], cdf[outside], pending[outside]
            uniforms = torch.rand(pending.numel(), generator=generator, device=generator.device).to(probs.device)

    def penalise(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """The repetition penalty (CTRL's, as transformers and vLLM apply it) on the tokens `seen` [r, vocab]."""
        if self.repetition_penalty == 1.0:
            return logits
        penalised = torch.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
        return torch.where(seen, penalised, logits)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised probabilities [r, c]."""
    return _searched(probs.cumsum(-1), uniforms)


def _searched(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The index where each row's cumulative mass [r, c] passes its uniform's share of the row's total."""
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return index.clamp(max=cdf.size(-1) - 1)


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampler: Sampler, samples: int,
           max_new_tokens: int, eos_ids: list[int], pad_id: int, generator: torch.Generator,
           stopped: Callable[[list[int]], bool] | None = None) -> torch.Tensor:
    """`samples` continuations of each left-padded prompt [b, n]: new tokens [b * samples, <= max_new_tokens],
    rows of one prompt adjacent, `pad_id` after a row's end (an id of `eos_ids` is kept). The prompt is run once
    and its cache repeated; a row leaves the batch when it ends, or when `stopped(its new ids)` says so (stop
    strings)."""
    device = input_ids.device
    rows = input_ids.size(0) * samples
    if max_new_tokens == 0:
        return torch.full((rows, 0), pad_id, dtype=torch.long, device=device)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # [b, n]
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()  # [b, vocab]
    if samples > 1:
        cache.batch_repeat_interleave(samples)
        logits = logits.repeat_interleave(samples, 0)
    mask = attention_mask.repeat_interleave(samples, 0)  # [rows, past]
    position = positions[:, -1:].repeat_interleave(samples, 0)  # [rows, 1]
    seen = None
    if sampler.repetition_penalty != 1.0:
        seen = torch.zeros(rows, logits.size(-1), dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.repeat_interleave(samples, 0), attention_mask.bool().repeat_interleave(samples, 0))
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # the rows still in the batch, by their index in `out`
    eos = torch.tensor(eos_ids, device=device)
    for step in range(max_new_tokens):
        uniforms = torch.rand(rows, generator=generator, device=generator.device).to(device)[live]
        if seen is not None:
            logits = sampler.penalise(logits, seen)
        tokens = sampler.next_tokens(logits, uniforms, generator)  # [live]
        out[live, step] = tokens
        done = torch.isin(tokens, eos)
        if stopped is not None:
            done |= torch.tensor([stopped(out[row, : step + 1].tolist()) for row in live.tolist()], device=device)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            live, tokens, mask, position = live[keep], tokens[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
            if seen is not None:
                seen = seen[keep]
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], -1)
        position = position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
    return out[:, : step + 1]
