"""The stage table: every stage's name, help, recipe schema and runner, and the recipe loader.

With `cli.py` this is the wiring layer: with `eval.py`, the only place in `alignment` that imports the
`data_synthesis` and `reward` packages (which themselves import from `alignment`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipes import RecipeError, apply_overrides, build, read_yaml
from .stages import run_stage


@dataclass(frozen=True)
class StageSpec:
    help: str
    recipe_class: str  # "module:Class", imported on use
    runner: str | None = None  # "module:Class" of a Stage, or "module:function(recipe)"; None = not built yet
    actions: tuple[tuple[str, str, str], ...] = ()  # (name, help, "module:function(recipe)"): `<stage> NAME`
    demo_only: bool = False  # a recipe only in recipes/tiny (the demo's own base model)


STAGES: dict[str, StageSpec] = {
    "generate": StageSpec("sample completions for prompts with any generation backend",
                          "data_synthesis.recipes:GenerateRecipe", "data_synthesis.generate:GenerateStage"),
    "instag": StageSpec("InsTag: tag instructions and normalise the tag ontology",
                        "data_synthesis.recipes:InsTagRecipe", "data_synthesis.instag:InsTagStage"),
    "select": StageSpec("select instructions by tag diversity and complexity", "data_synthesis.recipes:SelectRecipe",
                        "data_synthesis.select:SelectStage"),
    "evolve": StageSpec("instruction evolution (Evol-Instruct / Tree-Instruct)", "data_synthesis.recipes:EvolveRecipe",
                        "data_synthesis.evolve:EvolveStage"),
    "responses": StageSpec("sample several responses per instruction from several models and strategies",
                           "data_synthesis.recipes:ResponsesRecipe", "data_synthesis.responses:ResponsesStage"),
    "annotate": StageSpec("rank responses, by people in a local web app or by a judge; top to D, pairs to P",
                          "data_synthesis.recipes:AnnotateRecipe", "data_synthesis.annotate_app:run_annotate",
                          (("export", "write D and P from the people's rankings submitted so far",
                            "data_synthesis.annotate_app:export_annotations"),)),
    "rejection": StageSpec("rejection sampling for math: correct paths to D, correct vs wrong to P",
                           "data_synthesis.recipes:RejectionRecipe", "data_synthesis.rejection:RejectionStage"),
    "execution": StageSpec("execution feedback in a sandbox: code against tests, responses against constraint checkers",
                           "data_synthesis.recipes:ExecutionRecipe", "data_synthesis.execution:ExecutionStage"),
    "repurpose": StageSpec("data repurposing: literature and role-play into instructions",
                           "data_synthesis.recipes:RepurposeRecipe", "data_synthesis.repurpose:RepurposeStage"),
    "constitution": StageSpec("constitutional feedback: responses that follow or violate principles",
                              "data_synthesis.recipes:ConstitutionRecipe",
                              "data_synthesis.constitution:ConstitutionStage"),
    "decontam": StageSpec("decontamination against test sets (13-gram, LCS)", "data_synthesis.recipes:DecontamRecipe",
                          "data_synthesis.decontam:DecontamStage"),
    "assemble": StageSpec("merge synthesis runs' D and P: dedup by content, decontaminated, lineage kept",
                          "data_synthesis.recipes:AssembleRecipe", "data_synthesis.assemble:AssembleStage"),
    "pretrain": StageSpec("pretrain a tiny base model from scratch on text rows (the demo's base model)",
                          "alignment.train.recipes:PretrainRecipe", "alignment.train.pretrain:run_pretrain",
                          demo_only=True),
    "sft": StageSpec("supervised fine-tuning on D (TRL SFTTrainer)", "alignment.train.recipes:SFTRecipe",
                     "alignment.train.sft:run_sft"),
    "rm": StageSpec("reward model on P (TRL RewardTrainer)", "alignment.train.recipes:RewardRecipe",
                    "alignment.pipeline:run_reward_model"),
    "dpo": StageSpec("offline DPO on P (TRL DPOTrainer)", "alignment.train.recipes:DPORecipe",
                     "alignment.train.dpo:run_dpo"),
    "online-dpo": StageSpec("online DPO with the online merging optimizer (OnDARE / OnTIES)",
                            "alignment.train.recipes:OnlineDPORecipe", "alignment.pipeline:run_online_dpo"),
    "eval": StageSpec("evaluate models side by side: arithmetic, code pass@1, constraints, reward, perplexity, passkey",
                      "alignment.eval:EvalRecipe", "alignment.eval:run_eval"),
}


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(STAGES), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_recipe(path: str | Path, stage: str | None = None, overrides: list[str] = ()) -> Any:
    """Read, override and validate a recipe; any problem raises RecipeError with one line."""
    where = str(path)
    data = apply_overrides(read_yaml(path), list(overrides))
    name = data.get("stage")
    if name is None:
        raise RecipeError(f"{where}: stage: required key is missing")
    if name not in STAGES:
        raise RecipeError(f"{where}: stage: unknown stage {name!r}{_suggest(str(name))}")
    if stage is not None and name != stage:
        raise RecipeError(f"{where}: stage: this recipe is for '{name}', not '{stage}'")
    recipe_class = _resolve(STAGES[name].recipe_class)
    recipe = build(recipe_class, data, where)
    if getattr(recipe_class, "trl_config", ""):
        from .train.recipes import check_training_section

        check_training_section(recipe, where)
    return recipe


def run_reward_model(recipe: Any) -> Any:
    """The reward-model stage, with the scorer that measures held-out pair accuracy."""
    from reward.model import RewardModel

    from .train.reward import run_rm

    return run_rm(recipe, RewardModel)


def run_online_dpo(recipe: Any) -> Any:
    """The online DPO stage, with the reward model and the verifier that pick best and worst."""
    from reward.model import RewardModel
    from reward.verifiers import answer_is_correct

    from .train.online_dpo import run_online_dpo as run

    return run(recipe, RewardModel, answer_is_correct)


def is_built(name: str) -> bool:
    return STAGES[name].runner is not None


def run(name: str, recipe: Any, action: str | None = None) -> Any:
    """Run a built stage (or one of its actions) on a validated recipe."""
    if action:
        return _resolve(dict((n, ref) for n, _, ref in STAGES[name].actions)[action])(recipe)
    runner: Callable | type = _resolve(STAGES[name].runner)
    if isinstance(runner, type):
        return run_stage(runner(recipe))
    return runner(recipe)


def manage_annotators(recipe: Any, add: list[str], revoke: list[str]) -> None:
    """Sign-in tokens of the people who rank in `annotate`'s web app."""
    _resolve("data_synthesis.annotate_app:manage_annotators")(recipe, add, revoke)


def check_recipe_dir(directory: str | Path) -> list[str]:
    """Validate every recipe in a directory; returns the stages found."""
    found = []
    for path in sorted(Path(directory).glob("*.yaml")):
        found.append(load_recipe(path).stage)
    return found
