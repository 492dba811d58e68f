"""The `openai` backend: any OpenAI-compatible endpoint (`vllm serve`, a hosted teacher model).

Requests run concurrently (at most `concurrency` in flight), each with a timeout and the
client's exponential-backoff retries. The API key is read from the environment variable the
recipe names (`api_key_env`) and is never logged or written; local servers accept any key.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import openai

from .base import Completion, GenerationError, GenerationSpec, Generator, Prompt, SamplingParams


class OpenAIGenerator(Generator):
    def __init__(self, spec: GenerationSpec):
        self.spec = spec
        self.client = openai.OpenAI(
            base_url=spec.base_url,
            api_key=os.environ.get(spec.api_key_env) or "EMPTY",
            timeout=spec.timeout_s,
            max_retries=spec.max_retries,
        )
        self.pool = ThreadPoolExecutor(max_workers=spec.concurrency)

    def _request(self, prompt: Prompt, p: SamplingParams) -> list[Completion]:
        extra = {}
        if p.top_k > 0:
            extra["top_k"] = p.top_k
        if p.repetition_penalty != 1.0:
            extra["repetition_penalty"] = p.repetition_penalty
        common = dict(
            model=self.spec.model, n=p.n, max_tokens=p.max_new_tokens, temperature=p.temperature,
            top_p=p.top_p, seed=p.seed, stop=p.stop or None, extra_body=extra or None,
        )
        try:
            if isinstance(prompt, str):
                r = self.client.completions.create(prompt=prompt, **common)
                texts = [(c.text, c.finish_reason) for c in r.choices]
            else:
                r = self.client.chat.completions.create(messages=prompt, **common)
                texts = [(c.message.content or "", c.finish_reason) for c in r.choices]
        except openai.OpenAIError as e:
            detail = str(e).splitlines()[0] if str(e) else ""
            raise GenerationError(
                f"openai backend: {self.spec.base_url} failed after {self.spec.max_retries} retries: "
                f"{type(e).__name__}: {detail}"
            ) from None
        per_choice = (r.usage.completion_tokens // max(p.n, 1)) if r.usage else 0  # the API reports a total
        return [Completion(t, per_choice, "length" if f == "length" else "stop") for t, f in texts]

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        return list(self.pool.map(lambda pr: self._request(pr, params), prompts))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
