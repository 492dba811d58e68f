"""`constitution`: constitutional feedback, the report's recipe for safety and values.

A constitution is a YAML file of principles (`recipes/constitution/default.yaml` ships ours:
harm avoidance, honesty, privacy, refusing harmful instructions, no invented facts), each with an
`id`, a `follow` instruction and a `violate` instruction. For every prompt row,
`principles_per_prompt` principles are drawn (without repeats, from the recipe's seed and the
row's id, so a resumed or re-sharded run draws the same ones). For each, the teacher answers the
prompt twice: under a system prompt asking it to follow the principle, and under one asking it to
break it. The follower's reply, after the original prompt with no added system prompt, is a
demonstration (D); follower vs violator is a preference pair (P). Both record the principle in
`meta.lineage` (stage, model, seed, parent id, principle). A pair whose replies are empty or equal
is dropped; a prompt left with no pair is quarantined.
"""

from __future__ import annotations

import difflib
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignment.data import Quarantined
from alignment.recipes import RecipeError
from alignment.stages import Outcome, ShardContext

from .generate import GeneratingStage, lineage
from .recipes import ConstitutionRecipe

DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[1] / "recipes" / "constitution" / "default.yaml"
FOLLOW_SYSTEM = "Answer the user's message helpfully, and keep to this principle in your reply: {follow}"
VIOLATE_SYSTEM = ("You are writing a deliberately flawed reply, used as a negative example for training. "
                  "Answer the user's message, and in your reply do this: {violate}")
_ID = re.compile(r"[a-z0-9][a-z0-9_-]*")
_FILE_KEYS = ("name", "description", "principles")
_PRINCIPLE_KEYS = ("id", "description", "follow", "violate")


class ConstitutionError(RecipeError):
    """A constitution file is missing or malformed; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class Principle:
    id: str
    follow: str
    violate: str
    description: str = ""


def _unknown(key: Any, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
    return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "") + f"; allowed: {', '.join(allowed)}"


def load_constitution(path: str | Path) -> list[Principle]:
    """The principles of a constitution file, checked: every error names the file and the field."""
    def fail(key: str, message: str) -> ConstitutionError:
        return ConstitutionError(f"{path}: {key}: {message}" if key else f"{path}: {message}")

    path = Path(path)
    if not path.is_file():
        raise fail("", "constitution file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise fail(f"line {mark.line + 1}" if mark else "", f"invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise fail("", "a constitution must be a mapping with a `principles` list")
    for key in data:
        if key not in _FILE_KEYS:
            raise fail(key, _unknown(key, _FILE_KEYS))
    items = data.get("principles")
    if not isinstance(items, list) or not items:
        raise fail("principles", "must be a non-empty list of {id, follow, violate} mappings")
    principles: list[Principle] = []
    for i, item in enumerate(items):
        where = f"principles[{i}]"
        if not isinstance(item, dict):
            raise fail(where, f"expected a mapping with id, follow and violate, got {item!r}")
        pid = item.get("id")
        if not isinstance(pid, str) or not _ID.fullmatch(pid):
            raise fail(f"{where}.id", f"must be lower-case letters, digits, - or _ (no-invented-facts), got {pid!r}")
        if any(p.id == pid for p in principles):
            raise fail(f"{where}.id", f"{pid!r} is used twice")
        where = f"principles[{i}] ({pid})"
        for key in item:
            if key not in _PRINCIPLE_KEYS:
                raise fail(f"{where}.{key}", _unknown(key, _PRINCIPLE_KEYS))
        for key in ("follow", "violate", "description"):
            value = item.get(key, "" if key == "description" else None)
            if not isinstance(value, str) or (key != "description" and not value.strip()):
                raise fail(f"{where}.{key}", f"must be a non-empty string, got {value!r}")
        principles.append(Principle(pid, item["follow"].strip(), item["violate"].strip(), item.get("description", "")))
    return principles


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


class ConstitutionStage(GeneratingStage):
    name = "constitution"
    recipe_class = ConstitutionRecipe
    inputs = {"prompts": "prompt"}
    outputs = ("demonstrations", "preferences")

    def input_files(self) -> dict[str, str]:
        return {"constitution": self.recipe.constitution_path}

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        recipe = self.recipe
        picks = [pick_principles(recipe.chosen, recipe.principles_per_prompt, recipe.seed, row["id"]) for row in rows]
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
