"""The `transformers` backend: our backbone decoding left-padded batches with a KV cache (`decoding.decode`) on
this process's device (`local_device`). With a seed per prompt (`SamplingParams.seeds`) each prompt is decoded on
its own, unpadded: a row's draws depend on its place in the batch and its logits on the padding, so only that
keeps a prompt's samples independent of the prompts beside it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from ..checkpoint import load_causal_lm, local_device
from ..tokenizer import load_tokenizer
from .base import Completion, GenerationSpec, Generator, Prompt, SamplingParams
from .decoding import Sampler, decode


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> list[str]:
    """Chat messages through the chat template (with the assistant header); strings unchanged."""
    return [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to (excluding) the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class TransformersGenerator(Generator):
    def __init__(self, spec: GenerationSpec, model=None, tokenizer=None):
        self.spec = spec
        if model is None:
            model = load_causal_lm(spec.model, spec.load_dtype(), spec.long_context()).to(local_device()).eval()
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model)
        self.eos_ids = sorted({self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})

    def _batches(self, count: int, params: SamplingParams) -> list[tuple[slice, int | None]]:
        """(prompts, seed) of each generate() call: a prompt alone with its own seed, or `batch_size` prompts
        seeded `seed` + the batch's number."""
        if params.seeds is not None:
            if len(params.seeds) != count:
                raise ValueError(f"seeds: one per prompt, got {len(params.seeds)} for {count} prompts")
            return [(slice(i, i + 1), seed) for i, seed in enumerate(params.seeds)]
        size = self.spec.batch_size
        return [(slice(s, s + size), None if params.seed is None else params.seed + b)
                for b, s in enumerate(range(0, count, size))]

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        sampler = Sampler(params.temperature, params.top_k, params.top_p, params.repetition_penalty)
        samples = params.n if params.temperature > 0 else 1  # greedy has one answer, repeated to give n
        texts = render_prompts(self.tokenizer, prompts)
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        results: list[list[Completion]] = []
        try:
            for batch, seed in self._batches(len(texts), params):
                generator = torch.Generator(self.model.device)
                generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
                enc = self.tokenizer(texts[batch], return_tensors="pt", padding=True).to(self.model.device)
                new = decode(self.model, enc["input_ids"], enc["attention_mask"], sampler, samples,
                             params.max_new_tokens, self.eos_ids, self.tokenizer.pad_token_id, generator,
                             self._stop_check(params.stop))  # [b * samples, generated]
                completions = [self._completion(row, params.stop) for row in new]
                results += [completions[i : i + samples] * (params.n // samples)
                            for i in range(0, len(completions), samples)]
        finally:
            self.tokenizer.padding_side = side
        return results

    def _stop_check(self, stop: list[str]) -> Callable[[list[int]], bool] | None:
        """Whether a row's new tokens hold a stop string: the text of its last few tokens is read, enough for the
        longest stop string (a token is at least one character)."""
        if not stop:
            return None
        tail = max(len(s) for s in stop) + 1
        return lambda ids: any(s in self.tokenizer.decode(ids[-tail:]) for s in stop)

    def _completion(self, ids: torch.Tensor, stop: list[str]) -> Completion:
        ids = ids.tolist()
        ended = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids if ended is None else ids[: ended + 1]
        text, stopped = cut_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), stop)
        return Completion(text, len(kept), "stop" if ended is not None or stopped else "length")
