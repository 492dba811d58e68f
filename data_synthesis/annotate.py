"""`annotate`: rank the responses of each instruction, then export the top one to D and pairs to P.

The input is `responses`' output: `{id, prompt, responses: [{content, model, strategy}], source, meta}`.
Ranking and export are two steps joined by a ranking row, `{id, order, scores, judge, responses}` (`order`:
response indices best first; `scores`: per response index, or null where people rank; `responses`: the model
and strategy of each), written to `rankings.jsonl`. With `judge:` a reward model ranks: it scores every response
after its prompt and the order is by score, ties keeping the responses' order. People ranking in a web app
(not built yet) will write the same rows, and `export` turns either into data: the top response to D when its
score reaches `judge.min_score` (always, without scores), and to P the top response against lower ones, the
lowest first (`pairs_per_item: 1` is best vs worst, the widest margin; 0 takes every lower one). A lower
response with the top's score (a tie) or the top's text makes no pair. Every D and P row records in
`meta.lineage` the judge and the model, strategy, index and score of its chosen (and rejected) response; the
manifest has per model and strategy the responses, their mean score and how often they ranked first.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from alignment.data import Quarantined, row_problem
from alignment.stages import Outcome, ShardContext, Stage, StageError

from .generate import lineage
from .recipes import AnnotateRecipe


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


class AnnotateStage(Stage):
    name = "annotate"
    recipe_class = AnnotateRecipe
    inputs = {"responses": "any"}
    outputs = ("rankings", "demonstrations", "preferences")

    def __init__(self, recipe: AnnotateRecipe):
        if recipe.judge is None:
            raise StageError("annotate: ranking by people needs the annotation web app, which is not built yet; "
                             "set `judge:` in the recipe to rank with a reward model")
        super().__init__(recipe)
        self.judge_name = {"kind": recipe.judge.kind, "path": recipe.judge.path}

    def setup(self, side_inputs: dict[str, list[dict]]) -> None:
        import torch

        from reward.model import RewardModel

        judge = self.recipe.judge
        self.scorer = RewardModel(judge.path, dtype=getattr(torch, judge.dtype), batch_size=judge.batch_size,
                                  device="cuda" if torch.cuda.is_available() else None)

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        problems = [item_problem(row) for row in rows]
        conversations = [row["prompt"] + [{"role": "assistant", "content": r["content"]}]
                         for row, problem in zip(rows, problems) if not problem for r in row["responses"]]
        scores = iter(self.scorer(conversations))
        outcomes: list[Outcome] = []
        for row, problem in zip(rows, problems):
            if problem:
                outcomes.append(Quarantined(problem, row))
                continue
            item_scores = [next(scores) for _ in row["responses"]]
            ranking = {"id": row["id"], "order": rank(item_scores), "scores": item_scores, "judge": self.judge_name,
                       "responses": [{"model": r["model"], "strategy": r["strategy"]} for r in row["responses"]]}
            rows_out = export(row, ranking, self.recipe.judge.min_score, self.recipe.pairs_per_item, ctx.seed)
            outcomes.append({"rankings": [ranking], **rows_out})
        return outcomes

    def teardown(self) -> None:
        self.__dict__.pop("scorer", None)

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        return {"annotate": {"mode": "judge", "judge": self.judge_name, "items": len(outputs["rankings"]),
                             "demonstrations": len(outputs["demonstrations"]),
                             "preferences": len(outputs["preferences"]),
                             "by_model_strategy": model_summary(outputs["rankings"])}}
