"""The stage table: every stage class with its one-line help, and the recipe loader that checks a recipe
against its stage.

A stage (`alignment.stages.Stage`) has a `name`, its `recipe_class` and `run()`: a data stage shards rows
(`DataStage`), a trainer stage trains (`alignment.train.common.TrainerStage`). The Makefile's stage targets
and the demo's steps are checked against this table by the tests (tests/test_layers.py).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.recipe_loader import RecipeError, apply_overrides, build, read_yaml
from alignment.stages import Stage
from alignment.train.dpo import DPOStage
from alignment.train.online_dpo import OnlineDPOStage
from alignment.train.pretrain import PretrainStage
from alignment.train.reward import RewardStage
from alignment.train.sft import SFTStage
from data_synthesis.annotate_app import Annotate
from data_synthesis.assemble import AssembleStage
from data_synthesis.constitution import ConstitutionStage
from data_synthesis.decontam import DecontamStage
from data_synthesis.evolve import EvolveStage
from data_synthesis.execution import ExecutionStage
from data_synthesis.generate import GenerateStage
from data_synthesis.instag import InsTagStage
from data_synthesis.rejection import RejectionStage
from data_synthesis.repurpose import RepurposeStage
from data_synthesis.responses import ResponsesStage
from data_synthesis.select import SelectStage

from .eval import EvalStage


@dataclass(frozen=True)
class StageEntry:
    stage: type[Stage]
    help: str  # one line for `qwen2-align --help`
    demo_only: bool = False  # a recipe only in recipes/tiny (the demo's own base model)


STAGES: dict[str, StageEntry] = {entry.stage.name: entry for entry in (
    StageEntry(GenerateStage, "sample completions for prompts with any generation backend"),
    StageEntry(InsTagStage, "InsTag: tag instructions and normalise the tag ontology"),
    StageEntry(SelectStage, "select instructions by tag diversity and complexity"),
    StageEntry(EvolveStage, "instruction evolution (Evol-Instruct / Tree-Instruct)"),
    StageEntry(ResponsesStage, "sample several responses per instruction from several models and strategies"),
    StageEntry(Annotate, "rank responses, by people in a local web app or by a judge; top to D, pairs to P"),
    StageEntry(RejectionStage, "rejection sampling for math: correct paths to D, correct vs wrong to P"),
    StageEntry(ExecutionStage,
               "execution feedback in a sandbox: code against tests, responses against constraint checkers"),
    StageEntry(RepurposeStage, "data repurposing: literature and role-play into instructions"),
    StageEntry(ConstitutionStage, "constitutional feedback: responses that follow or violate principles"),
    StageEntry(DecontamStage, "decontamination against test sets (13-gram, LCS)"),
    StageEntry(AssembleStage, "merge synthesis runs' D and P: dedup by content, decontaminated, lineage kept"),
    StageEntry(PretrainStage, "pretrain a tiny base model from scratch on text rows (the demo's base model)",
               demo_only=True),
    StageEntry(SFTStage, "supervised fine-tuning on D (TRL SFTTrainer)"),
    StageEntry(RewardStage, "reward model on P (TRL RewardTrainer)"),
    StageEntry(DPOStage, "offline DPO on P (TRL DPOTrainer)"),
    StageEntry(OnlineDPOStage, "online DPO with the online merging optimizer (OnDARE / OnTIES)"),
    StageEntry(EvalStage,
               "evaluate models side by side: arithmetic, code pass@1, constraints, reward, perplexity, passkey"),
)}


def _suggest(name: str) -> str:
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
    return build(STAGES[name].stage.recipe_class, data, where)


def run(name: str, recipe: Any, action: str | None = None) -> Any:
    """Run a stage (or one of its actions, such as `annotate export`) on a validated recipe."""
    stage = STAGES[name].stage(recipe)
    return getattr(stage, action)() if action else stage.run()


def check_recipe_dir(directory: str | Path) -> list[str]:
    """Validate every recipe in a directory; returns the stages found."""
    return [load_recipe(path).stage for path in sorted(Path(directory).glob("*.yaml"))]
