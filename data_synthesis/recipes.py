"""The recipe schema of every data-synthesis stage, so each recipe is validated before anything
runs, also for stages whose implementation lands later. Common keys come from `StageRecipe`
(stage, run_dir, inputs, seed, shard_size); stages that generate text add `generation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignment.generation import GenerationSpec
from alignment.stages import StageRecipe


@dataclass
class GenerateRecipe(StageRecipe):
    """inputs.prompts -> completions: `generation.n` samples per prompt."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)


@dataclass
class InsTagRecipe(StageRecipe):
    """inputs.instructions -> tagged instructions and the normalised tag ontology."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    min_tag_frequency: int = 20
    embedding_model: str = "all-MiniLM-L6-v2"
    semantic_min_similarity: float = 0.05
    association_min_support: int = 40
    association_min_confidence: float = 0.99


@dataclass
class SelectRecipe(StageRecipe):
    """inputs.tagged -> the selected instructions (complexity-first diverse sampling)."""

    num_instructions: int = 1000
    min_tags: int = 1


@dataclass
class EvolveRecipe(StageRecipe):
    """inputs.instructions -> evolved instructions."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    method: Literal["evol", "tree"] = "evol"
    rounds: int = 1
    operations: list[str] = field(
        default_factory=lambda: ["add_constraint", "deepen", "concretize", "multi_step", "complicate_input", "breadth"]
    )
    max_added_words: int = 20
    tree_new_nodes: int = 3


@dataclass
class ResponsesRecipe(StageRecipe):
    """inputs.instructions -> several responses per instruction from several models."""

    generators: list[GenerationSpec] = field(default_factory=list)


@dataclass
class AnnotateRecipe(StageRecipe):
    """inputs.responses -> rankings from annotators in a web app, stored in SQLite."""

    host: str = "127.0.0.1"
    port: int = 8765
    database: str = "annotations.sqlite"
    annotators_per_item: int = 1


@dataclass
class RejectionRecipe(StageRecipe):
    """inputs.problems (with reference answers) -> D (correct paths) and P (correct vs wrong)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    pairs_per_problem: int = 1


@dataclass
class ExecutionRecipe(StageRecipe):
    """code: inputs.tasks (prompts, tests in meta.tests or written by the teacher) -> solutions run with the
    tests in the sandbox, passing to D, passing vs failing to P (data_synthesis.execution).
    instruction_following (constraint checkers) is not built yet."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    kind: Literal["code", "instruction_following"] = "code"
    timeout_s: float = 10.0  # per solution, wall clock and CPU seconds
    memory_mb: int = 512  # per solution, address space
    workers: int = 2  # sandboxes run at once (size it to the cores)

    def __post_init__(self) -> None:
        if self.kind == "instruction_following":
            raise ValueError("kind: 'instruction_following' is not built yet (only 'code' is)")
        for name in ("timeout_s", "memory_mb", "workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass
class RepurposeRecipe(StageRecipe):
    """literature: inputs.documents (text rows) -> instructions at each detail level, the original text the answer;
    roleplay: inputs.profiles (text rows, character profiles) -> a role-play exchange with the profile as system
    prompt (data_synthesis.repurpose)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    kind: Literal["literature", "roleplay"] = "literature"
    detail_levels: list[str] = field(default_factory=lambda: ["brief", "detailed", "very_detailed"])

    def __post_init__(self) -> None:
        from .repurpose import DETAIL_TEMPLATES

        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one instruction per level, one reply per turn), "
                             f"got {self.generation.n}")
        if self.kind == "literature":
            if not self.detail_levels:
                raise ValueError(f"detail_levels: must list at least one of {', '.join(DETAIL_TEMPLATES)}")
            unknown = [d for d in self.detail_levels if d not in DETAIL_TEMPLATES]
            if unknown:
                raise ValueError(f"detail_levels: unknown level {unknown[0]!r} (known: {', '.join(DETAIL_TEMPLATES)})")
            if len(set(self.detail_levels)) != len(self.detail_levels):
                raise ValueError("detail_levels: a level is listed twice")


@dataclass
class ConstitutionRecipe(StageRecipe):
    """inputs.prompts -> responses that follow (D, chosen) or violate (rejected) a constitution's principles.

    The constitution file is read and checked when the recipe is (data_synthesis.constitution)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    constitution: str = ""  # a YAML file of principles to follow and to avoid; "" = recipes/constitution/default.yaml
    principles: list[str] = field(default_factory=list)  # ids of the principles to draw from; empty = all
    principles_per_prompt: int = 1  # drawn per prompt, without repeats, from the seed and the prompt's id

    def __post_init__(self) -> None:
        from .constitution import DEFAULT_CONSTITUTION, load_constitution

        if self.principles_per_prompt < 1:
            raise ValueError(f"principles_per_prompt: must be >= 1, got {self.principles_per_prompt}")
        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one follower and one violator reply per principle), "
                             f"got {self.generation.n}")
        self.constitution_path = self.constitution or str(DEFAULT_CONSTITUTION)
        loaded = load_constitution(self.constitution_path)
        known = {p.id: p for p in loaded}
        unknown = [i for i in self.principles if i not in known]
        if unknown:
            raise ValueError(f"principles: {unknown[0]!r} is not in {self.constitution_path} "
                             f"(it has {', '.join(known)})")
        if len(set(self.principles)) != len(self.principles):
            raise ValueError("principles: an id is listed twice")
        self.chosen = [known[i] for i in self.principles] if self.principles else loaded
        if self.principles_per_prompt > len(self.chosen):
            raise ValueError(f"principles_per_prompt: {self.principles_per_prompt} is more than the "
                             f"{len(self.chosen)} principles to draw from")


@dataclass
class DecontamRecipe(StageRecipe):
    """inputs.train against every other input (each one test set) -> the train rows with no test overlap."""

    ngram: int = 13
    lcs_min_tokens: int = 13
    lcs_ratio: float = 0.6
    strict_test_split: bool = False

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram: must be >= 1, got {self.ngram}")
        if self.lcs_min_tokens < 1:
            raise ValueError(f"lcs_min_tokens: must be >= 1, got {self.lcs_min_tokens}")
        if not 0 < self.lcs_ratio <= 1:
            raise ValueError(f"lcs_ratio: must be > 0 and <= 1, got {self.lcs_ratio}")
        if not set(self.inputs) - {"train"}:
            raise ValueError("inputs: no test set; every input besides train is one (inputs.gsm8k: data/gsm8k.jsonl)")
