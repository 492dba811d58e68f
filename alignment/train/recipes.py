"""Recipes of the trainer stages. Their `training:` section maps key for key onto TRL's config
dataclass for the stage (SFTConfig, RewardConfig, DPOConfig), so every TRL option, including
`push_to_hub` / `hub_model_id`, is available under its TRL name and checked against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..data import DataInput
from ..generation.base import GenerationSpec


@dataclass
class LoraSpec:
    """Optional LoRA adapters through peft; None trains all weights."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainRecipe:
    stage: str
    run_dir: str
    model: str  # checkpoint directory or Hub id to start from
    inputs: dict[str, DataInput] = field(default_factory=dict)  # train (required), eval (optional)
    seed: int = 0
    eval_fraction: float = 0.0  # held out from train when no eval input is given
    # Compute precision; weights and optimizer state stay float32 (see alignment.train.common).
    # auto: bf16 on a GPU that has it; on CPU, whichever a matmul probe finds faster.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    training: dict[str, Any] = field(default_factory=dict)  # the TRL config's fields
    lora: LoraSpec | None = None

    # The TRL config class `training` is checked against (imported lazily: TRL is slow to import).
    trl_config: ClassVar[str] = ""


# `training:` keys that TRL accepts but that have their one home elsewhere (or none in a file).
REFUSED_TRAINING_KEYS = {
    "output_dir": "the output directory is the recipe's run_dir",
    "seed": "use the recipe's top-level seed",
    "bf16": "the precision is the recipe's dtype (auto, float32, bfloat16, float16)",
    "fp16": "the precision is the recipe's dtype (auto, float32, bfloat16, float16)",
    "hub_token": "a token does not belong in a recipe (it would be saved with the run); set HF_TOKEN or run "
                 "`hf auth login`",
}


def check_training_section(recipe: TrainRecipe, where: str) -> None:
    """The `training:` section checked as TRL checks it: key by key against the config class,
    then the config built, so TRL's own cross-field checks (`__post_init__`) fail here, in one
    line, rather than after the model has loaded."""
    import importlib

    from ..recipes import RecipeError, check_keys
    from .common import trl_config

    for key, reason in REFUSED_TRAINING_KEYS.items():
        if key in recipe.training:
            raise RecipeError(f"{where}: training.{key}: {reason}")
    module, _, name = recipe.trl_config.rpartition(".")
    config_class = getattr(importlib.import_module(module), name)
    recipe.training = check_keys(config_class, recipe.training, where, prefix="training.")
    try:
        trl_config(recipe, config_class)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise RecipeError(f"{where}: training: {str(e).strip().splitlines()[0]}") from None


@dataclass
class SFTRecipe(TrainRecipe):
    trl_config: ClassVar[str] = "trl.SFTConfig"


@dataclass
class RewardRecipe(TrainRecipe):
    trl_config: ClassVar[str] = "trl.RewardConfig"


@dataclass
class DPORecipe(TrainRecipe):
    reference: str | None = None  # reference model; None = the starting model
    trl_config: ClassVar[str] = "trl.DPOConfig"


@dataclass
class MergingSpec:
    """The online merging optimizer (Lu et al. 2024) that limits the alignment tax."""

    method: Literal["ondare", "onties", "none"] = "ondare"
    base_model: str | None = None  # theta_b; the pre-trained model before SFT
    reserve_rate: float = 0.01  # p
    alpha: float = 1e-6


@dataclass
class OnlineDPORecipe(DPORecipe):
    reward_model: str = ""  # scores samples; best and worst form a pair
    prompts_per_episode: int = 64
    samples_per_prompt: int = 4
    episodes: int = 1
    generation: GenerationSpec = field(default_factory=GenerationSpec)  # how the policy samples
    merging: MergingSpec = field(default_factory=MergingSpec)
