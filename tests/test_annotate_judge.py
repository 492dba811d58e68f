"""`annotate`'s chat-model judge: its prompt, the lenient reading of its scores, and a real run through a
generation backend whose answers (a random tiny model's) hold no scores, so every item is quarantined with them."""

import json
import re

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.executors import ShardContext
from alignment.generation import Completion, GenerationSpec, make_generator
from alignment.recipe_loader import RecipeError
from data_synthesis.annotate import AnnotateStage, judge_prompt, judged_scores, parse_scores
from qwen2_align.stage_table import load_recipe, run

ITEMS = [{"id": f"q{i}", "prompt": [{"role": "user", "content": question}],
          "responses": [{"content": reply, "model": "m", "strategy": s} for reply, s in zip(replies, ("a", "b", "c"))],
          "source": "t", "meta": {}}
         for i, (question, replies) in enumerate([("What is 2 + 2?", ("4", "5", "four")),
                                                  ("Name a colour.", ("red", "blue"))])]


def test_scores_are_read_leniently_and_only_when_complete():
    assert parse_scores('{"scores": [7, 3, 9]}', 3) == [7.0, 3.0, 9.0]
    assert parse_scores("Sure!\n```json\n{'scores': [7.5, 3, 9,],}\n```\nHope this helps.", 3) == [7.5, 3.0, 9.0]
    assert parse_scores("[2, 8] are my scores", 2) == [2.0, 8.0]
    assert parse_scores('{"scores": [7, 3]}', 3) is None  # one per response, no fewer
    assert parse_scores('{"scores": [true, 3]}', 2) is None
    assert parse_scores('{"scores": ["7", 3]}', 2) is None
    assert parse_scores("Response 1 is better.", 2) is None


def test_both_orders_map_back_to_the_responses_before_averaging():
    assert judged_scores(['{"scores": [9, 1, 5]}'], 3) == [9.0, 1.0, 5.0]
    # the second answer is about the responses reversed: [4, 2, 8] scores responses 2, 1, 0
    assert judged_scores(['{"scores": [9, 1, 5]}', "[4, 2, 8]"], 3) == [8.5, 1.5, 4.5]
    assert judged_scores(['{"scores": [9, 1, 5]}', "no idea"], 3) == (
        "judge: no 3 scores in its answer: '{\"scores\": [9, 1, 5]}' | 'no idea'")


def test_the_judge_sees_the_conversation_and_every_response_in_the_order_given():
    [message] = judge_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {there}"}],
                             ["second {0}", "first"])
    text = message["content"]
    assert message["role"] == "user" and "then 2 responses to it" in text
    assert "then 1 response to it" in judge_prompt([{"role": "user", "content": "Hi"}], ["one"])[0]["content"]
    assert "system: Be brief.\n\nuser: Hi {there}" in text
    assert text.index("[Response 1]\nsecond {0}") < text.index("[Response 2]\nfirst")
    assert text.endswith('{"scores": [one number per response, in the order shown]}')


class _ScoresByLength:
    """A backend whose judge answers score each response shown by its length: `{"scores": [len, ...]}`."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, params):
        self.prompts += prompts
        shown = [re.findall(r"\[Response \d+\]\n(.*?)(?:\n\n|$)", p[0]["content"].split("# Responses\n")[1])
                 for p in prompts]
        return [[Completion(json.dumps({"scores": [len(r) for r in responses]}), 1, "stop")] for responses in shown]


def test_a_pointwise_judge_asks_about_one_response_at_a_time(tmp_path):
    path = tmp_path / "annotate.yaml"
    path.write_text(yaml.safe_dump({"stage": "annotate", "run_dir": str(tmp_path / "run"),
                                    "inputs": {"responses": "x.jsonl"}, "judge": {
                                        "kind": "model", "mode": "pointwise", "generation": {"model": "m"}}}))
    stage = AnnotateStage(load_recipe(path))
    stage.generator = _ScoresByLength()
    outcomes = stage.process([dict(item) for item in ITEMS], ShardContext(0, 0))
    assert len(stage.generator.prompts) == sum(len(item["responses"]) for item in ITEMS)  # no second order
    assert all("then 1 response to it" in p[0]["content"] for p in stage.generator.prompts)
    assert [o["rankings"][0]["scores"] for o in outcomes] == [[1.0, 1.0, 4.0], [3.0, 4.0]]
    assert [o["rankings"][0]["order"] for o in outcomes] == [[2, 0, 1], [1, 0]]
    assert outcomes[0]["demonstrations"][0]["messages"][-1]["content"] == "four"


def test_a_model_judge_needs_a_generation_section(tmp_path):
    path = tmp_path / "annotate.yaml"
    path.write_text(yaml.safe_dump({"stage": "annotate", "run_dir": "r", "inputs": {"responses": "x.jsonl"},
                                    "judge": {"kind": "model"}}))
    with pytest.raises(RecipeError, match="judge.generation: a model judge needs a generation section"):
        load_recipe(path)


def test_unreadable_judge_answers_quarantine_the_item_with_the_answers(tmp_path):
    model = init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1, initializer_range=0.3)
    generation = {"backend": "transformers", "model": str(model), "dtype": "float32", "temperature": 0.0,
                  "max_new_tokens": 12}
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    recipe = tmp_path / "annotate.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "annotate", "run_dir": str(tmp_path / "run"), "inputs": {"responses": str(tmp_path / "responses.jsonl")},
        "judge": {"kind": "model", "generation": generation, "both_orders": True}}))
    manifest = run("annotate", load_recipe(recipe))
    assert manifest["counts"]["processed"] == 0 and manifest["counts"]["quarantined_by_stage"] == len(ITEMS)
    assert manifest["annotate"]["judge"] == {"kind": "model", "model": str(model), "both_orders": True,
                                             "mode": "listwise"}
    quarantine = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    generator = make_generator(GenerationSpec(**generation))
    try:
        for item, entry in zip(ITEMS, quarantine):
            contents = [r["content"] for r in item["responses"]]
            shown, reversed_ = (generator.generate([judge_prompt(item["prompt"], order)], GenerationSpec(
                **generation).sampling(seed=0))[0][0].text for order in (contents, contents[::-1]))
            assert entry["row"]["id"] == item["id"]
            assert entry["reason"] == (f"judge: no {len(contents)} scores in its answer: "
                                       f"{shown[:300]!r} | {reversed_[:300]!r}")
    finally:
        generator.close()
