"""SFT on D with TRL's SFTTrainer, on our backbone.

The report's recipe lives in the recipes (`training:` maps onto `trl.SFTConfig`). What this
layer changes is only where the loss is computed: our model takes the labels and returns the
cross-entropy from its chunked LM head (gradient computed in the same pass), so the
full-vocabulary logits never exist. Packing uses TRL's padding-free batches: the position ids
restart at every sample, and our attention keeps each sample to itself.
"""

from __future__ import annotations

import time

import torch
from trl import SFTConfig, SFTTrainer

from ..tokenizer import load_tokenizer
from .common import (
    conversations_dataset,
    finish_training,
    last_checkpoint,
    load_model,
    load_split,
    peft_config,
    start_training,
    trl_config,
    use_native_lm_head,
)
from .recipes import SFTRecipe


class Qwen2SFTTrainer(SFTTrainer):
    """SFTTrainer whose loss comes from our model's chunked LM head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_native_lm_head(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        aux = outputs.aux_loss if self.aux_loss_enabled else None
        # An MoE model's loss includes router_aux_loss_coef * aux_loss (TRL wrote TRL's coefficient into
        # the config); the LM part is scaled below and the aux part added back as TRL does.
        loss = outputs.loss if aux is None else outputs.loss - self.router_aux_loss_coef * aux
        # As in TRL: `num_items_in_batch` counts every rank's tokens while DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if aux is not None:  # a per-micro-batch mean: averaged over the accumulation steps, as in TRL
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        device = loss.device
        correct = self.accelerator.gather_for_metrics(outputs.num_correct.detach().reshape(1).to(device)).sum()
        labelled = self.accelerator.gather_for_metrics(torch.tensor([outputs.num_labels or 0], device=device)).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / labelled.clamp(min=1)).item())
        if mode == "train":
            key = "attention_mask" if "attention_mask" in inputs else "position_ids"
            local = inputs[key].sum() if key == "attention_mask" else torch.tensor(inputs[key].size(1), device=device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local.reshape(1)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


def run_sft(recipe: SFTRecipe) -> dict:
    start = start_training("sft", recipe)
    if start.done:
        return start.done
    started = time.perf_counter()
    train, evaluation, counts = load_split(recipe, "demonstration", start.run_dir)
    args = trl_config(recipe, SFTConfig, eval_strategy=recipe.training.get("eval_strategy", "epoch" if evaluation else "no"))
    trainer = Qwen2SFTTrainer(
        model=load_model(recipe.model, recipe),
        args=args,
        train_dataset=conversations_dataset(train),
        eval_dataset=conversations_dataset(evaluation) if evaluation else None,
        processing_class=load_tokenizer(recipe.model),
        peft_config=peft_config(recipe),
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(start.run_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
               "last_logged_loss": losses[-1] if losses else None,
               "train_tokens_per_s": trainer._total_train_tokens / max(result.metrics["train_runtime"], 1e-9)}
    if evaluation:
        metrics |= {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
    return finish_training(trainer, recipe, start, counts, metrics, started)

