"""Offline DPO on P with TRL's DPOTrainer, on our backbone.

Loss types, beta and every other DPO option come from the recipe's `training:` section
(`trl.DPOConfig`). The reference is the starting (SFT) model unless the recipe names another,
loaded as our backbone too; `precompute_ref_log_probs` works as in TRL. TRL asks the models
for per-token log-probs with `fused_lm_head=True`; our models answer from their chunked LM
head, only for completion tokens.
"""

from __future__ import annotations

import time

import torch
from trl import DPOConfig, DPOTrainer

from ..tokenizer import load_tokenizer
from .common import (
    finish_training,
    last_checkpoint,
    load_model,
    load_split,
    peft_config,
    preference_dataset,
    start_training,
    trl_config,
    use_native_lm_head,
)
from .recipes import DPORecipe


class Qwen2DPOTrainer(DPOTrainer):
    """DPOTrainer whose policy and reference log-probs come from our models' chunked LM head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_native_lm_head(self.model)
        if self.ref_model is not None:
            use_native_lm_head(self.ref_model)


@torch.inference_mode()
def completion_logprobs(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]],
                        batch_size: int = 16) -> list[float]:
    """log p(completion | prompt) summed over the completion's tokens, for each pair."""
    totals: list[float] = []
    for s in range(0, len(prompts), batch_size):
        ids, labels = [], []
        for prompt, completion in zip(prompts[s : s + batch_size], completions[s : s + batch_size]):
            head, full = (
                tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                          add_special_tokens=False)["input_ids"]
                for m, g in ((prompt, True), (prompt + completion, False))
            )
            ids.append(torch.tensor(full))
            labels.append(torch.tensor([-100] * len(head) + full[len(head):]))
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id)
        label_ids = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
        out = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                    labels=label_ids.to(model.device), fused_lm_head=True)
        totals += out.log_probs.sum(-1).tolist()
    return totals


def preference_margin(model, tokenizer, pairs: list[dict]) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected): what DPO should raise."""
    prompts = [r["prompt"] for r in pairs]
    chosen = completion_logprobs(model, tokenizer, prompts, [r["chosen"] for r in pairs])
    rejected = completion_logprobs(model, tokenizer, prompts, [r["rejected"] for r in pairs])
    return sum(c - r for c, r in zip(chosen, rejected)) / max(len(pairs), 1)


def run_dpo(recipe: DPORecipe) -> dict:
    start = start_training("dpo", recipe)
    if start.done:
        return start.done
    started = time.perf_counter()
    train, evaluation, counts = load_split(recipe, "preference", start.run_dir)
    tokenizer = load_tokenizer(recipe.model)
    reference = load_model(recipe.reference or recipe.model, recipe).eval()
    reference.requires_grad_(False)
    trainer = Qwen2DPOTrainer(
        model=load_model(recipe.model, recipe),
        ref_model=None if recipe.lora is not None else reference,  # with LoRA the adapter-free model is the reference
        args=trl_config(recipe, DPOConfig),
        train_dataset=preference_dataset(train),
        eval_dataset=preference_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=peft_config(recipe),
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(start.run_dir))

    def heldout(run_dir) -> dict:
        if not evaluation:
            return {}
        policy = load_model(str(run_dir), recipe).eval()
        before, after = preference_margin(reference, tokenizer, evaluation), preference_margin(policy, tokenizer, evaluation)
        print(f"dpo: held-out log p(chosen) - log p(rejected): {before:+.3f} (reference) -> {after:+.3f} (policy)")
        return {"heldout_margin_reference": before, "heldout_margin_policy": after}

    return finish_training(trainer, recipe, start, counts, {"train_loss": result.training_loss}, started, heldout)

