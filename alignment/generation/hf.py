"""Batched chat generation with our backbone through transformers' `generate` (KV cache, left padding)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def generate_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    batch_size: int = 8,
    **sampling,
) -> list[str]:
    """One assistant reply per conversation (a list of {role, content} messages)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for s in range(0, len(conversations), batch_size):
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in conversations[s : s + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
            new = out[:, enc["input_ids"].shape[1] :]  # [b, generated]
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return replies
