"""`generate`: sample `generation.n` completions for every prompt with any backend.

The building block of the synthesis stages (several responses per instruction, rejection
sampling), and on its own a way to run a teacher model over a prompt set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignment.data import Quarantined
from alignment.generation import Completion, GenerationSpec, Prompt, make_generator
from alignment.stages import DataStage, Outcome, ShardContext, StageRecipe


def lineage(stage: str, model: str, seed: int, parent_id: str, **extra: Any) -> dict[str, Any]:
    """Where a synthesised row came from, kept in its `meta` as `lineage`."""
    return {"lineage": {"stage": stage, "model": model, "seed": seed, "parent_id": parent_id, **extra}}


class GeneratingStage(DataStage):
    """A stage that samples from `recipe.generation`: the generator is loaded once, only when some
    shard still has work, and closed at the end; `sample` counts the tokens for the progress bar."""

    def setup(self) -> None:
        self.generator = make_generator(self.recipe.generation)

    def sample(self, rows: list[dict], ctx: ShardContext) -> list[list[Completion]]:
        """`generation.n` completions for each row's messages, seeded by the shard."""
        return self.sample_prompts([r["messages"] for r in rows], ctx)

    def sample_prompts(self, prompts: list[Prompt], ctx: ShardContext, **overrides: Any) -> list[list[Completion]]:
        """Completions for prompts the stage built, seeded by the shard; `overrides` change the sampling (n=1)."""
        sampling = self.recipe.generation.sampling(seed=ctx.seed, **overrides)
        results = self.generator.generate(prompts, sampling)
        ctx.add_tokens(sum(c.num_tokens for cs in results for c in cs))
        return results

    def teardown(self) -> None:
        if hasattr(self, "generator"):
            self.generator.close()


@dataclass
class GenerateRecipe(StageRecipe):
    """inputs.prompts -> completions: `generation.n` samples per prompt."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)


class GenerateStage(GeneratingStage):
    name = "generate"
    recipe_class = GenerateRecipe
    inputs = {"prompts": "prompt"}
    outputs = ("completions",)

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for row, completions in zip(rows, self.sample(rows, ctx)):
            if not any(c.text.strip() for c in completions):
                outcomes.append(Quarantined("every completion is empty", row))
                continue
            outcomes.append({"completions": [{
                "id": row["id"],
                "messages": row["messages"],
                "completions": [c.text for c in completions],
                "finish_reasons": [c.finish_reason for c in completions],
                "model": self.recipe.generation.model,
                "source": row["source"],
                "meta": row["meta"],
            }]})
        return outcomes
