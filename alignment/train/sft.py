"""SFT on D with TRL's SFTTrainer, on our backbone.

The report's recipe lives in the recipes (`training:` maps onto `trl.SFTConfig`). What this
layer changes is only where the loss is computed: our model takes the labels and returns the
cross-entropy from its chunked LM head (gradient computed in the same pass), so the
full-vocabulary logits never exist. Packing uses TRL's padding-free batches: the position ids
restart at every sample, and our attention keeps each sample to itself.

`inputs.replay` (text rows, such as a `fraction` of the pretraining corpus) is trained on alongside D with every
token in the loss, against the alignment tax (base-text perplexity rising after SFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from datasets import Dataset, concatenate_datasets
from trl import SFTConfig, SFTTrainer

from ..stages import Run
from .common import (TrainerStage, TrainingData, TrainRecipe, fit, load_trained_model, load_trainer_tokenizer,
                     save_model, trainer_arguments, unhashed_datasets, use_native_lm_head)


@dataclass
class SFTRecipe(TrainRecipe):
    """inputs.train (D) -> the fine-tuned model; `training:` is `trl.SFTConfig`, evaluated every epoch when rows
    are held out (inputs.eval or eval_fraction). inputs.replay: text rows trained on with D (`Qwen2SFTTrainer`)."""

    trl_config_class: ClassVar[type] = SFTConfig

    def trl_defaults(self) -> dict[str, Any]:
        return {"eval_strategy": "epoch" if self.inputs.get("eval") or self.eval_fraction > 0 else "no"}


class Qwen2SFTTrainer(SFTTrainer):
    """SFTTrainer whose plain next-token loss comes from our model's chunked LM head, gradient
    computed in the forward pass. Every other loss (`loss_type: dft`, `label_smoothing_factor`,
    a `compute_loss_func`) takes TRL's own path, which our model answers through
    `fused_lm_head=True` or with full logits.

    `replay_dataset` (plain text, `text`) is prepared as TRL prepares a text dataset, every token labelled, and
    mixed into the prepared D (`add_replay`)."""

    def __init__(self, *args, replay_dataset: Dataset | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        use_native_lm_head(self.model)
        self.replay_tokens = 0  # tokens of replay text in one pass over the training data
        if replay_dataset is not None:
            self.add_replay(replay_dataset)

    def add_replay(self, texts: Dataset) -> None:
        """TRL prepares one dataset type per trainer (here conversations, labelled on assistant tokens only), so the
        texts are prepared on their own (tokenised, EOS added, labels = input ids, packed like D) and concatenated
        with the prepared D. Shuffled with the seed, so that a sequential sampler does not see D, then replay."""
        replay = self._prepare_dataset(texts, self.processing_class, self.args, self.args.packing, None, "replay")
        # Without packing, each keeps its raw columns (messages, text); the collator reads these three only.
        columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in self.train_dataset.column_names]
        mixed = concatenate_datasets([self.train_dataset.select_columns(columns), replay.select_columns(columns)])
        self.train_dataset = mixed.shuffle(seed=self.args.seed)
        self.replay_tokens = sum(map(len, replay["input_ids"]))

    def _uses_trl_loss(self) -> bool:
        return self.args.loss_type != "nll" or self.label_smoother is not None or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._uses_trl_loss():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
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


def build_sft_trainer(recipe: SFTRecipe, data: TrainingData, start: str) -> Qwen2SFTTrainer:
    """The model to train (from checkpoint `start`) and TRL's SFT trainer around it, as the recipe says."""
    model, tokenizer = load_trained_model(recipe, start), load_trainer_tokenizer(start)
    with unhashed_datasets():
        return Qwen2SFTTrainer(model=model, replay_dataset=data.replay_dataset(),
                               **trainer_arguments(recipe, data, tokenizer))


class SFTStage(TrainerStage):
    name = "sft"
    recipe_class = SFTRecipe
    data_kind = "demonstration"

    def train(self, run: Run, data: TrainingData, start: str) -> tuple[Qwen2SFTTrainer, dict[str, Any]]:
        trainer = build_sft_trainer(self.recipe, data, start)
        metrics = fit(trainer, self.recipe, run.started)
        metrics["train_tokens_per_s"] = trainer._total_train_tokens / max(metrics["train_runtime_s"], 1e-9)
        if data.replay:
            metrics["replay_tokens"] = trainer.replay_tokens
        if data.eval:
            metrics |= {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
        save_model(trainer, self.recipe, run.run_dir, start)
        return trainer, metrics
