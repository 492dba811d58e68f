"""`annotate`: rank the responses of each instruction, then export the top one to D and pairs to P.

The input is `responses`' output: `{id, prompt, responses: [{content, model, strategy}], source, meta}`.
Ranking and export are two steps joined by a ranking row, `{id, status, order, scores, judge, responses}`
(`order`: response indices best first; `scores`: per response index, or null where people rank; `responses`: the
model and strategy of each), written to `rankings.jsonl`. With `judge:` a model ranks:

- `kind: reward_model` scores every response after its prompt;
- `kind: model`, a chat model, reads the conversation and all the responses and answers with a score from 1 to 10
  for each (`JUDGE_PROMPT`, read leniently), by default twice with the responses in opposite orders and the
  scores averaged, so that a judge's liking for a position cancels out; an answer without the scores
  quarantines the item with the judge's text. `mode: pointwise` asks about one response at a time instead (the
  same prompt with one response): no position to favour and no count to keep, which a small judge gets wrong.

The order is by score, ties keeping the responses' order. People ranking in the web app (`annotate_app`) give
rows of the same shape, and `export` turns either into data: the top response to D when its score reaches
`judge.min_score` (always, without scores), and to P the top response against lower ones, the lowest first
(`pairs_per_item: 1` is best vs worst, the widest margin; 0 takes every lower one). A lower response with the
top's score (a tie) or the top's text makes no pair. Every D and P row records in `meta.lineage` the judge and
the model, strategy, index and score of its chosen (and rejected) response; the manifest has per model and
strategy the responses, their mean score and how often they ranked first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignment.data import Quarantined, row_problem
from alignment.generation import GenerationSpec, make_generator
from alignment.generation.answers import json_values
from alignment.reward_model import RewardModel
from alignment.stages import DataStage, Outcome, ShardContext, StageError, StageRecipe

from .generate import lineage


def item_problem(item: dict) -> str | None:
    """None if `item` is a `responses` row that can be ranked, else `field: reason`."""
    kept = {k: item[k] for k in ("id", "source", "meta") if k in item}
    problem = row_problem(kept | {"messages": item.get("prompt")}, "prompt")
    if problem:
        return problem.replace("messages", "prompt", 1)
    responses = item.get("responses")
    if not isinstance(responses, list) or not responses:
        return "responses: must be a non-empty list of {content, model, strategy}"
    for i, r in enumerate(responses):
        if not isinstance(r, dict):
            return f"responses[{i}]: must be a mapping with content, model and strategy"
        for key in ("content", "model", "strategy"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                return f"responses[{i}].{key}: must be a non-empty string"
    return None


JUDGE_PROMPT = (
    "Below is a conversation that ends with an instruction, then {count} {noun} to it. Score each response "
    "from 1 (useless or wrong) to 10 (correct, helpful and following every part of the instruction). Judge the "
    "content, not the length or the order the responses are shown in.\n\n# Conversation\n{conversation}\n\n"
    "# Responses\n{responses}\n\nAnswer only with JSON: {{\"scores\": [one number per response, in the order shown]}}"
)


def judge_prompt(prompt: list[dict], contents: list[str]) -> list[dict]:
    """The model judge's question about one item, its responses in the order given."""
    conversation = "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    shown = "\n\n".join(f"[Response {k}]\n{content}" for k, content in enumerate(contents, 1))
    noun = "response" if len(contents) == 1 else "responses"
    return [{"role": "user", "content": JUDGE_PROMPT.format(count=len(contents), noun=noun,
                                                            conversation=conversation, responses=shown)}]


def parse_scores(text: str, count: int) -> list[float] | None:
    """`count` finite numbers from a judge's answer (`{"scores": [...]}` or a bare list), read leniently."""
    for value in json_values(text):
        if isinstance(value, dict):
            value = value.get("scores")
        if isinstance(value, list) and len(value) == count and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            return [float(v) for v in value]
    return None


def judged_scores(answers: list[str], count: int) -> list[float] | str:
    """One item's scores from the judge's answers: the first about the responses as given, a second (if any)
    about them in reverse order, mapped back and averaged; or why they could not be read, with the answers."""
    read = [parse_scores(text, count) for text in answers]
    if any(scores is None for scores in read):
        return f"judge: no {count} scores in its answer: " + " | ".join(repr(text[:300]) for text in answers)
    in_order = [read[0], *(scores[::-1] for scores in read[1:])]
    return [sum(column) / len(in_order) for column in zip(*in_order)]


def rank(scores: list[float]) -> list[int]:
    """Response indices, highest score first; equal scores keep the responses' order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def export(item: dict, ranking: dict, min_score: float | None, pairs_per_item: int, seed: int
           ) -> dict[str, list[dict]]:
    """The D and P rows of one ranked item (see the module's docstring); a function of the ranking alone, so
    people's rankings export the same way as the judge's."""
    order, scores, responses = ranking["order"], ranking.get("scores"), item["responses"]
    top = order[0]

    def described(i: int) -> dict[str, Any]:
        return {"index": i, "model": responses[i]["model"], "strategy": responses[i]["strategy"],
                "score": scores[i] if scores else None}

    def meta(**extra: Any) -> dict[str, Any]:
        return item.get("meta", {}) | lineage("annotate", responses[top]["model"], seed, item["id"],
                                              judge=ranking["judge"], **extra)

    reply = lambda i: [{"role": "assistant", "content": responses[i]["content"]}]  # noqa: E731
    source = "annotate"
    out: dict[str, list[dict]] = {"demonstrations": [], "preferences": []}
    if min_score is None or not scores or scores[top] >= min_score:
        out["demonstrations"].append({"id": f"{item['id']}-d", "messages": item["prompt"] + reply(top),
                                      "source": source, "meta": meta(chosen=described(top))})
    lower = [i for i in reversed(order[1:]) if responses[i]["content"].strip() != responses[top]["content"].strip()
             and not (scores and scores[i] == scores[top])]
    for k, i in enumerate(lower[:pairs_per_item or None]):
        out["preferences"].append({"id": f"{item['id']}-p{k}", "prompt": item["prompt"], "chosen": reply(top),
                                   "rejected": reply(i), "source": source,
                                   "meta": meta(chosen=described(top), rejected=described(i))})
    return out


def model_summary(rankings: list[dict]) -> dict[str, dict[str, Any]]:
    """Per "model / strategy": responses ranked, their mean score (None without scores) and times ranked first."""
    scores: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    top: dict[str, int] = defaultdict(int)
    for ranking in rankings:
        names = [f"{r['model']} / {r['strategy']}" for r in ranking["responses"]]
        for i, name in enumerate(names):
            counts[name] += 1
            if ranking.get("scores"):
                scores[name].append(ranking["scores"][i])
        top[names[ranking["order"][0]]] += 1
    return {name: {"responses": counts[name], "top": top[name],
                   "mean_score": sum(scores[name]) / len(scores[name]) if scores[name] else None}
            for name in sorted(counts)}


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
    mode: Literal["listwise", "pointwise"] = "listwise"  # model: all responses in one prompt, or one per prompt
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
    session_hours: float = 12.0  # a sign-in lasts this long; then the token is asked for again
    request_timeout_s: float = 10.0  # a connection that sends nothing for this long is closed
    max_connections: int = 32  # connections served at once; one more is answered 503 and closed

    def __post_init__(self) -> None:
        if self.pairs_per_item < 0:
            raise ValueError(f"pairs_per_item: must be >= 0 (0 = every pair with the top), got {self.pairs_per_item}")
        if self.annotators_per_item < 1:
            raise ValueError(f"annotators_per_item: must be >= 1, got {self.annotators_per_item}")
        if self.session_hours <= 0:
            raise ValueError(f"session_hours: must be > 0, got {self.session_hours}")
        if self.request_timeout_s <= 0 or self.max_connections < 1:
            raise ValueError("request_timeout_s: must be > 0, and max_connections >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535 (0 = any free port), got {self.port}")


class AnnotateStage(DataStage):
    name = "annotate"
    recipe_class = AnnotateRecipe
    inputs = {"responses": "any"}
    outputs = ("rankings", "demonstrations", "preferences")

    def __init__(self, recipe: AnnotateRecipe):
        if recipe.judge is None:
            raise StageError("annotate: this stage ranks with a judge; people rank in the web app "
                             "(data_synthesis.annotate_app)")
        super().__init__(recipe)
        judge = recipe.judge
        self.judge_name = ({"kind": judge.kind, "path": judge.path} if judge.kind == "reward_model" else
                           {"kind": judge.kind, "model": judge.generation.model, "both_orders": judge.both_orders,
                            "mode": judge.mode})

    def setup(self) -> None:
        judge = self.recipe.judge
        if judge.kind == "model":
            self.generator = make_generator(judge.generation)
        else:
            self.scorer = RewardModel(judge.path, dtype=getattr(torch, judge.dtype), batch_size=judge.batch_size,
                                      device="cuda" if torch.cuda.is_available() else None)

    def reward_model_scores(self, rows: list[dict]) -> list[list[float]]:
        conversations = [row["prompt"] + [{"role": "assistant", "content": r["content"]}]
                         for row in rows for r in row["responses"]]
        scores = iter(self.scorer(conversations))
        return [[next(scores) for _ in row["responses"]] for row in rows]

    def model_scores(self, rows: list[dict], ctx: ShardContext) -> list[list[float] | str]:
        """Per row the judge's scores (listwise: averaged over both orders; pointwise: one answer per response),
        or why they could not be read, with the answers."""
        judge = self.recipe.judge
        contents = [[r["content"] for r in row["responses"]] for row in rows]
        if judge.mode == "pointwise":
            shown = [[[content] for content in row] for row in contents]
        else:
            shown = [[row[::-1] if reverse else row for reverse in ((False, True) if judge.both_orders else (False,))]
                     for row in contents]
        prompts = [judge_prompt(row["prompt"], view) for row, views in zip(rows, shown) for view in views]
        answers = self.generator.generate(prompts, judge.generation.sampling(seed=ctx.seed))
        ctx.add_tokens(sum(c.num_tokens for cs in answers for c in cs))
        texts = iter(cs[0].text for cs in answers)
        out: list[list[float] | str] = []
        for views in shown:
            answered = [next(texts) for _ in views]
            if judge.mode == "listwise":
                out.append(judged_scores(answered, len(views[0])))
                continue
            read = [judged_scores([text], 1) for text in answered]
            problems = [scores for scores in read if isinstance(scores, str)]
            out.append(problems[0] if problems else [scores[0] for scores in read])
        return out

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        problems = [item_problem(row) for row in rows]
        valid = [row for row, problem in zip(rows, problems) if not problem]
        scored = iter(self.model_scores(valid, ctx) if self.recipe.judge.kind == "model"
                      else self.reward_model_scores(valid))
        outcomes: list[Outcome] = []
        for row, problem in zip(rows, problems):
            item_scores = problem or next(scored)
            if isinstance(item_scores, str):
                outcomes.append(Quarantined(item_scores, row))
                continue
            ranking = {"id": row["id"], "status": "ranked", "order": rank(item_scores), "scores": item_scores,
                       "judge": self.judge_name,
                       "responses": [{"model": r["model"], "strategy": r["strategy"]} for r in row["responses"]]}
            rows_out = export(row, ranking, self.recipe.judge.min_score, self.recipe.pairs_per_item, ctx.seed)
            outcomes.append({"rankings": [ranking], **rows_out})
        return outcomes

    def teardown(self) -> None:
        self.__dict__.pop("scorer", None)
        if generator := self.__dict__.pop("generator", None):
            generator.close()

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        return {"annotate": {"mode": "judge", "judge": self.judge_name, "items": len(outputs["rankings"]),
                             "demonstrations": len(outputs["demonstrations"]),
                             "preferences": len(outputs["preferences"]),
                             "by_model_strategy": model_summary(outputs["rankings"])}}
