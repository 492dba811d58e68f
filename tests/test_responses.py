"""Several responses per instruction (models and strategies recorded, one generator in memory at a time) and the
reward-model judge of `annotate`: rankings by the RM's own scores, the top to D, top vs lower to P."""

import json

import pytest
import yaml

from alignment.checkpoint import init_checkpoint, reward_model_class
from alignment.data import read_rows
from alignment.generation import Completion
from alignment.recipe_loader import RecipeError
from alignment.reward_model import RewardModel
from alignment.stages import ShardContext
from alignment.tokenizer import load_tokenizer
from data_synthesis import responses as responses_module
from data_synthesis.annotate import export, model_summary, rank
from data_synthesis.responses import ResponsesStage
from qwen2_align.stage_table import load_recipe, run

PROMPTS = [{"id": f"q{i}", "messages": [{"role": "user", "content": text}], "source": "t", "meta": {"k": i}}
           for i, text in enumerate(["What is 2 + 2?", "Name a colour.", "Say hello in French.", "Spell cat.",
                                     "Count to three."])]
GREEDY = {"strategy": "greedy", "backend": "transformers", "dtype": "float32", "n": 1, "temperature": 0.0,
          "max_new_tokens": 8}
SAMPLED = GREEDY | {"strategy": "sampled", "n": 2, "temperature": 1.0}


def _write(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


def _error(path) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 1-layer tiny model and a reward model on it with a random head; the prompts, one of them broken."""
    root = tmp_path_factory.mktemp("responses")
    # wide random weights: at the default range the random model's greedy reply is only newlines (dropped as empty)
    init = init_checkpoint("tiny", root / "init", seed=0, num_hidden_layers=1, initializer_range=0.3)
    tokenizer = load_tokenizer(str(init))
    rm = reward_model_class(init).from_pretrained(init, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS + [{"id": "bad"}]))
    return {"root": root, "init": str(init), "rm": str(root / "rm")}


def _responses_recipe(tiny: dict, run_dir) -> dict:
    return {"stage": "responses", "run_dir": str(run_dir), "seed": 5, "shard_size": 2,
            "inputs": {"instructions": str(tiny["root"] / "prompts.jsonl")},
            "generators": [GREEDY | {"model": tiny["init"]}, SAMPLED | {"model": tiny["init"]}]}


@pytest.fixture(scope="module")
def responses_run(tiny, tmp_path_factory) -> dict:
    """The responses stage run end to end, counting how often a model is loaded."""
    root = tmp_path_factory.mktemp("responses-run")
    recipe_path = _write(root / "responses.yaml", _responses_recipe(tiny, root / "run"))
    loads = []
    real = responses_module.make_generator
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(responses_module, "make_generator", lambda spec: loads.append(spec.strategy) or real(spec))
        manifest = run("responses", load_recipe(recipe_path))
    return {"recipe": recipe_path, "manifest": manifest, "out": root / "run", "loads": loads}


def test_recipes_are_checked_and_both_stages_are_built(tiny, tmp_path):
    for preset in ("tiny", "qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"):
        recipe = load_recipe(f"recipes/{preset}/responses.yaml")
        assert len(recipe.generators) == 2 and all(g.strategy for g in recipe.generators)
        # the demo's judge is its base model (the tiny world taught it to score); real presets use a reward model
        assert load_recipe(f"recipes/{preset}/annotate.yaml").judge.kind == ("model" if preset == "tiny"
                                                                             else "reward_model")
    assert [g.strategy for g in load_recipe("recipes/tiny/responses.yaml").generators] == ["greedy", "sampled"]

    path = tmp_path / "r.yaml"
    base = _responses_recipe(tiny, tmp_path / "run")
    cases = [
        ({"generators": [GREEDY | {"model": "m", "strategy": ""}]}, "generators[0].strategy: name the sampling"),
        ({"generators": [GREEDY | {"model": "m", "strategy": "Top P"}]}, "generators[0].strategy: name the sampling"),
        ({"generators": [GREEDY]}, "generators[0].model: name a checkpoint"),
        ({"generators": [GREEDY | {"model": "m", "n": 0}]}, "generators[0].n: must be >= 1"),
        ({"generators": [GREEDY | {"model": "m", "temprature": 1}]},
         "generators[0].temprature: unknown key (did you mean 'temperature'?)"),
        ({"generators": [GREEDY | {"model": "m"}, SAMPLED | {"model": "m", "strategy": "greedy"}]},
         "generators[1].strategy: 'greedy' is used twice for m"),
        ({"generators": []}, "generators: list at least one"),
    ]
    for extra, expected in cases:
        assert _error(_write(path, base | extra)).startswith(f"{path}: {expected}"), expected
    annotate = {"stage": "annotate", "run_dir": str(tmp_path / "a"), "inputs": {"responses": "x.jsonl"}}
    for extra, expected in [({"judge": {"kind": "reward_model"}}, "judge.path: name the reward model's"),
                            ({"judge": {"kind": "people", "path": "rm"}}, "judge.kind: must be one of"),
                            ({"judge": {"path": "rm", "batch_size": 0}}, "judge.batch_size: must be >= 1"),
                            ({"judge": {"path": "rm"}, "pairs_per_item": -1}, "pairs_per_item: must be >= 0")]:
        assert _error(_write(path, annotate | extra)).startswith(f"{path}: {expected}"), expected


def test_rank_and_export_follow_the_ranking():
    assert rank([0.1, 0.5, 0.1, 0.9]) == [3, 1, 0, 2]  # the tie keeps the responses' order
    item = {"id": "x", "prompt": [{"role": "user", "content": "Hi"}], "meta": {"keep": 1},
            "responses": [{"content": c, "model": m, "strategy": s} for c, m, s in
                          [("a", "A", "greedy"), ("b", "B", "sampled"), ("a ", "B", "sampled"), ("d", "A", "sampled"),
                           ("e", "A", "sampled")]]}
    scores = [2.0, 1.0, 0.5, 2.0, -1.0]
    ranking = {"id": "x", "order": rank(scores), "scores": scores, "judge": {"kind": "reward_model", "path": "rm"}}
    out = export(item, ranking, None, 0, 7)
    assert out["demonstrations"][0]["messages"][-1] == {"role": "assistant", "content": "a"}
    # lowest first; "a " repeats the top's text and "d" ties with it: no pair from either
    assert [p["rejected"][0]["content"] for p in out["preferences"]] == ["e", "b"]
    assert out["preferences"][0]["meta"]["lineage"] == {
        "stage": "annotate", "model": "A", "seed": 7, "parent_id": "x", "judge": ranking["judge"],
        "chosen": {"index": 0, "model": "A", "strategy": "greedy", "score": 2.0},
        "rejected": {"index": 4, "model": "A", "strategy": "sampled", "score": -1.0}}
    assert out["preferences"][0]["meta"]["keep"] == 1
    assert len(export(item, ranking, None, 1, 7)["preferences"]) == 1
    assert export(item, ranking, 2.5, 1, 7)["demonstrations"] == []  # below the bar: no D, P still
    assert export(item, ranking, 2.0, 1, 7)["demonstrations"]
    people = {"id": "x", "order": [3, 0, 1, 2, 4], "scores": None, "judge": {"kind": "people"}}
    by_people = export(item, people, 5.0, 0, 7)  # no scores: no bar, no ties
    assert by_people["demonstrations"][0]["messages"][-1]["content"] == "d"
    assert [p["rejected"][0]["content"] for p in by_people["preferences"]] == ["e", "a ", "b", "a"]
    summary = model_summary([ranking | {"responses": item["responses"]}])
    assert summary == {"A / greedy": {"responses": 1, "top": 1, "mean_score": 2.0},
                       "A / sampled": {"responses": 2, "top": 0, "mean_score": 0.5},
                       "B / sampled": {"responses": 2, "top": 0, "mean_score": 0.75}}


class _Fixed:
    """A backend with canned replies per prompt text; the empty ones are what the stage must drop."""

    def __init__(self, replies: dict[str, list[str]]):
        self.replies = replies

    def generate(self, prompts, params):
        return [[Completion(t, 1, "stop") for t in self.replies[p[-1]["content"]][: params.n]] for p in prompts]

    def close(self):
        pass


def test_empty_responses_are_dropped_and_an_instruction_left_with_none_is_quarantined(tiny, tmp_path):
    recipe = load_recipe(_write(tmp_path / "r.yaml", _responses_recipe(tiny, tmp_path / "run")))
    stage = ResponsesStage(recipe)
    backends = [_Fixed({"What is 2 + 2?": ["4"], "Name a colour.": [" "]}),
                _Fixed({"What is 2 + 2?": ["", "four"], "Name a colour.": ["", "\n"]})]
    stage.generator = backends.__getitem__
    done, dropped = stage.process(PROMPTS[:2], ShardContext(0, 5))
    assert [(r["content"], r["strategy"]) for r in done["responses"][0]["responses"]] == [("4", "greedy"),
                                                                                          ("four", "sampled")]
    assert dropped.reason == "every response is empty (greedy, sampled)"


def test_responses_run_on_the_tiny_model_with_two_strategies(responses_run, tiny):
    manifest, out = responses_run["manifest"], responses_run["out"]
    counts = manifest["counts"]
    assert counts["rows_in"] == 6 and counts["quarantined_on_read"] == 1
    assert counts["processed"] == 5 and counts["quarantined_by_stage"] == 0
    # 3 shards, 2 generators: the generator loaded last is kept for the next shard, which runs them in reverse
    assert responses_run["loads"] == ["greedy", "sampled", "greedy", "sampled"]
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == counts["processed"] == counts["outputs"]["responses"]
    for row in rows:
        parent = next(p for p in PROMPTS if p["id"] == row["id"])
        assert row["prompt"] == parent["messages"] and row["meta"]["k"] == parent["meta"]["k"]
        assert row["meta"]["lineage"] == {"stage": "responses", "model": tiny["init"], "seed": 5 + PROMPTS.index(
            parent) // 2, "parent_id": parent["id"], "strategies": ["greedy", "sampled"]}
        assert all(r["model"] == tiny["init"] and r["content"].strip() for r in row["responses"])
        assert [r["strategy"] for r in row["responses"]] == ["greedy", "sampled", "sampled"]
    assert sum(manifest["responses"]["responses_by_generator"].values()) == sum(len(r["responses"]) for r in rows)
    greedy = run("generate", load_recipe(_write(tiny["root"] / "g.yaml", {
        "stage": "generate", "run_dir": str(tiny["root"] / "greedy"), "seed": 5, "shard_size": 2,
        "inputs": {"prompts": str(tiny["root"] / "prompts.jsonl")}, "generation": {
            k: v for k, v in GREEDY.items() if k != "strategy"} | {"model": tiny["init"]}})))
    assert greedy["counts"]["processed"] == 5
    alone = [json.loads(line) for line in (tiny["root"] / "greedy" / "completions.jsonl").read_text().splitlines()]
    assert [r["responses"][0]["content"] for r in rows] == [g["completions"][0] for g in alone]  # greedy is greedy

    # a resumed run (last shard and outputs gone) writes the same bytes, although it loads the models in another order
    finished = (out / "responses.jsonl").read_bytes()
    for name in ("manifest.json", "responses.jsonl"):
        (out / name).unlink()
    (out / "shards" / "00001.jsonl").unlink()
    assert run("responses", load_recipe(responses_run["recipe"]))["shards"]["resumed"] == 2
    assert (out / "responses.jsonl").read_bytes() == finished


def test_the_judge_ranks_by_the_reward_models_own_scores(responses_run, tiny, tmp_path):
    items = [json.loads(line) for line in (responses_run["out"] / "responses.jsonl").read_text().splitlines()]
    broken = {"id": "broken", "prompt": items[0]["prompt"], "responses": [{"content": "x", "model": "m"}]}
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items + [broken]))
    recipe = {"stage": "annotate", "run_dir": str(tmp_path / "run"), "seed": 0, "shard_size": 2,
              "inputs": {"responses": str(tmp_path / "responses.jsonl")}, "judge": {"path": tiny["rm"]},
              "pairs_per_item": 1}
    manifest = run("annotate", load_recipe(_write(tmp_path / "annotate.yaml", recipe)))
    counts, out = manifest["counts"], tmp_path / "run"
    assert counts["rows_in"] == len(items) + 1 and counts["quarantined_by_stage"] == 1
    assert counts["processed"] == len(items) == counts["outputs"]["rankings"]
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert quarantine[0]["reason"] == "responses[0].strategy: must be a non-empty string"

    scorer = RewardModel(tiny["rm"])
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    demos = read_rows(out / "demonstrations.jsonl", "demonstration")
    prefs = read_rows(out / "preferences.jsonl", "preference")
    assert not demos.quarantined and not prefs.quarantined  # the trainers take them as they are
    assert len(demos.rows) == len(items)  # no min_score: every item's top response
    for item, ranking in zip(items, rankings):
        scores = scorer([item["prompt"] + [{"role": "assistant", "content": r["content"]}] for r in item["responses"]])
        assert ranking["id"] == item["id"] and ranking["scores"] == pytest.approx(scores, abs=1e-4)
        assert ranking["order"] == sorted(range(len(scores)), key=lambda i: -scores[i])
        assert ranking["judge"] == {"kind": "reward_model", "path": tiny["rm"]}
        top = item["responses"][ranking["order"][0]]
        demo = next(d for d in demos.rows if d["meta"]["lineage"]["parent_id"] == item["id"])
        assert demo["messages"] == item["prompt"] + [{"role": "assistant", "content": top["content"]}]
        assert demo["meta"]["lineage"]["chosen"]["score"] == pytest.approx(max(scores), abs=1e-4)
        pairs = [p for p in prefs.rows if p["meta"]["lineage"]["parent_id"] == item["id"]]
        assert len(pairs) <= 1
        for pair in pairs:
            chosen, rejected = pair["meta"]["lineage"]["chosen"], pair["meta"]["lineage"]["rejected"]
            assert pair["chosen"][0]["content"] == top["content"] and chosen["score"] > rejected["score"]
            assert rejected["index"] == ranking["order"][-1]  # best vs worst
            for side in (chosen, rejected):
                response = item["responses"][side["index"]]
                assert (side["model"], side["strategy"]) == (response["model"], response["strategy"])
    assert len(prefs.rows) == len(items)  # three different replies, random scores: a pair each
    info = manifest["annotate"]
    assert (info["items"], info["demonstrations"], info["preferences"]) == (len(items), len(demos.rows),
                                                                           len(prefs.rows))
    for strategy in ("greedy", "sampled"):
        own = [s for it, rk in zip(items, rankings) for r, s in zip(it["responses"], rk["scores"])
               if r["strategy"] == strategy]
        assert info["by_model_strategy"][f"{tiny['init']} / {strategy}"]["mean_score"] == pytest.approx(
            sum(own) / len(own))
