"""Complexity-first diverse sampling (InsTag): the sweeps on a pool worked out by hand, the scores on hand-built
rows, min_tags, and an outcome that depends on neither the shard size nor where a run was killed."""

import json

import pytest
import yaml

from alignment.recipe_loader import RecipeError
from data_synthesis.select import (complexity_first_diverse, intent_completeness, row_tags, semantic_richness,
                                   states_task)
from qwen2_align.stage_table import load_recipe, run

# id -> tags. By hand, min_tags 1: p5 (no tags) is dropped; sorted by tags, descending, ties in input order:
# p1(3) p3(3) p2(2) p4(2) p0(1) p6(1) p7(1).
# sweep 1: p1 takes a b c; p3 adds d e; p2 (b d) and p4 (a b) add nothing; p0 (a) nothing; p6 adds f; p7 (e) nothing
# sweep 2 (seen reset) over p2 p4 p0 p7: p2 takes b d; p4 adds a; p0 (a) nothing; p7 adds e
# sweep 3: p0. So the order taken is p1 p3 p6 p2 p4 p7 p0; with num_instructions 5: p1 p3 p6 p2 p4.
POOL = {"p0": ["a"], "p1": ["a", "b", "c"], "p2": ["b", "d"], "p3": ["c", "d", "e"], "p4": ["a", "b"], "p5": [],
        "p6": ["f"], "p7": ["e"]}
ORDER_TAKEN = ["p1", "p3", "p6", "p2", "p4", "p7", "p0"]
SWEEPS = {"p1": 1, "p3": 1, "p6": 1, "p2": 2, "p4": 2, "p7": 2, "p0": 3}


def test_sampling_takes_rows_that_add_unseen_tags_sweep_after_sweep():
    ids = [i for i in POOL if POOL[i]]
    taken = complexity_first_diverse([POOL[i] for i in ids], 100)
    assert [ids[i] for i, _, _ in taken] == ORDER_TAKEN
    assert {ids[i]: sweep for i, sweep, _ in taken} == SWEEPS
    assert [new for _, _, new in taken] == [3, 2, 1, 2, 1, 1, 1]
    assert [ids[i] for i, _, _ in complexity_first_diverse([POOL[i] for i in ids], 5)] == ORDER_TAKEN[:5]
    assert complexity_first_diverse([], 3) == []


def test_scores_on_hand_built_rows():
    # 9 words; content words write, poem, sea: 3 distinct
    assert semantic_richness("Write a poem about the sea and the sea.") == pytest.approx(3 / 9)
    assert semantic_richness("!!!") == 0.0
    assert states_task("Please list three rivers.") and states_task("Is it raining?")
    assert states_task("Here is my essay. Rewrite it.")
    assert not states_task("I need something for my sister's birthday.")
    assert intent_completeness("Translate this sentence.", ["translation"]) == 0.5  # no target language
    assert intent_completeness("Translate this into French.", ["Translation"]) == 1.0
    assert intent_completeness("What is 17 times 23?", ["math", "arithmetic"]) == 1.0  # one check per family
    assert intent_completeness("What is seventeen times three?", ["math"]) == 0.5
    assert intent_completeness("Write a function that sorts a list.", ["coding"]) == 0.5  # no language named
    assert intent_completeness("Write a Python function that sorts a list.", ["coding", "programming"]) == 1.0
    assert intent_completeness("Summarise it.", ["summarization"]) == 0.5  # nothing to summarise
    assert intent_completeness("Summarise: the tide rises twice a day.", ["summarization"]) == 1.0
    assert intent_completeness("I need a gift.", ["recommendation"]) == 0.0


def test_tags_are_read_normalised_first_and_checked():
    assert row_tags({"meta": {"tags": ["X"], "tags_normalised": [" Math ", "math", "code", ""]}}) == ["math", "code"]
    assert row_tags({"meta": {"tags": ["Poetry"]}}) == ["poetry"]
    assert row_tags({"meta": {}}).startswith("meta.tags: missing")
    assert row_tags({"meta": {"tags": "math"}}).startswith("meta.tags: must be a list of tag strings")


def _write(tmp_path, shard_size: int, **extra) -> str:
    rows = [{"id": i, "messages": [{"role": "user", "content": f"Write about {' and '.join(tags) or 'nothing'}."}],
             "source": "t", "meta": {"tags": tags}} for i, tags in POOL.items()]
    rows.insert(3, {"id": "bad", "messages": [{"role": "user", "content": "Hi"}], "meta": {"tags": "a"}})
    (tmp_path / "tagged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / f"select-{shard_size}.yaml"
    path.write_text(yaml.safe_dump({"stage": "select", "run_dir": str(tmp_path / f"run-{shard_size}"), "seed": 4,
                                    "shard_size": shard_size, "inputs": {"tagged": str(tmp_path / "tagged.jsonl")},
                                    "num_instructions": 5, **extra}))
    return str(path)


def test_the_stage_selects_drops_counts_and_does_not_depend_on_sharding(tmp_path):
    manifest = run("select", load_recipe(_write(tmp_path, 3)))
    out = tmp_path / "run-3"
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in selected] == ["p1", "p2", "p3", "p4", "p6"]  # input order
    assert {r["id"]: r["meta"]["select"]["rank"] for r in selected} == {i: ORDER_TAKEN.index(i) for i in
                                                                       ["p1", "p2", "p3", "p4", "p6"]}
    assert all(r["meta"]["select"]["sweep"] == SWEEPS[r["id"]] for r in selected)
    assert selected[0]["meta"]["lineage"] == {"stage": "select", "model": "", "seed": 4, "parent_id": "p1"}
    assert selected[0]["meta"]["tags"] == ["a", "b", "c"] and selected[0]["messages"][0]["content"].startswith("Wr")
    unselected = {r["id"]: r["reason"] for r in map(json.loads, (out / "unselected.jsonl").read_text().splitlines())}
    assert unselected == {"p0": "not_selected", "p5": "below_min_tags", "p7": "not_selected"}
    assert "meta.tags: must be a list" in (out / "quarantine.jsonl").read_text()
    counts, select = manifest["counts"], manifest["select"]
    assert counts["rows_in"] == 9 and counts["quarantined_by_stage"] == 1 and counts["processed"] == 8
    assert select["below_min_tags"] == 1 and select["pool"] == 7 and select["chosen"] == 5 and select["sweeps"] == 2
    assert select["tags"] == {"pool": 6, "covered": 6, "coverage": 1.0}
    # complexity: chosen (3 + 2 + 3 + 2 + 1) / 5 vs pool (1 + 3 + 2 + 3 + 2 + 1 + 1) / 7
    assert select["chosen_means"]["complexity"] == 2.2 and select["pool_means"]["complexity"] == round(13 / 7, 4)

    # another shard size, and a run killed after two shards: the same bytes
    run("select", load_recipe(_write(tmp_path, 8)))
    for name in ("selected.jsonl", "unselected.jsonl"):
        assert (tmp_path / "run-8" / name).read_bytes() == (out / name).read_bytes()
    finished = {name: (out / name).read_bytes() for name in ("selected.jsonl", "unselected.jsonl")}
    for name in ("manifest.json", "selected.jsonl", "unselected.jsonl"):
        (out / name).unlink()
    (out / "shards" / "00002.jsonl").unlink()
    resumed = run("select", load_recipe(_write(tmp_path, 3)))
    assert resumed["shards"]["resumed"] == 2
    assert {name: (out / name).read_bytes() for name in finished} == finished


def test_min_tags_and_a_small_target(tmp_path):
    manifest = run("select", load_recipe(_write(tmp_path, 4, min_tags=2, num_instructions=2)))
    assert [json.loads(line)["id"] for line in (tmp_path / "run-4" / "selected.jsonl").read_text().splitlines()] == [
        "p1", "p3"]
    assert manifest["select"]["below_min_tags"] == 4  # p0 p5 p6 p7
    assert manifest["select"]["tags"] == {"pool": 5, "covered": 5, "coverage": 1.0}


def test_recipe_checks(tmp_path):
    for key, value in (("min_tags", 0), ("num_instructions", 0)):
        with pytest.raises(RecipeError, match=f"{key}: must be >= 1") as e:
            load_recipe(_write(tmp_path, 4, **{key: value}))
        assert "\n" not in str(e.value)
