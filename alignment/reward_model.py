"""The reward model as a scorer: conversations in, one scalar reward each out (the `rm` stage's held-out
accuracy, online DPO's reward, the annotate judge and eval all score through it)."""

from __future__ import annotations

import torch

from .checkpoint import reward_model_class
from .tokenizer import load_tokenizer


class RewardModel:
    """`RewardModel(path)(conversations)` -> rewards; a conversation ends with the assistant's reply."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32, batch_size: int = 16,
                 device: torch.device | str | None = None, model: torch.nn.Module | None = None):
        """`model`: score with a model already in memory (the rm trainer's own, sharded as it trained) and
        `path`'s tokenizer."""
        self.model = model if model is not None else \
            reward_model_class(path).from_pretrained(path, dtype=dtype, device_map=device).eval()
        self.tokenizer = load_tokenizer(path)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, conversations: list[list[dict]]) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        scores: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s : s + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.model.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores

    def pair_margins(self, pairs: list[dict]) -> list[float]:
        """reward(chosen) - reward(rejected) of each preference row."""
        chosen = self([r["prompt"] + r["chosen"] for r in pairs])
        rejected = self([r["prompt"] + r["rejected"] for r in pairs])
        return [c - r for c, r in zip(chosen, rejected)]
