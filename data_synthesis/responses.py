"""`responses`: several responses per instruction, from the models and sampling strategies a recipe lists.

Each entry of `generators:` is a generation section with a `strategy` name (`greedy`, `sampled`, ...); every
response keeps the model and strategy that wrote it, so `annotate` can rank them and compare models. Only one
generator is in memory at a time: in-process, for each shard the generators run one after another, each over
the whole shard, the one still loaded from the last shard first, so S shards and G generators load models
S x (G - 1) + 1 times (with big models, use big shards). On Ray each generator is an engine of its own: every
worker holds one generator for the whole run and samples its part of each shard, and the driver puts the parts
together, so each model loads once per worker. Every generator samples with the shard's seed whatever the order
or the process, so a resumed run, or one on Ray, writes the same bytes. Empty responses are dropped; an
instruction left with none is quarantined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from alignment.data import Quarantined
from alignment.generation import GenerationSpec, Generator, make_generator
from alignment.stages import DataStage, Outcome, ShardContext, StageRecipe

from .generate import lineage

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


class ResponsesStage(DataStage):
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

    def engines(self) -> int:
        return len(self.recipe.generators)

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        loaded_first = sorted(range(self.engines()), key=lambda j: not (self.loaded and self.loaded[0] == j))
        parts = {j: self.process_part(j, rows, ctx) for j in loaded_first}
        return self.combine(rows, [parts[j] for j in range(self.engines())], ctx)

    def process_part(self, engine: int, rows: list[dict], ctx: ShardContext) -> list[list[str]]:
        """Generator `engine`'s responses to the shard's instructions, sampled with the shard's seed."""
        spec = self.recipe.generators[engine]
        results = self.generator(engine).generate([row["messages"] for row in rows], spec.sampling(seed=ctx.seed))
        ctx.add_tokens(sum(c.num_tokens for cs in results for c in cs))
        return [[c.text for c in cs] for cs in results]

    def combine(self, rows: list[dict], parts: list[list[list[str]]], ctx: ShardContext) -> list[Outcome]:
        generators = self.recipe.generators
        models = ", ".join(dict.fromkeys(g.model for g in generators))
        strategies = [g.strategy for g in generators]
        outcomes: list[Outcome] = []
        for i, row in enumerate(rows):
            responses = [{"content": text, "model": g.model, "strategy": g.strategy}
                         for j, g in enumerate(generators) for text in parts[j][i] if text.strip()]
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
