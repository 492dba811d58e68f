"""Offline DPO on P with TRL's DPOTrainer, on our backbone.

Loss types, beta and every other DPO option come from the recipe's `training:` section
(`trl.DPOConfig`). The reference is the starting (SFT) model unless the recipe names another,
loaded as our backbone too; `precompute_ref_log_probs` works as in TRL. TRL asks the models
for per-token log-probs with `fused_lm_head=True`; our models answer from their chunked LM
head, only for completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from trl import DPOConfig, DPOTrainer

from ..stages import Run
from .common import (TrainerStage, TrainingData, TrainRecipe, fit, load_frozen_model, load_trained_model,
                     load_trainer_tokenizer, save_model, score_with_trainer, trainer_arguments, unhashed_datasets,
                     use_native_lm_head, whole_models)


@dataclass
class DPORecipe(TrainRecipe):
    """inputs.train (P) -> the policy; `training:` is `trl.DPOConfig`."""

    reference: str | None = None  # reference model; None = the starting model
    trl_config_class: ClassVar[type] = DPOConfig


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


def pair_margins(model, tokenizer, pairs: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair: what DPO should raise."""
    prompts = [r["prompt"] for r in pairs]
    chosen = completion_logprobs(model, tokenizer, prompts, [r["chosen"] for r in pairs])
    rejected = completion_logprobs(model, tokenizer, prompts, [r["rejected"] for r in pairs])
    return [c - r for c, r in zip(chosen, rejected)]


def build_dpo_trainer(recipe: DPORecipe, data: TrainingData, start: str, reference) -> Qwen2DPOTrainer:
    """The policy to train (from checkpoint `start`) and TRL's DPO trainer around it; `reference` is the frozen
    reference model."""
    model, tokenizer = load_trained_model(recipe, start), load_trainer_tokenizer(start)
    with unhashed_datasets():
        return Qwen2DPOTrainer(
            model=model, ref_model=None if recipe.lora is not None else reference,  # with LoRA: the adapter-free model
            **trainer_arguments(recipe, data, tokenizer))


def heldout_margins(trainer: Qwen2DPOTrainer, pairs: list[dict]) -> dict:
    """The mean held-out preference margin of the reference and of the trained policy, scored by the trainer's
    own models (`score_with_trainer`; with LoRA the reference is the policy with its adapter off)."""
    if not pairs:
        return {}
    tokenizer = trainer.processing_class

    def margins_of(model) -> list[float]:
        return score_with_trainer(trainer, pairs, lambda share: pair_margins(model, tokenizer, share))

    if trainer.ref_model is not None:
        before = margins_of(trainer.ref_model)
    else:
        with trainer.accelerator.unwrap_model(trainer.model).disable_adapter():
            before = margins_of(trainer.model)
    after = margins_of(trainer.model)
    before, after = sum(before) / len(before), sum(after) / len(after)
    trainer.accelerator.print(f"dpo: held-out log p(chosen) - log p(rejected): {before:+.3f} (reference) -> "
                              f"{after:+.3f} (policy)")
    return {"heldout_margin_reference": before, "heldout_margin_policy": after}


class DPOStage(TrainerStage):
    name = "dpo"
    recipe_class = DPORecipe
    data_kind = "preference"

    def train(self, run: Run, data: TrainingData, start: str) -> tuple[Qwen2DPOTrainer, dict[str, Any]]:
        recipe = self.recipe
        reference = None  # with LoRA the adapter-free policy is the reference (see `build_dpo_trainer`)
        if recipe.lora is None:
            with whole_models():  # under FSDP2 TRL shards it as each process loaded it, broadcasting nothing
                reference = load_frozen_model(recipe.reference or start, recipe)
        trainer = build_dpo_trainer(recipe, data, start, reference)
        metrics = fit(trainer, recipe, run.started)
        save_model(trainer, recipe, run.run_dir, start)
        metrics |= heldout_margins(trainer, data.eval)
        return trainer, metrics
