"""`generate`: sample `generation.n` completions for every prompt with any backend.

The building block of the synthesis stages (several responses per instruction, rejection
sampling), and on its own a way to run a teacher model over a prompt set.
"""

from __future__ import annotations

from alignment.data import Quarantined
from alignment.generation import make_generator
from alignment.stages import Outcome, ShardContext, Stage

from .recipes import GenerateRecipe


class GenerateStage(Stage):
    name = "generate"
    recipe_class = GenerateRecipe
    inputs = {"prompts": "prompt"}
    outputs = ("completions",)

    def setup(self, side_inputs: dict[str, list[dict]]) -> None:
        self.generator = make_generator(self.recipe.generation)

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        spec = self.recipe.generation
        results = self.generator.generate([r["messages"] for r in rows], spec.sampling(seed=ctx.seed))
        ctx.progress.add_tokens(sum(c.num_tokens for cs in results for c in cs))
        outcomes: list[Outcome] = []
        for row, completions in zip(rows, results):
            if not any(c.text.strip() for c in completions):
                outcomes.append(Quarantined("every completion is empty", row))
                continue
            outcomes.append({"completions": [{
                "id": row["id"],
                "messages": row["messages"],
                "completions": [c.text for c in completions],
                "finish_reasons": [c.finish_reason for c in completions],
                "model": spec.model,
                "source": row["source"],
                "meta": row["meta"],
            }]})
        return outcomes

    def teardown(self) -> None:
        if hasattr(self, "generator"):
            self.generator.close()
