"""`responses`: several responses per instruction, from the models and sampling strategies a recipe lists.

Each entry of `generators:` is a generation section with a `strategy` name (`greedy`, `sampled`, ...); every
response keeps the model and strategy that wrote it, so `annotate` can rank them and compare models. Only one
generator is in memory at a time: for each shard the generators run one after another, each over the whole
shard, and the one loaded last stays loaded for the next shard, which runs them in the reverse order. A run
of S shards and G generators loads models S x (G - 1) + 1 times (the runtime hands the stage one shard at a
time, so once per run is not possible); with big models, use big shards. Every generator samples with the
shard's seed, so a resumed run writes the same bytes. Empty responses are dropped; an instruction left with
none is quarantined.
"""

from __future__ import annotations

from typing import Any

from alignment.data import Quarantined
from alignment.generation import Generator, make_generator
from alignment.stages import Outcome, ShardContext, Stage

from .generate import lineage
from .recipes import ResponsesRecipe


class ResponsesStage(Stage):
    name = "responses"
    recipe_class = ResponsesRecipe
    inputs = {"instructions": "prompt"}
    outputs = ("responses",)

    loaded: tuple[int, Generator] | None = None

    def generator(self, index: int) -> Generator:
        """Generator `index`, loading it (and closing the one loaded before) unless it is the one in memory."""
        if self.loaded and self.loaded[0] == index:
            return self.loaded[1]
        self.teardown()
        self.loaded = (index, make_generator(self.recipe.generators[index]))
        return self.loaded[1]

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        generators = self.recipe.generators
        order = range(len(generators)) if ctx.index % 2 == 0 else reversed(range(len(generators)))
        prompts = [row["messages"] for row in rows]
        by_generator: dict[int, list[list[str]]] = {}
        for j in order:
            results = self.generator(j).generate(prompts, generators[j].sampling(seed=ctx.seed))
            ctx.progress.add_tokens(sum(c.num_tokens for cs in results for c in cs))
            by_generator[j] = [[c.text for c in cs] for cs in results]
        models = ", ".join(dict.fromkeys(g.model for g in generators))
        strategies = [g.strategy for g in generators]
        outcomes: list[Outcome] = []
        for i, row in enumerate(rows):
            responses = [{"content": text, "model": g.model, "strategy": g.strategy}
                         for j, g in enumerate(generators) for text in by_generator[j][i] if text.strip()]
            if not responses:
                outcomes.append(Quarantined(f"every response is empty ({', '.join(strategies)})", row))
                continue
            outcomes.append({"responses": [{
                "id": row["id"], "prompt": row["messages"], "responses": responses, "source": row["source"],
                "meta": row["meta"] | lineage("responses", models, ctx.seed, row["id"], strategies=strategies),
            }]})
        return outcomes

    def teardown(self) -> None:
        if self.loaded:
            self.loaded[1].close()
            self.loaded = None

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        counts: dict[str, int] = {f"{g.model} / {g.strategy}": 0 for g in self.recipe.generators}
        for row in outputs["responses"]:
            for r in row["responses"]:
                counts[f"{r['model']} / {r['strategy']}"] += 1
        return {"responses": {"generators": len(self.recipe.generators), "responses_by_generator": counts}}
