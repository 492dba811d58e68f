"""The `transformers` backend: our backbone's batched `generate` with a KV cache and left padding, on this
process's device (`local_device`). With a seed per prompt (`SamplingParams.seeds`) each prompt is generated on its
own, unpadded: torch draws from one generator per call, so only that keeps a prompt's samples independent of
its batch."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..checkpoint import load_causal_lm, local_device
from ..tokenizer import load_tokenizer
from .base import Completion, GenerationSpec, Generator, Prompt, SamplingParams


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

    def _config(self, p: SamplingParams) -> GenerationConfig:
        sample = p.temperature > 0
        return GenerationConfig(
            max_new_tokens=p.max_new_tokens,
            do_sample=sample,
            temperature=p.temperature if sample else None,
            top_p=p.top_p if sample else None,
            top_k=(p.top_k if p.top_k > 0 else None) if sample else None,
            repetition_penalty=p.repetition_penalty,
            num_return_sequences=p.n if sample else 1,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=p.stop or None,
        )

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
        config = self._config(params)
        texts = render_prompts(self.tokenizer, prompts)
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        results: list[list[Completion]] = []
        try:
            for batch, seed in self._batches(len(texts), params):
                if seed is not None:
                    torch.manual_seed(seed)
                enc = self.tokenizer(texts[batch], return_tensors="pt", padding=True)
                enc = enc.to(self.model.device)
                out = self.model.generate(**enc, generation_config=config, tokenizer=self.tokenizer)
                new = out[:, enc["input_ids"].shape[1] :]  # [b * n, generated]
                completions = [self._completion(row, params.stop) for row in new]
                per_prompt = config.num_return_sequences
                # Greedy decoding has one answer: it is repeated to give n completions.
                results += [completions[i : i + per_prompt] * (params.n // per_prompt)
                            for i in range(0, len(completions), per_prompt)]
        finally:
            self.tokenizer.padding_side = side
        return results

    def _completion(self, ids: torch.Tensor, stop: list[str]) -> Completion:
        ids = ids.tolist()
        ended = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids if ended is None else ids[: ended + 1]
        text, stopped = cut_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), stop)
        return Completion(text, len(kept), "stop" if ended is not None or stopped else "length")
