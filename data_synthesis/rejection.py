"""`rejection`: rejection sampling for math, the report's recipe for verifiable answers.

For every problem (a prompt row whose `meta.answer` is the reference), `generation.n` reasoning
paths are sampled; a path is correct when its final answer equals the reference as mathematics
(`reward.verifiers.answer_is_correct`). Correct paths, deduplicated, become
demonstrations (D); correct vs incorrect paths become preference pairs (P), up to
`pairs_per_problem` per problem; every problem gets a score row with pass@1 (the share of
correct samples) and pass@k (any correct). Output rows carry their lineage in `meta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from alignment.data import Quarantined
from alignment.generation import GenerationSpec
from alignment.stages import Outcome, ShardContext, StageRecipe
from reward.verifiers import answer_is_correct

from .generate import GeneratingStage, lineage


@dataclass
class JudgedPaths:
    """A problem's sampled paths split by their final answer, duplicates dropped, order kept."""

    correct: list[str]
    incorrect: list[str]
    samples: int
    correct_samples: int


def judge_paths(reference: str, paths: list[str]) -> JudgedPaths:
    correct: list[str] = []
    incorrect: list[str] = []
    correct_samples = 0
    for path in paths:
        right = answer_is_correct(reference, path)
        correct_samples += right
        kept = correct if right else incorrect
        if path.strip() and path.strip() not in (p.strip() for p in kept):
            kept.append(path)
    return JudgedPaths(correct, incorrect, len(paths), correct_samples)


def rejection_rows(problem: dict, judged: JudgedPaths, pairs_per_problem: int, model: str, seed: int
                   ) -> dict[str, list[dict]]:
    """The D, P and score rows of one problem."""
    prompt, source = problem["messages"], "rejection"
    meta = lambda **extra: problem["meta"] | lineage("rejection", model, seed, problem["id"], **extra)  # noqa: E731
    demonstrations = [{"id": f"{problem['id']}-c{i}", "messages": prompt + [{"role": "assistant", "content": path}],
                       "source": source, "meta": meta(verdict="correct")} for i, path in enumerate(judged.correct)]
    preferences = [{"id": f"{problem['id']}-p{i}", "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}], "source": source, "meta": meta()}
                   for i, (chosen, rejected) in enumerate(zip(judged.correct, judged.incorrect))][:pairs_per_problem]
    score = {"id": problem["id"], "samples": judged.samples, "correct_samples": judged.correct_samples,
             "pass@1": judged.correct_samples / max(judged.samples, 1), "pass@k": float(judged.correct_samples > 0)}
    return {"demonstrations": demonstrations, "preferences": preferences, "scores": [score]}


@dataclass
class RejectionRecipe(StageRecipe):
    """inputs.problems (with reference answers) -> D (correct paths) and P (correct vs wrong)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    pairs_per_problem: int = 1


class RejectionStage(GeneratingStage):
    name = "rejection"
    recipe_class = RejectionRecipe
    inputs = {"problems": "prompt"}
    outputs = ("demonstrations", "preferences", "scores")

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        model = self.recipe.generation.model
        outcomes: list[Outcome] = []
        for row, completions in zip(rows, self.sample(rows, ctx)):
            reference = row["meta"].get("answer")
            if reference is None or not str(reference).strip():
                outcomes.append(Quarantined("meta.answer: a reference answer is required", row))
                continue
            judged = judge_paths(str(reference), [c.text for c in completions])
            outcomes.append(rejection_rows(row, judged, self.recipe.pairs_per_problem, model, ctx.seed))
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        scores = outputs["scores"]
        return {"pass_rates": {"problems": len(scores),
                               "mean_pass@1": mean(s["pass@1"] for s in scores) if scores else 0.0,
                               "pass@k": mean(s["pass@k"] for s in scores) if scores else 0.0,
                               "k": self.recipe.generation.n}}
