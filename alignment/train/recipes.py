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
class PretrainRecipe(SFTRecipe):
    """A base model from scratch (alignment.train.pretrain): `training:` maps onto trl.SFTConfig, the inputs
    are text rows, and the model is a random one of `preset`'s shape (`model` is not used)."""

    model: str = ""
    preset: str = "tiny"
    vocabulary: Literal["full", "corpus"] = "full"  # corpus: only the tokens the corpus uses (see the module)
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's config fields

    def __post_init__(self) -> None:
        from ..model.presets import PRESETS

        if self.model:
            raise ValueError("model: pretraining starts from a random model of `preset`; leave model out")
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")


@dataclass
class RewardRecipe(TrainRecipe):
    trl_config: ClassVar[str] = "trl.RewardConfig"


@dataclass
class DPORecipe(TrainRecipe):
    reference: str | None = None  # reference model; None = the starting model
    trl_config: ClassVar[str] = "trl.DPOConfig"


@dataclass
class MergingSpec:
    """The online merging optimizer (Lu et al. 2024, alignment.optim) that limits the alignment tax:
    tau = reference (the SFT model) - base_model is mixed into every update."""

    method: Literal["ondare", "onties", "none"] = "ondare"  # none: TRL's AdamW
    base_model: str | None = None  # theta_b; the pre-trained model before SFT
    reserve_rate: float = 0.01  # p: the share of entries F_p keeps
    alpha: float = 1e-6  # tau's weight in each merged update
    rescale: bool = False  # kept entries times 1/p (the public code) or not (the paper)
    tau_mask: Literal["step", "fixed"] = "step"  # OnDARE: draw tau's mask every step (paper) or once (sparse)
    merge_every: int = 1  # merge on every k-th step, plain AdamW on the others

    def __post_init__(self) -> None:
        if self.method != "none" and not self.base_model:
            raise ValueError(f"base_model: required with method {self.method!r} (tau = reference - base_model)")
        if not 0 < self.reserve_rate <= 1:
            raise ValueError(f"reserve_rate: must be in (0, 1], got {self.reserve_rate}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.merge_every < 1:
            raise ValueError(f"merge_every: must be >= 1, got {self.merge_every}")


@dataclass
class OnlineDPORecipe(DPORecipe):
    """inputs.prompts -> episodes of: samples from the policy, best vs worst by the reward, DPO on the pairs
    (alignment.train.online_dpo). `reference` (default: `model`) is DPO's reference and tau's SFT end.

    The reward is the reward model's score, or with `verifier: math` whether the response's final answer equals
    the prompt row's `meta.answer` (1 or 0); with both, correctness decides and the reward model orders the
    responses within each verdict (reward = verdict + sigmoid(score) / 2)."""

    reward_model: str = ""  # a reward-model run dir that scores samples
    verifier: Literal["none", "math"] = "none"  # math: the final answer checked against meta.answer
    prompts_per_episode: int = 64
    samples_per_prompt: int = 4
    episodes: int = 1
    min_reward_margin: float = 0.0  # pairs whose best - worst reward is not above it are dropped
    reference_policy: Literal["initial", "previous"] = "initial"  # DPO's reference: `reference`, or last episode's
    eval_prompts: int = 16  # held out from inputs.prompts: reward, win rate and KL after every episode
    generation: GenerationSpec = field(default_factory=GenerationSpec)  # how the policy samples (model: unused)
    merging: MergingSpec = field(default_factory=MergingSpec)

    def __post_init__(self) -> None:
        if not self.reward_model and self.verifier == "none":
            raise ValueError("reward_model: required without a verifier (a reward-model run dir, e.g. runs/tiny/rm)")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: must be >= 2 (best and worst of them), got {self.samples_per_prompt}")
        for name in ("prompts_per_episode", "episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts: must be >= 0, got {self.eval_prompts}")
        if self.generation.backend == "openai":
            raise ValueError("generation.backend: online DPO samples from the policy it trains: transformers or vllm")
        if self.lora is not None and self.merging.method != "none":
            raise ValueError("merging.method: the merging optimizers merge whole weights; with lora use none")
