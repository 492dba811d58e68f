"""The reward model: a scoring head on our backbone, trained on P with TRL's RewardTrainer.

It starts from the SFT checkpoint (the head is freshly initialised) and is saved in the format
stock transformers loads as `Qwen2ForSequenceClassification`. Held-out pair accuracy is
measured after training with the same scorer online DPO uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from ..checkpoint import reward_model_class
from ..reward_model import RewardModel
from ..stages import Run
from .common import (TrainerStage, TrainingData, TrainRecipe, fit, load_trained_model, load_trainer_tokenizer,
                     save_model, score_with_trainer, trainer_arguments, unhashed_datasets)


@dataclass
class RewardRecipe(TrainRecipe):
    """inputs.train (P) -> the reward model; `training:` is `trl.RewardConfig`."""

    trl_config_class: ClassVar[type] = RewardConfig


class RewardStage(TrainerStage):
    name = "rm"
    recipe_class = RewardRecipe
    data_kind = "preference"

    def train(self, run: Run, data: TrainingData, start: str) -> tuple[RewardTrainer, dict[str, Any]]:
        tokenizer = load_trainer_tokenizer(start)
        recipe = self.recipe
        set_seed(recipe.seed)  # the new score head's initial weights: the same however the run is launched
        model = load_trained_model(recipe, start, reward_model_class(start), num_labels=1,
                                   pad_token_id=tokenizer.pad_token_id)
        with unhashed_datasets():
            trainer = RewardTrainer(model=model, **trainer_arguments(recipe, data, tokenizer))
        metrics = fit(trainer, recipe, run.started)
        save_model(trainer, recipe, run.run_dir, start, reward_model_class(start))
        if data.eval:  # the trained model, through the scoring API online DPO uses
            scorer = RewardModel(start, model=trainer.model)
            margins = score_with_trainer(trainer, data.eval, scorer.pair_margins)
            accuracy, margin = sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
            trainer.accelerator.print(f"rm: held-out pair accuracy {accuracy:.3f} on {len(margins)} pairs "
                                      f"(mean margin {margin:+.3f})")
            metrics |= {"heldout_pair_accuracy": accuracy, "heldout_reward_margin": margin}
        return trainer, metrics
