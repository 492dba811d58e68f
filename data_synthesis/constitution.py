"""`constitution`: constitutional feedback, the report's recipe for safety and values.

A constitution is a YAML file of principles (`recipes/constitution/default.yaml` ships ours:
harm avoidance, honesty, privacy, refusing harmful instructions, no invented facts), each with an
`id`, a `follow` instruction and a `violate` instruction. For every prompt row,
the principle it names in `meta.principle` is used (when the recipe chose it), else
`principles_per_prompt` principles are drawn (without repeats, from the recipe's seed and the
row's id, so a resumed or re-sharded run draws the same ones). For each, the teacher answers the
prompt twice: under a system prompt asking it to follow the principle, and under one asking it to
break it. The follower's reply, after the original prompt with no added system prompt, is a
demonstration (D); follower vs violator is a preference pair (P). Both record the principle in
`meta.lineage` (stage, model, seed, parent id, principle). A pair whose replies are empty or equal
is dropped; a prompt left with no pair is quarantined.

A principle may also list `follow_markers`: phrases one of which a reply that keeps it contains (a refusal, an
admission of doubt). `Principle.followed_by` is that rule, a coarse check (case-insensitive substring, curly
apostrophes read as straight ones) that `eval`'s `principles` task scores held-out replies with; it is no judge.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.data import Quarantined
from alignment.generation import GenerationSpec
from alignment.recipe_loader import load_file
from alignment.stages import Outcome, ShardContext, StageRecipe

from .generate import GeneratingStage, lineage

DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[1] / "recipes" / "constitution" / "default.yaml"
FOLLOW_SYSTEM = "Answer the user's message helpfully, and keep to this principle in your reply: {follow}"
VIOLATE_SYSTEM = ("You are writing a deliberately flawed reply, used as a negative example for training. "
                  "Answer the user's message, and in your reply do this: {violate}")
_ID = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class Principle:
    id: str
    follow: str
    violate: str
    description: str = ""
    # phrases one of which a reply that keeps the principle contains; empty = no rule scores it
    follow_markers: list[str] = field(default_factory=list, hash=False)

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.id):
            raise ValueError(f"id: must be lower-case letters, digits, - or _ (no-invented-facts), got {self.id!r}")
        for name in ("follow", "violate"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty string, got {getattr(self, name)!r}")
            object.__setattr__(self, name, getattr(self, name).strip())
        markers = self.follow_markers
        if not isinstance(markers, list) or not all(isinstance(m, str) and m.strip() for m in markers):
            raise ValueError(f"follow_markers: must be a list of non-empty strings (phrases such as \"I will not\"), "
                             f"got {markers!r}")
        object.__setattr__(self, "follow_markers", [m.strip() for m in markers])

    def followed_by(self, reply: str) -> bool:
        """Whether `reply` contains one of the follow markers (case-insensitive, curly apostrophes as straight)."""
        if not self.follow_markers:
            raise ValueError(f"principle {self.id!r} has no follow_markers: no rule says whether a reply keeps it")
        text = _fold(reply)
        return any(_fold(marker) in text for marker in self.follow_markers)


def _fold(text: str) -> str:
    return text.replace("\u2019", "'").casefold()


@dataclass
class Constitution:
    """A constitution file: principles to follow and to avoid, each with its `follow` and `violate` instruction."""

    principles: list[Principle] = field(default_factory=list)
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.principles:
            raise ValueError("principles: must be a non-empty list of {id, follow, violate} mappings")
        ids = [p.id for p in self.principles]
        for i, pid in enumerate(ids):
            if pid in ids[:i]:
                raise ValueError(f"principles[{i}].id: {pid!r} is used twice")


def load_constitution(path: str | Path) -> list[Principle]:
    """The principles of a constitution file, checked as recipes are: every error names the file and the field."""
    return load_file(Constitution, path, "constitution").principles


def pick_principles(principles: list[Principle], k: int, seed: int, row_id: str) -> list[Principle]:
    """k different principles for one prompt, the same for the same seed and row id wherever the row lands."""
    return random.Random(f"{seed}:{row_id}").sample(principles, k)


def with_system(messages: list[dict], instruction: str) -> list[dict]:
    """The prompt with `instruction` as its system message (before the prompt's own system message, if any)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{instruction}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def constitution_rows(prompt: dict, replies: list[tuple[Principle, str, str]], model: str, seed: int
                      ) -> dict[str, list[dict]]:
    """The D and P rows of one prompt from (principle, follower reply, violator reply); pairs with an empty
    reply, or the same reply twice, give nothing."""
    messages, source = prompt["messages"], "constitution"
    meta = lambda p: prompt["meta"] | lineage("constitution", model, seed, prompt["id"], principle=p.id)  # noqa: E731
    out: dict[str, list[dict]] = {"demonstrations": [], "preferences": []}
    for principle, follower, violator in replies:
        if not follower.strip() or not violator.strip() or follower.strip() == violator.strip():
            continue
        out["demonstrations"].append({"id": f"{prompt['id']}-{principle.id}-d",
                                      "messages": messages + [{"role": "assistant", "content": follower}],
                                      "source": source, "meta": meta(principle)})
        out["preferences"].append({"id": f"{prompt['id']}-{principle.id}-p", "prompt": messages,
                                   "chosen": [{"role": "assistant", "content": follower}],
                                   "rejected": [{"role": "assistant", "content": violator}],
                                   "source": source, "meta": meta(principle)})
    return out


@dataclass
class ConstitutionRecipe(StageRecipe):
    """inputs.prompts -> responses that follow (D, chosen) or violate (rejected) a constitution's principles.

    The constitution file is read and checked when the recipe is (data_synthesis.constitution)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    constitution: str = ""  # a YAML file of principles to follow and to avoid; "" = recipes/constitution/default.yaml
    principles: list[str] = field(default_factory=list)  # ids of the principles to draw from; empty = all
    principles_per_prompt: int = 1  # drawn per prompt, without repeats, from the seed and the prompt's id

    def __post_init__(self) -> None:
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


class ConstitutionStage(GeneratingStage):
    name = "constitution"
    recipe_class = ConstitutionRecipe
    inputs = {"prompts": "prompt"}
    outputs = ("demonstrations", "preferences")

    def input_files(self) -> dict[str, str]:
        return {"constitution": self.recipe.constitution_path}

    def principles_of(self, row: dict) -> list[Principle]:
        """The principle the row names in `meta.principle` (one the recipe chose), else `principles_per_prompt`
        drawn for it."""
        recipe, named = self.recipe, row["meta"].get("principle")
        chosen = {p.id: p for p in recipe.chosen}
        if named in chosen:
            return [chosen[named]]
        return pick_principles(recipe.chosen, recipe.principles_per_prompt, recipe.seed, row["id"])

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        recipe = self.recipe
        picks = [self.principles_of(row) for row in rows]
        prompts = [with_system(row["messages"], template.format(follow=p.follow, violate=p.violate))
                   for row, chosen in zip(rows, picks) for p in chosen for template in (FOLLOW_SYSTEM, VIOLATE_SYSTEM)]
        texts = iter(c[0].text for c in self.sample_prompts(prompts, ctx, n=1))
        outcomes: list[Outcome] = []
        for row, chosen in zip(rows, picks):
            replies = [(p, next(texts), next(texts)) for p in chosen]
            out = constitution_rows(row, replies, recipe.generation.model, ctx.seed)
            if out["preferences"]:
                outcomes.append(out)
            else:
                outcomes.append(Quarantined("no principle gave a non-empty follower and a different non-empty "
                                            f"violator reply ({', '.join(p.id for p in chosen)})", row))
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        by_principle = Counter(r["meta"]["lineage"]["principle"] for r in outputs["preferences"])
        return {"constitution": {"file": self.recipe.constitution_path,
                                 "principles": [p.id for p in self.recipe.chosen],
                                 "principles_per_prompt": self.recipe.principles_per_prompt,
                                 "pairs_by_principle": {p.id: by_principle[p.id] for p in self.recipe.chosen}}}
