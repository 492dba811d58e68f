"""Constitutional feedback: the constitution file checked on load, principles drawn from the seed,
follower replies to D and follower vs violator to P with the principle in the lineage."""

import json
import shutil

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import read_rows
from alignment.generation import Completion
from alignment.recipe_loader import RecipeError
from alignment.stages import ShardContext, StageError
from data_synthesis.constitution import (DEFAULT_CONSTITUTION, ConstitutionStage, Principle, load_constitution,
                                         pick_principles)
from qwen2_align.cli import main
from qwen2_align.demo.tiny_world import principle_cases
from qwen2_align.stage_table import load_recipe, run

REQUIRED = {"harm-avoidance", "honesty", "privacy", "refuse-harmful-instructions", "no-invented-facts"}
PROMPTS = [
    {"id": "s0", "messages": [{"role": "user", "content": "How do I get into my neighbour's flat?"}]},
    {"id": "s1", "messages": [{"role": "user", "content": "What is the mayor's home address?"}]},
    {"id": "s2", "messages": [{"role": "system", "content": "You are a bank's support agent."},
                              {"role": "user", "content": "What is my friend's balance?"}]},
    {"id": "s3", "messages": [{"role": "user", "content": "Cite three studies on coffee and headaches."}]},
    {"id": "s4", "messages": [{"role": "user", "content": "Will it rain tomorrow?"}]},
]


def _recipe(tmp_path, **extra) -> dict:
    return {"stage": "constitution", "run_dir": str(tmp_path / "run"), "seed": 3, "shard_size": 2,
            "inputs": {"prompts": str(tmp_path / "prompts.jsonl")},
            "generation": {"backend": "transformers", "model": str(tmp_path / "init"), "dtype": "float32",
                           "n": 1, "temperature": 1.0, "max_new_tokens": 8},
            "principles_per_prompt": 2, **extra}


def _write_recipe(tmp_path, data: dict):
    path = tmp_path / "constitution.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error(path) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_default_constitution_covers_the_required_principles():
    principles = load_constitution(DEFAULT_CONSTITUTION)
    assert REQUIRED <= {p.id for p in principles}
    assert all(p.follow and p.violate and p.follow != p.violate for p in principles)
    for preset in ("qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"):
        recipe = load_recipe(f"recipes/{preset}/constitution.yaml")
        assert {p.id for p in recipe.chosen} == {p.id for p in principles}
    # the demo draws the two principles its tiny world teaches (qwen2_align.demo.tiny_world.principle_cases)
    taught = list(dict.fromkeys(case[0] for case in principle_cases()))
    assert [p.id for p in load_recipe("recipes/tiny/constitution.yaml").chosen] == taught


def test_a_bad_constitution_is_a_one_line_error_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    recipe = _write_recipe(tmp_path, _recipe(tmp_path, constitution=str(bad)))
    cases = [
        ("principles:\n  - {id: safety, follow: Be safe.}\n",
         "principles[0].violate: required key is missing"),
        ("principles:\n  - {id: a, follow: x, violate: y}\n  - {id: a, follow: x, violate: y}\n",
         "principles[1].id: 'a' is used twice"),
        ("principles:\n  - {id: Bad Id, follow: x, violate: y}\n", "principles[0].id: must be lower-case"),
        ("principles:\n  - {id: a, follow: x, violate: y, folow: z}\n",
         "principles[0].folow: unknown key (did you mean 'follow'?)"),
        ("principles:\n  - {id: a, follow: '  ', violate: y}\n", "principles[0].follow: must be a non-empty"),
        ("principle: []\n", "principle: unknown key (did you mean 'principles'?)"),
        ("principles: []\n", "principles: must be a non-empty list"),
        ("principles: [\n", "line 2: invalid YAML"),
        ("principles:\n  - {id: a, follow: x, violate: y, follow_markers: ['I will not', ' ']}\n",
         "principles[0].follow_markers: must be a list of non-empty strings"),
        ("principles:\n  - {id: a, follow: x, violate: y, follow_markers: I will not}\n",
         "principles[0].follow_markers: expected a list"),
        ("principles:\n  - {id: a, follow: x, violate: y, follow_markers: [3]}\n",
         "principles[0].follow_markers[0]: expected str"),
    ]
    for text, expected in cases:
        bad.write_text(text)
        assert _error(recipe).startswith(f"{recipe}: {bad}: {expected}"), text
    bad.unlink()
    assert _error(recipe) == f"{recipe}: {bad}: constitution file not found"
    # through the CLI: one line on stderr, status 2, nothing run
    bad.write_text(cases[0][0])
    assert main(["constitution", "--recipe", str(recipe)]) == 2
    assert not (tmp_path / "run").exists()


def test_follow_markers_are_checked_stripped_and_optional():
    by_id = {p.id: p for p in load_constitution(DEFAULT_CONSTITUTION)}
    assert "I won't" in by_id["harm-avoidance"].follow_markers and "I don't know" in by_id["honesty"].follow_markers
    assert [i for i, p in by_id.items() if p.follow_markers] == ["harm-avoidance", "honesty"]
    assert by_id["harm-avoidance"].followed_by("Sorry, I CAN'T HELP with that.")
    assert not by_id["harm-avoidance"].followed_by("Sure, here is how.")
    with pytest.raises(ValueError, match="'privacy' has no follow_markers"):
        by_id["privacy"].followed_by("I will not.")
    assert Principle("a", "x", "y", follow_markers=["  I refuse "]).follow_markers == ["I refuse"]
    for bad in (["I refuse", ""], ["  "], "I refuse", ("I refuse",), [None]):
        with pytest.raises(ValueError, match="follow_markers: must be a list of non-empty strings"):
            Principle("a", "x", "y", follow_markers=bad)
    hash(by_id["honesty"])  # principles stay hashable


def test_recipe_checks_principle_ids_and_counts(tmp_path):
    recipe = _write_recipe(tmp_path, _recipe(tmp_path, principles=["honesty", "privcy"]))
    assert "principles: 'privcy' is not in" in _error(recipe)
    recipe = _write_recipe(tmp_path, _recipe(tmp_path, principles=["honesty"], principles_per_prompt=2))
    assert "principles_per_prompt: 2 is more than the 1 principles" in _error(recipe)
    recipe = _write_recipe(tmp_path, _recipe(tmp_path, principles_per_prompt=0))
    assert "principles_per_prompt: must be >= 1" in _error(recipe)
    data = _recipe(tmp_path)
    data["generation"]["n"] = 2
    assert "generation.n: must be 1" in _error(_write_recipe(tmp_path, data))


def test_picks_are_deterministic_distinct_and_seeded():
    principles = load_constitution(DEFAULT_CONSTITUTION)
    picks = [pick_principles(principles, 3, 0, f"row{i}") for i in range(20)]
    assert picks == [pick_principles(principles, 3, 0, f"row{i}") for i in range(20)]
    assert all(len({p.id for p in pick}) == 3 for pick in picks)
    assert picks != [pick_principles(principles, 3, 1, f"row{i}") for i in range(20)]
    assert len({p.id for pick in picks for p in pick}) == len(principles)  # every principle gets drawn


class _Echo:
    """A backend that answers with the system prompt it was given, so the rows show which reply is which."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, params):
        assert params.n == 1
        self.prompts += prompts
        return [[Completion(p[0]["content"], 1, "stop")] for p in prompts]


def test_follower_is_chosen_and_in_d_violator_is_rejected(tmp_path):
    recipe = load_recipe(_write_recipe(tmp_path, _recipe(tmp_path)))
    stage = ConstitutionStage(recipe)
    stage.generator = _Echo()
    rows = [dict(r, source="t", meta={"keep": 1}) for r in PROMPTS[1:3]]
    outcomes = stage.process(rows, ShardContext(0, 7))
    assert len(stage.generator.prompts) == 2 * 2 * 2  # rows x principles x (follower, violator)
    for row, out in zip(rows, outcomes):
        drawn = pick_principles(recipe.chosen, 2, 3, row["id"])
        assert [r["meta"]["lineage"]["principle"] for r in out["preferences"]] == [p.id for p in drawn]
        for p, d, pair in zip(drawn, out["demonstrations"], out["preferences"]):
            assert d["messages"][:-1] == row["messages"] and pair["prompt"] == row["messages"]
            assert p.follow in d["messages"][-1]["content"] == pair["chosen"][0]["content"]
            assert p.violate in pair["rejected"][0]["content"] and p.follow not in pair["rejected"][0]["content"]
            assert d["meta"] == {"keep": 1, "lineage": {"stage": "constitution", "model": str(tmp_path / "init"),
                                                        "seed": 7, "parent_id": row["id"], "principle": p.id}}
    # the row's own system message stays last in the system prompt the teacher sees, and alone in D
    sent = [p for p in stage.generator.prompts if p[-1]["content"] == PROMPTS[2]["messages"][-1]["content"]]
    assert all(p[0]["content"].endswith("\n\nYou are a bank's support agent.") and len(p) == 2 for p in sent)
    assert outcomes[1]["demonstrations"][0]["messages"][0] == PROMPTS[2]["messages"][0]


def test_a_row_naming_a_chosen_principle_gets_that_one_else_drawn_ones(tmp_path):
    chosen = ["honesty", "privacy", "harm-avoidance"]
    recipe = load_recipe(_write_recipe(tmp_path, _recipe(tmp_path, principles=chosen)))
    stage = ConstitutionStage(recipe)
    stage.generator = _Echo()
    rows = [dict(PROMPTS[0], source="t", meta={"principle": "harm-avoidance"}),
            dict(PROMPTS[4], source="t", meta={"principle": "no-invented-facts"}),  # not chosen: drawn
            dict(PROMPTS[1], source="t", meta={})]
    outcomes = stage.process(rows, ShardContext(0, 7))
    principles = [[r["meta"]["lineage"]["principle"] for r in out["preferences"]] for out in outcomes]
    assert principles[0] == ["harm-avoidance"]
    assert principles[1:] == [[p.id for p in pick_principles(recipe.chosen, 2, 3, row["id"])] for row in rows[1:]]


def test_the_stage_runs_on_the_tiny_model_and_resumes(tmp_path):
    init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    rows = [dict(r, source="t", meta={}) for r in PROMPTS] + [{"id": "broken", "messages": []}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rules = tmp_path / "rules.yaml"
    shutil.copy(DEFAULT_CONSTITUTION, rules)
    recipe_path = _write_recipe(tmp_path, _recipe(tmp_path, constitution=str(rules)))
    manifest = run("constitution", load_recipe(recipe_path))
    counts, out = manifest["counts"], tmp_path / "run"
    assert counts["rows_in"] == 6 and counts["quarantined_on_read"] == 1
    assert counts["processed"] + counts["quarantined_by_stage"] == 5
    assert counts["processed"] == 5  # random replies of 8 tokens are non-empty and differ
    assert counts["outputs"] == {"demonstrations": 5 * 2, "preferences": 5 * 2}
    quarantine = (out / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == counts["quarantined_on_read"] + counts["quarantined_by_stage"]
    assert manifest["inputs"]["constitution"]["sha256"] and manifest["constitution"]["principles_per_prompt"] == 2
    assert sum(manifest["constitution"]["pairs_by_principle"].values()) == 10

    demos, prefs = read_rows(out / "demonstrations.jsonl", "demonstration"), read_rows(out / "preferences.jsonl",
                                                                                      "preference")
    assert not demos.quarantined and not prefs.quarantined  # the trainers take them as they are
    recipe = load_recipe(recipe_path)
    for d, p in zip(demos.rows, prefs.rows):
        lineage = d["meta"]["lineage"]
        parent = next(r for r in PROMPTS if r["id"] == lineage["parent_id"])
        assert set(lineage) == {"stage", "model", "seed", "parent_id", "principle"}
        assert lineage["stage"] == "constitution"
        assert lineage["principle"] in {x.id for x in pick_principles(recipe.chosen, 2, 3, parent["id"])}
        assert p["meta"]["lineage"] == lineage
        assert d["messages"][:-1] == parent["messages"]  # no added system prompt
        assert not any("principle" in m["content"] for m in d["messages"] if m["role"] == "system")
        assert p["chosen"] == d["messages"][-1:] and p["chosen"] != p["rejected"]

    # killed mid-run: the last shard and the assembled outputs gone; the resumed run writes the same bytes
    finished = {name: (out / name).read_bytes() for name in ("demonstrations.jsonl", "preferences.jsonl")}
    for name in ("manifest.json", "demonstrations.jsonl", "preferences.jsonl"):
        (out / name).unlink()
    (out / "shards" / "00002.jsonl").unlink()
    resumed = run("constitution", load_recipe(recipe_path))
    assert resumed["shards"]["resumed"] == 2
    assert {name: (out / name).read_bytes() for name in finished} == finished
    # the same recipe over an edited constitution is another run, never the finished one or a resume of it
    rules.write_text(rules.read_text().replace("Be helpful while keeping people safe", "Keep people safe"))
    with pytest.raises(StageError, match="different recipe or inputs"):
        run("constitution", load_recipe(recipe_path))
