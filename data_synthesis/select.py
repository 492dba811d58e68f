"""`select`: complexity-first diverse sampling of tagged instructions (InsTag, Lu et al. 2023).

Input rows are prompt rows tagged by `instag`: `meta.tags_normalised` (or `meta.tags` where that is absent) is a
list of tag strings, compared stripped and lower-cased, each counted once per row. A row without either list, or
with one that is not a list of strings, is malformed and quarantined; a row with fewer than `min_tags` tags is
dropped (to `unselected.jsonl`, reason `below_min_tags`) and counted in the manifest.

Selection: the eligible rows are sorted by number of tags, descending (ties keep input order); a sweep walks them
and takes a row whenever it has at least one tag not yet seen in this sweep. Sweeps repeat over the rows not yet
taken, the seen set empty again each time, until `num_instructions` are taken or none are left (`min_tags` >= 1,
so every sweep takes at least its first row and the loop ends). Chosen rows go to `selected.jsonl` (in input
order, `meta.select.rank` is the order taken), the others to `unselected.jsonl` (reason `not_selected`).

Scores (per row in `meta.select`, means for chosen vs pool in the manifest; the pool is the eligible rows):

- tag diversity (set level): the share of the pool's distinct tags the chosen rows cover;
- complexity: the row's number of distinct tags;
- semantic richness: distinct content words / all words of the instruction (words: lower-cased runs of letters,
  digits and apostrophes; content words: not in `STOP_WORDS`); 0 for no words. Like any type-token ratio it falls
  as texts grow, so compare it between sets of similar length;
- intent completeness: the share of checks the instruction passes: it states a task (a sentence starts with a
  task verb, after an optional "please", or it asks a question: a "?" or a leading wh- / auxiliary word), plus,
  per tag family present, the part that task needs (`REQUIRED_PARTS`: translation names a language, code names a
  programming language, a summary has material to summarise, maths has a number). It reads surface words only:
  it misses tasks phrased otherwise ("I need a poem"), parts given in earlier turns, non-English text, and it
  cannot tell whether a named part is adequate.

The whole pool decides every row's fate, while the runtime hands a stage one shard at a time (and a resumed run
only the unfinished shards). So `setup` reads the whole input, as the runtime did, and decides every row; shard i
then finds its rows by position, [i x shard_size, (i + 1) x shard_size). The outcome of a row, its lineage seed
(the recipe's, not the shard's) included, does not depend on the shard size or on where a run was killed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignment.data import Quarantined
from alignment.stages import DataStage, Outcome, ShardContext, StageError, StageRecipe

from .generate import lineage
from .text import STOP_WORDS

PRIMARY = "tagged"
# English function words, and the pieces of contractions split at the apostrophe
TASK_VERBS = frozenset("""
analyse analyze answer calculate choose classify compare compose compute convert correct count create debug
define describe design draft edit estimate evaluate explain extract find fix generate give identify implement
list make name outline paraphrase plan predict prove provide recommend rewrite show solve sort suggest summarise
summarize tell translate write
""".split())
QUESTION_WORDS = frozenset("what why how who when where which can could would should is are do does did will".split())
LANGUAGES = frozenset("""
arabic chinese dutch english french german greek hindi italian japanese korean polish portuguese russian spanish
swedish turkish
""".split())
PROGRAMMING = frozenset("bash c c# c++ go haskell java javascript kotlin php python ruby rust scala sql swift "
                        "typescript".split())
_WORD = re.compile(r"[a-z0-9][a-z0-9'+#]*")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits (apostrophes, + and # kept inside, for don't and c++)."""
    return _WORD.findall(text.lower())


def _has_material(text: str) -> bool:
    """A summary needs something to summarise: quoted or colon-introduced text, or a long instruction."""
    return bool(re.search(r":\s*\S|\"[^\"]{20,}\"", text)) or len(words(text)) >= 40


REQUIRED_PARTS: dict[tuple[str, ...], Callable[[str], bool]] = {
    ("translat",): lambda text: bool(LANGUAGES & set(words(text))),
    ("cod", "program"): lambda text: bool(PROGRAMMING & set(words(text))),
    ("summar",): _has_material,
    ("math", "arithmetic", "calculat"): lambda text: bool(re.search(r"\d", text)),
}  # a tag family (a tag containing one of the keys) -> the check its instruction must pass, once per family


def semantic_richness(text: str) -> float:
    """Distinct content words / all words (0 for no words)."""
    found = words(text)
    return len({w for w in found if w not in STOP_WORDS}) / len(found) if found else 0.0


def states_task(text: str) -> bool:
    """A sentence starts with a task verb (after an optional "please"), or the text asks a question."""
    if "?" in text:
        return True
    for sentence in re.split(r"[.!\n;]+", text):
        first = [w for w in words(sentence) if w != "please"][:1]
        if first and (first[0] in TASK_VERBS or first[0] in QUESTION_WORDS):
            return True
    return False


def intent_completeness(text: str, tags: list[str]) -> float:
    """The share of checks passed: a stated task, plus the part each tag family present requires."""
    checks = [states_task(text)]
    checks += [check(text) for keys, check in REQUIRED_PARTS.items() if any(k in tag for k in keys for tag in tags)]
    return round(sum(checks) / len(checks), 4)


def row_tags(row: dict) -> list[str] | str:
    """The row's distinct tags (stripped, lower-cased, first-seen order), or what is wrong with them."""
    meta = row["meta"]
    key = "tags_normalised" if "tags_normalised" in meta else "tags"
    tags = meta.get(key)
    if key not in meta:
        return "meta.tags: missing (neither meta.tags_normalised nor meta.tags is set)"
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return f"meta.{key}: must be a list of tag strings, got {tags!r}"
    return list(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))


def instruction(row: dict) -> str:
    """The text selection scores: the last user turn."""
    return row["messages"][-1]["content"]


def complexity_first_diverse(tag_sets: list[list[str]], num: int) -> list[tuple[int, int, int]]:
    """InsTag's sampling over rows given as tag lists: (index, sweep, new tags) of each row taken, in order taken.
    Every list must be non-empty, or a sweep could take nothing."""
    order = sorted(range(len(tag_sets)), key=lambda i: -len(tag_sets[i]))  # stable: ties keep input order
    taken: list[tuple[int, int, int]] = []
    sweep = 0
    while order and len(taken) < num:
        sweep += 1
        seen: set[str] = set()
        left: list[int] = []
        for i in order:
            new = set(tag_sets[i]) - seen
            if new and len(taken) < num:
                taken.append((i, sweep, len(new)))
                seen |= new
            else:
                left.append(i)
        order = left
    return taken


@dataclass(frozen=True)
class RowPlan:
    """The fate of the row at one position of the input, decided in `setup` from the whole pool."""

    row_id: str
    problem: str | None = None
    tags: tuple[str, ...] = ()
    scores: dict[str, Any] | None = None  # complexity, richness, intent completeness
    chosen: dict[str, int] | None = None  # rank, sweep, new_tags


@dataclass
class SelectRecipe(StageRecipe):
    """inputs.tagged -> the selected instructions (complexity-first diverse sampling)."""

    num_instructions: int = 1000  # rows to take (fewer when the pool runs out)
    min_tags: int = 1  # rows with fewer tags are dropped before sampling; >= 1, so every sweep takes a row

    def __post_init__(self) -> None:
        for name in ("num_instructions", "min_tags"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


class SelectStage(DataStage):
    name = "select"
    recipe_class = SelectRecipe
    inputs = {PRIMARY: "prompt"}
    outputs = ("selected", "unselected")

    def prepare(self, rows: list[dict], side_inputs: dict[str, list[dict]]) -> None:
        recipe = self.recipe
        found = [row_tags(row) for row in rows]
        eligible = [i for i, tags in enumerate(found) if isinstance(tags, list) and len(tags) >= recipe.min_tags]
        picks = complexity_first_diverse([found[i] for i in eligible], recipe.num_instructions)
        chosen = {eligible[j]: {"rank": rank, "sweep": sweep, "new_tags": new}
                  for rank, (j, sweep, new) in enumerate(picks)}
        self.plan: list[RowPlan] = []
        for i, (row, tags) in enumerate(zip(rows, found)):
            if isinstance(tags, str):
                self.plan.append(RowPlan(row["id"], problem=tags))
                continue
            text = instruction(row)
            scores = {"complexity": len(tags), "richness": round(semantic_richness(text), 4),
                      "intent_completeness": intent_completeness(text, tags)}
            self.plan.append(RowPlan(row["id"], tags=tuple(tags), scores=scores, chosen=chosen.get(i)))

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        start = ctx.index * self.recipe.shard_size
        plans = self.plan[start : start + len(rows)]
        if [p.row_id for p in plans] != [row["id"] for row in rows]:
            raise StageError(f"select: shard {ctx.index} does not line up with the input read in setup")
        outcomes: list[Outcome] = []
        for row, plan in zip(rows, plans):
            if plan.problem:
                outcomes.append(Quarantined(plan.problem, row))
            elif plan.chosen:
                meta = row["meta"] | {"select": plan.chosen | plan.scores}
                outcomes.append({"selected": [row | {"meta": meta | lineage("select", "", self.recipe.seed,
                                                                            row["id"])}]})
            else:
                reason = "below_min_tags" if len(plan.tags) < self.recipe.min_tags else "not_selected"
                outcomes.append({"unselected": [{"id": row["id"], "reason": reason, "tags": list(plan.tags),
                                                 **plan.scores}]})
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        """Rows in, dropped, chosen, sweeps; tag coverage; mean scores of the chosen rows vs the pool."""
        chosen = [r["meta"]["select"] | {"tags": row_tags(r)} for r in outputs["selected"]]
        pool = chosen + [r for r in outputs["unselected"] if r["reason"] != "below_min_tags"]
        pool_tags = {t for r in pool for t in r["tags"]}
        covered = {t for r in chosen for t in r["tags"]}

        def means(rows: list[dict]) -> dict[str, float]:
            keys = ("complexity", "richness", "intent_completeness")
            return {k: round(sum(r[k] for r in rows) / len(rows), 4) if rows else 0.0 for k in keys}

        return {"select": {
            "rows_in": len(outputs["selected"]) + len(outputs["unselected"]),
            "below_min_tags": sum(r["reason"] == "below_min_tags" for r in outputs["unselected"]),
            "pool": len(pool), "chosen": len(chosen), "num_instructions": self.recipe.num_instructions,
            "sweeps": max((r["sweep"] for r in chosen), default=0),
            "tags": {"pool": len(pool_tags), "covered": len(covered),
                     "coverage": round(len(covered) / len(pool_tags), 4) if pool_tags else 0.0},
            "chosen_means": means(chosen), "pool_means": means(pool)}}
