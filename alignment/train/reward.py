"""The reward model: a scoring head on our backbone, trained on P with TRL's RewardTrainer.

It starts from the SFT checkpoint (the head is freshly initialised) and is saved in the format
stock transformers loads as `Qwen2ForSequenceClassification`. Held-out pair accuracy is
measured after training with the same scorer online DPO uses.
"""

from __future__ import annotations

from collections.abc import Callable

from trl import RewardConfig, RewardTrainer

from ..checkpoint import DTYPES, reward_model_class
from .common import (
    compute_dtype,
    load_trained_model,
    load_trainer_tokenizer,
    load_training_data,
    peft_config,
    save_model,
    score_in_shares,
    start_training,
    train,
    trl_config,
    write_run_artifacts,
)
from .recipes import RewardRecipe


def run_rm(recipe: RewardRecipe, scorer: Callable[..., object]) -> dict:
    """`scorer(path, dtype=, device=)` builds the scoring callable (the CLI passes `reward.model.RewardModel`)."""
    run = start_training(recipe)
    if run.done:
        return run.done
    data = load_training_data(recipe, "preference", run)
    tokenizer = load_trainer_tokenizer(recipe.model)
    trainer = RewardTrainer(
        model=load_trained_model(recipe, reward_model_class(recipe.model), num_labels=1,
                                 pad_token_id=tokenizer.pad_token_id),
        args=trl_config(recipe, RewardConfig),
        train_dataset=data.train_dataset(),
        eval_dataset=data.eval_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config(recipe),
    )
    metrics = train(trainer, recipe)
    save_model(trainer, recipe, run, reward_model_class(recipe.model))
    if data.eval:  # measured on the saved model, through the scoring API
        device, dtype = trainer.accelerator.device, DTYPES[compute_dtype(recipe)]
        margins = score_in_shares(trainer.accelerator, data.eval,
                                  lambda share: scorer(recipe.run_dir, dtype=dtype, device=device).pair_margins(share))
        accuracy, margin = sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
        trainer.accelerator.print(f"rm: held-out pair accuracy {accuracy:.3f} on {len(margins)} pairs "
                                  f"(mean margin {margin:+.3f})")
        metrics |= {"heldout_pair_accuracy": accuracy, "heldout_reward_margin": margin}
    return write_run_artifacts(trainer, recipe, run, data.counts, metrics)
