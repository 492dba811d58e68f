"""`evolve`: instruction evolution, Evol-Instruct (WizardLM) and Tree-Instruct, with WizardLM's elimination filters.

Method `evol`: each round, every surviving instruction (the last user turn of a prompt row) is rewritten by one
operation drawn from `operations` by a RNG seeded from (seed, root row id, round), so a resumed or re-sharded run
draws the same ones. In depth: `add_constraint`, `deepen`, `concretize`, `multi_step`, `complicate_input`; in
breadth: `breadth` (a new, rarer instruction in the same domain). A rewrite may add at most `max_added_words` words
to its parent. Method `tree` (Tree-Instruct): the teacher reads the instruction as a semantic tree, adds
`tree_new_nodes` nodes and writes the instruction the enlarged tree describes: same language, longer than the
parent, at most `tree_max_words` words. The prompts are ours (`IN_DEPTH`, `BREADTH`, `TREE`).

An evolved instruction is eliminated, with the first reason that holds (words: `decontam.tokenize`, lower-cased
runs of letters and digits, CJK characters one by one):

- `empty`: it has no words;
- `leak`: it holds the rewriting prompt's wording (`LEAKS`: "given prompt", "rewritten prompt", "#Created Prompt#",
  "semantic tree", ..., compared case- and punctuation-blind);
- `too_long`: more words than the parent's + `max_added_words` (tree: more than `tree_max_words`);
- `no_gain`: its normalised text (NFKC, lower-cased, white space collapsed) equals the parent's, or it has no word
  the parent lacks; under tree also when it is not longer, in words, than the parent;
- then the teacher answers it once (same generator) and it is eliminated when that response is `apology` (fewer
  than 80 words and an apology or refusal phrase, `APOLOGY`) or `stop_words_only` (no word beyond `STOP_WORDS`:
  empty, punctuation, "the of and").

Survivors go to `evolved.jsonl` (every round's, the id `ROOT-rN`) with `meta.lineage` (stage, model, shard seed,
parent id, operation, round, root id) and feed the next round; the eliminated to `eliminated.jsonl` with the reason,
the parent's and the evolved text and the response (not to quarantine, which is for malformed input). A root row
ends either evolved through every round or eliminated once, so rows in = rows evolved in the last round +
eliminated + quarantined. The manifest counts produced and eliminated by reason per round and operation.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from alignment.data import Quarantined
from alignment.generation import GenerationSpec
from alignment.recipe_loader import check_choices
from alignment.stages import Outcome, ShardContext, StageRecipe

from .generate import GeneratingStage, lineage
from .text import STOP_WORDS, tokenize

_DEPTH = """You rewrite instructions for an AI assistant to make them harder to answer, while they stay natural \
for a person to ask and possible to answer. Rewrite the instruction under #Given Prompt# by this method: {method}
Keep everything it supplies (code, tables, input data). Add at most {limit} words: stay concise. Reply with the \
rewritten instruction only, with no heading; the words "given prompt" and "rewritten prompt" must not appear in it.

#Given Prompt#:
{instruction}

#Rewritten Prompt#:
"""
IN_DEPTH = {
    "add_constraint": "add one more constraint or requirement that the answer has to meet.",
    "deepen": "where it asks about a subject, ask about it in more depth and breadth.",
    "concretize": "replace a general concept in it with a more specific one.",
    "multi_step": "where a few simple steps would solve it, ask explicitly for reasoning over several steps.",
    "complicate_input": "give it a more complex input to work on (data, a table, code or a formula, in the form "
                        "the task calls for).",
}
BREADTH = """You write new instructions for an AI assistant. Taking the instruction under #Given Prompt# as \
inspiration, write a brand-new one in the same domain on a rarer subject, about as long and as hard, natural for a \
person to ask. Use at most {limit} words more than it. Reply with the new instruction only, with no heading; the \
words "given prompt" and "created prompt" must not appear in it.

#Given Prompt#:
{instruction}

#Created Prompt#:
"""
TREE = """You enlarge instructions for an AI assistant. Read the instruction under #Given Prompt# as a semantic \
tree: the task it asks for is the root, and what the task is about, its conditions and its details are the nodes \
below. Add {nodes} new nodes to that tree (details, conditions or sub-tasks that fit it), then write the \
instruction the enlarged tree describes: in the same language as the instruction, longer than it, and at most \
{limit} words. Reply with the new instruction only, with no heading and without the tree.

#Given Prompt#:
{instruction}

#Rewritten Prompt#:
"""
OPERATIONS = (*IN_DEPTH, "breadth")
LEAKS = ("given prompt", "rewritten prompt", "created prompt", "given instruction", "rewritten instruction",
         "semantic tree", "new nodes")
APOLOGY = re.compile(r"\b(sorry|apologi[sz]e|i cannot|i can't|i can not|i am unable|i'm unable|i am not able|"
                     r"as an ai)\b")
APOLOGY_MAX_WORDS = 80
REASONS = ("empty", "leak", "too_long", "no_gain", "apology", "stop_words_only")


def pick_operation(recipe: EvolveRecipe, root_id: str, round_: int) -> str:
    """The operation for one row and round: `tree` under method tree, else drawn from (seed, row id, round)."""
    if recipe.method == "tree":
        return "tree"
    return random.Random(f"{recipe.seed}:{root_id}:{round_}").choice(recipe.operations)


def rewrite_prompt(operation: str, instruction: str, recipe: EvolveRecipe) -> str:
    """The teacher's prompt for one rewrite."""
    if operation == "tree":
        return TREE.format(nodes=recipe.tree_new_nodes, limit=recipe.tree_max_words, instruction=instruction)
    if operation == "breadth":
        return BREADTH.format(limit=recipe.max_added_words, instruction=instruction)
    return depth_prompt(operation, instruction, recipe.max_added_words)


def depth_prompt(operation: str, instruction: str, max_added_words: int) -> str:
    """The teacher's prompt for one in-depth rewrite (an `IN_DEPTH` operation)."""
    return _DEPTH.format(method=IN_DEPTH[operation], limit=max_added_words, instruction=instruction)


def _normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _plain(text: str) -> str:
    """Case- and punctuation-blind text: lower-cased words joined by single spaces."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).split())


def instruction_problem(parent: str, evolved: str, operation: str, recipe: EvolveRecipe) -> str | None:
    """Why an evolved instruction is eliminated before its response is sampled, or None."""
    new, old = tokenize(evolved), tokenize(parent)
    if not new:
        return "empty"
    plain = _plain(evolved)
    if any(f" {leak} " in f" {plain} " for leak in LEAKS):
        return "leak"
    if len(new) > (recipe.tree_max_words if operation == "tree" else len(old) + recipe.max_added_words):
        return "too_long"
    if _normalised(evolved) == _normalised(parent) or set(new) <= set(old):
        return "no_gain"
    if operation == "tree" and len(new) <= len(old):
        return "no_gain"
    return None


def response_problem(response: str) -> str | None:
    """Why the response to an evolved instruction eliminates it, or None."""
    found = tokenize(response)
    if all(w in STOP_WORDS for w in found):  # no words at all included
        return "stop_words_only"
    if len(found) < APOLOGY_MAX_WORDS and APOLOGY.search(response.lower().replace("\u2019", "'")):
        return "apology"
    return None


@dataclass
class Chain:
    """One root row's chain: its latest instruction and where it stands."""

    index: int  # position in the shard
    root: dict
    parent_id: str
    text: str


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
        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one rewrite per row and round, one response to check it), "
                             f"got {self.generation.n}")
        for name in ("rounds", "max_added_words", "tree_new_nodes", "tree_max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_choices("operations", self.operations, OPERATIONS, "operation")


class EvolveStage(GeneratingStage):
    name = "evolve"
    recipe_class = EvolveRecipe
    inputs = {"instructions": "prompt"}
    outputs = ("evolved", "eliminated")

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        recipe, model = self.recipe, self.recipe.generation.model
        outcomes: list[Outcome] = [{"evolved": [], "eliminated": []} for _ in rows]
        alive: list[Chain] = []
        for i, row in enumerate(rows):
            text = row["messages"][-1]["content"]
            if tokenize(text):
                alive.append(Chain(i, row, row["id"], text))
            else:
                outcomes[i] = Quarantined("messages: the last user turn has no words to evolve", row)
        for round_ in range(1, recipe.rounds + 1):
            if not alive:
                break
            ops = [pick_operation(recipe, chain.root["id"], round_) for chain in alive]
            prompts = [[{"role": "user", "content": rewrite_prompt(op, c.text, recipe)}] for op, c in zip(ops, alive)]
            rewrites = [cs[0].text.strip() for cs in self.sample_prompts(prompts, ctx, n=1)]
            candidates = []
            for chain, op, evolved in zip(alive, ops, rewrites):
                problem = instruction_problem(chain.text, evolved, op, recipe)
                if problem:
                    outcomes[chain.index]["eliminated"].append(_eliminated(chain, op, round_, evolved, problem, None))
                else:
                    candidates.append((chain, op, evolved, chain.root["messages"][:-1] + [
                        {"role": "user", "content": evolved}]))
            responses = self.sample_prompts([c[3] for c in candidates], ctx, n=1) if candidates else []
            alive = []
            for (chain, op, evolved, messages), response in zip(candidates, responses):
                reply = response[0].text
                problem = response_problem(reply)
                if problem:
                    outcomes[chain.index]["eliminated"].append(_eliminated(chain, op, round_, evolved, problem, reply))
                    continue
                row_id = f"{chain.root['id']}-r{round_}"
                meta = chain.root["meta"] | lineage("evolve", model, ctx.seed, chain.parent_id, operation=op,
                                                    round=round_, root_id=chain.root["id"])
                outcomes[chain.index]["evolved"].append({"id": row_id, "messages": messages, "source": "evolve",
                                                         "meta": meta})
                alive.append(Chain(chain.index, chain.root, row_id, evolved))
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        """Per round and operation: produced and eliminated by reason; and how the root rows ended."""
        table: dict[str, dict[str, dict]] = defaultdict(dict)

        def cell(round_: int, op: str) -> dict:
            return table[str(round_)].setdefault(op, {"produced": 0, "eliminated": Counter()})

        for row in outputs["evolved"]:
            cell(row["meta"]["lineage"]["round"], row["meta"]["lineage"]["operation"])["produced"] += 1
        for record in outputs["eliminated"]:
            cell(record["round"], record["operation"])["eliminated"][record["reason"]] += 1
        rounds = {r: {op: {"produced": c["produced"], "eliminated": dict(sorted(c["eliminated"].items()))}
                      for op, c in sorted(ops.items())} for r, ops in sorted(table.items(), key=lambda x: int(x[0]))}
        return {"evolve": {
            "method": self.recipe.method, "rounds": self.recipe.rounds,
            "roots_evolved_every_round": sum(r["meta"]["lineage"]["round"] == self.recipe.rounds
                                             for r in outputs["evolved"]),
            "roots_eliminated": len(outputs["eliminated"]),
            "eliminated_by_reason": {reason: sum(r["reason"] == reason for r in outputs["eliminated"])
                                     for reason in REASONS},
            "by_round": rounds}}


def _eliminated(chain: Chain, operation: str, round_: int, evolved: str, reason: str, response: str | None) -> dict:
    return {"id": f"{chain.root['id']}-r{round_}", "parent_id": chain.parent_id, "root_id": chain.root["id"],
            "operation": operation, "round": round_, "reason": reason, "parent": chain.text, "instruction": evolved,
            "response": response}
