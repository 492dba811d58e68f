"""The reward model: a scoring head on our backbone, trained on P with TRL's RewardTrainer.

It starts from the SFT checkpoint (the head is freshly initialised) and is saved in the format
stock transformers loads as `Qwen2ForSequenceClassification`. Held-out pair accuracy is
measured after training with the same scorer online DPO uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from trl import RewardConfig, RewardTrainer

from ..checkpoint import reward_model_class
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
)
from .recipes import RewardRecipe


def run_rm(recipe: RewardRecipe, scorer: Callable[[str], object]) -> dict:
    """`scorer(path)` builds the scoring callable (the CLI passes `reward.model.RewardModel`)."""
    start = start_training("rm", recipe)
    if start.done:
        return start.done
    started = time.perf_counter()
    train, evaluation, counts = load_split(recipe, "preference", start.run_dir)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, recipe, reward_model_class(recipe.model), num_labels=1,
                       pad_token_id=tokenizer.pad_token_id)
    trainer = RewardTrainer(
        model=model,
        args=trl_config(recipe, RewardConfig),
        train_dataset=preference_dataset(train),
        eval_dataset=preference_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=peft_config(recipe),
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(start.run_dir))

    def heldout(run_dir) -> dict:  # measured on the saved model, through the scoring API
        if not evaluation:
            return {}
        accuracy, margin = scorer(str(run_dir)).pair_accuracy(evaluation)
        print(f"rm: held-out pair accuracy {accuracy:.3f} on {len(evaluation)} pairs (mean margin {margin:+.3f})")
        return {"heldout_pair_accuracy": accuracy, "heldout_reward_margin": margin}

    return finish_training(trainer, recipe, start, counts, {"train_loss": result.training_loss}, started, heldout)

