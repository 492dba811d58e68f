"""Instruction evolution: each elimination rule rejects its case and passes a good one, operations drawn from the
seed, lineage over rounds, and the stage end to end on the tiny model (rows in = out + eliminated + quarantined)."""

import json
import re

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.generation import Completion
from alignment.recipe_loader import RecipeError
from alignment.stages import ShardContext
from data_synthesis.evolve import (IN_DEPTH, OPERATIONS, EvolveStage, instruction_problem, pick_operation,
                                   response_problem, rewrite_prompt)
from qwen2_align.stage_table import load_recipe, run

PARENT = "Write a poem about the sea."  # 6 words


def _recipe(tmp_path, **extra):
    data = {"stage": "evolve", "run_dir": str(tmp_path / "run"), "seed": 5, "shard_size": 3,
            "inputs": {"instructions": str(tmp_path / "prompts.jsonl")},
            "generation": {"backend": "transformers", "model": str(tmp_path / "init"), "dtype": "float32",
                           "n": 1, "temperature": 1.0, "max_new_tokens": 8},
            "max_added_words": 10, **extra}
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_each_instruction_rule_rejects_its_case_and_passes_a_good_one(tmp_path):
    evol, tree = _recipe(tmp_path), _recipe(tmp_path, method="tree", tree_max_words=12)
    good = "Write a poem about the sea in exactly four rhyming lines."
    assert instruction_problem(PARENT, good, "add_constraint", evol) is None
    assert instruction_problem(PARENT, " ... ", "deepen", evol) == "empty"
    assert instruction_problem(PARENT, "#Rewritten Prompt#: " + good, "deepen", evol) == "leak"
    assert instruction_problem(PARENT, "Rewrite the given prompt: a poem on storms.", "breadth", evol) == "leak"
    assert instruction_problem(PARENT, "Write a poem about the given-prompt style.", "deepen", evol) == "leak"
    ten, eleven = " one two three four five six seven eight nine ten", " eleven"
    assert instruction_problem(PARENT, PARENT + ten, "deepen", evol) is None  # exactly max_added_words more
    assert instruction_problem(PARENT, PARENT + ten + eleven, "deepen", evol) == "too_long"
    assert instruction_problem(PARENT, "  write a POEM about the sea. ", "concretize", evol) == "no_gain"
    assert instruction_problem(PARENT, "Sea poem: write about the sea, a poem!", "concretize", evol) == "no_gain"
    # tree: its own word limit, and it must grow
    assert instruction_problem(PARENT, "Write a poem about the sea at night, in four lines.", "tree", tree) is None
    assert instruction_problem(PARENT, "Compose ocean verses.", "tree", tree) == "no_gain"  # new words, shorter
    assert instruction_problem(PARENT, PARENT + ten, "tree", tree) == "too_long"  # 16 words > 12
    assert instruction_problem(PARENT, "Describe the semantic tree of a poem about seas.", "tree", tree) == "leak"


def test_each_response_rule_rejects_its_case_and_passes_a_good_one():
    assert response_problem("The sea rolls in, grey and wide; gulls cry over the tide.") is None
    assert response_problem("I'm sorry, but I cannot help with that.") == "apology"
    assert response_problem("I\u2019m unable to write poems.") == "apology"
    assert response_problem("As an AI, I have no feelings about the sea.") == "apology"
    long_answer = "Sorry for the wait. " + " ".join(["The waves roll and the gulls cry."] * 12)  # over 80 words
    assert response_problem(long_answer) is None
    for empty in ("", "   ", "?!... --", "the of and it is"):
        assert response_problem(empty) == "stop_words_only", empty


def test_operations_are_drawn_from_seed_row_and_round(tmp_path):
    recipe = _recipe(tmp_path)
    draws = [[pick_operation(recipe, f"row{i}", r) for r in (1, 2)] for i in range(60)]
    assert draws == [[pick_operation(recipe, f"row{i}", r) for r in (1, 2)] for i in range(60)]
    assert {op for pair in draws for op in pair} == set(OPERATIONS)
    assert [p[0] for p in draws] != [p[1] for p in draws]  # the round changes the draw
    reseeded = _recipe(tmp_path, seed=6)
    assert draws != [[pick_operation(reseeded, f"row{i}", r) for r in (1, 2)] for i in range(60)]
    narrow = _recipe(tmp_path, operations=["deepen", "breadth"])
    assert {pick_operation(narrow, f"row{i}", 1) for i in range(30)} == {"deepen", "breadth"}
    assert pick_operation(_recipe(tmp_path, method="tree"), "row0", 1) == "tree"
    assert IN_DEPTH["multi_step"] in rewrite_prompt("multi_step", PARENT, recipe)
    tree_prompt = rewrite_prompt("tree", PARENT, _recipe(tmp_path, method="tree", tree_new_nodes=4))
    assert "Add 4 new nodes" in tree_prompt and "at most 100 words" in tree_prompt and PARENT in tree_prompt


def test_recipe_checks(tmp_path):
    cases = [({"operations": ["deepen", "deppen"]}, "operations: unknown operation 'deppen'"),
             ({"operations": []}, "operations: must list at least one"),
             ({"operations": ["deepen", "deepen"]}, "operations: operation 'deepen' is listed twice"),
             ({"rounds": 0}, "rounds: must be >= 1"), ({"max_added_words": 0}, "max_added_words: must be >= 1"),
             ({"method": "forest"}, "method")]
    for extra, expected in cases:
        with pytest.raises(RecipeError, match=re.escape(expected)) as e:
            _recipe(tmp_path, **extra)
        assert "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="generation.n: must be 1"):
        _recipe(tmp_path, generation={"backend": "transformers", "model": "m", "n": 2})


class _Scripted:
    """Rewrites by what the instruction says (leaky: leaks; stuck: no change in round 2; else one clause more)
    and answers with an apology when the instruction asks for one."""

    def __init__(self):
        self.rewrites = []

    def generate(self, prompts, params):
        assert params.n == 1
        out = []
        for p in prompts:
            text = p[-1]["content"]
            if "#Given Prompt#" not in text:
                out.append("I'm sorry, I cannot do that." if "sorry" in text else "Here is a full answer to it.")
                continue
            self.rewrites.append(text)
            given = text.split("#Given Prompt#:\n")[1].split("\n\n#")[0]
            if "leaky" in given:
                out.append(f"#Rewritten Prompt#: {given}")
            elif "stuck" in given and "explain why" in given:
                out.append(given)
            else:
                out.append(given + (" with examples" if "explain why" in given else " and explain why"))
        return [[Completion(t, 1, "stop")] for t in out]


def _rows():
    texts = ["Write a poem about the sea.", "Describe a leaky tap.", "Say sorry to my friend.", "Plan a stuck trip.",
             "???"]
    return [{"id": f"r{i}", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}],
             "source": "t", "meta": {"keep": i}} for i, t in enumerate(texts)]


def test_rounds_lineage_and_eliminations_with_a_scripted_teacher(tmp_path):
    recipe = _recipe(tmp_path, rounds=2)
    stage = EvolveStage(recipe)
    stage.generator = _Scripted()
    r0, r1, r2, r3, r4 = stage.process(_rows(), ShardContext(1, 6))
    assert len(stage.generator.rewrites) == 4 + 2  # round 1: all with words; round 2: r0 and r3 survived
    ops = {(root, rnd): pick_operation(recipe, root, rnd) for root in ("r0", "r3") for rnd in (1, 2)}
    assert [row["id"] for row in r0["evolved"]] == ["r0-r1", "r0-r2"] and not r0["eliminated"]
    assert [row["messages"][-1]["content"] for row in r0["evolved"]] == [
        "Write a poem about the sea. and explain why", "Write a poem about the sea. and explain why with examples"]
    assert r0["evolved"][1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [row["meta"] for row in r0["evolved"]] == [
        {"keep": 0, "lineage": {"stage": "evolve", "model": str(tmp_path / "init"), "seed": 6, "parent_id": parent,
                                "operation": ops[("r0", rnd)], "round": rnd, "root_id": "r0"}}
        for parent, rnd in (("r0", 1), ("r0-r1", 2))]
    assert not r1["evolved"] and [(e["reason"], e["round"], e["response"]) for e in r1["eliminated"]] == [
        ("leak", 1, None)]
    assert [(e["reason"], e["response"]) for e in r2["eliminated"]] == [("apology", "I'm sorry, I cannot do that.")]
    assert [row["id"] for row in r3["evolved"]] == ["r3-r1"]
    assert [(e["reason"], e["round"], e["parent_id"], e["operation"]) for e in r3["eliminated"]] == [
        ("no_gain", 2, "r3-r1", ops[("r3", 2)])]
    assert r4.reason == "messages: the last user turn has no words to evolve"


def test_the_stage_runs_on_the_tiny_model_and_resumes(tmp_path):
    init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    rows = [json.loads(line) for line in open("recipes/tiny/data/prompts.jsonl").read().splitlines()[:3]]
    rows.append({"id": "broken", "messages": []})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generation = {"backend": "transformers", "model": str(tmp_path / "init"), "dtype": "float32", "n": 1,
                  "temperature": 1.0, "max_new_tokens": 4}  # each new token costs about 0.2 s over the 152K vocabulary
    recipe = _recipe(tmp_path, rounds=2, max_added_words=20, shard_size=2, generation=generation)
    manifest = run("evolve", recipe)
    counts, out, evolve = manifest["counts"], tmp_path / "run", manifest["evolve"]
    evolved = [json.loads(line) for line in (out / "evolved.jsonl").read_text().splitlines()]
    eliminated = [json.loads(line) for line in (out / "eliminated.jsonl").read_text().splitlines()]
    assert counts["rows_in"] == 4 and counts["quarantined_on_read"] == 1
    last_round = [r for r in evolved if r["meta"]["lineage"]["round"] == 2]
    assert len(last_round) + len(eliminated) + counts["quarantined_by_stage"] == 3
    assert evolve["roots_evolved_every_round"] == len(last_round) and evolve["roots_eliminated"] == len(eliminated)
    assert sum(evolve["eliminated_by_reason"].values()) == len(eliminated)
    cells = [c for ops in evolve["by_round"].values() for c in ops.values()]
    assert sum(c["produced"] for c in cells) == len(evolved)
    assert sum(n for c in cells for n in c["eliminated"].values()) == len(eliminated)
    for row in evolved:
        lineage = row["meta"]["lineage"]
        assert lineage["operation"] == pick_operation(recipe, lineage["root_id"], lineage["round"])
        assert row["id"] == f"{lineage['root_id']}-r{lineage['round']}"
    for record in eliminated:
        assert record["reason"] in evolve["eliminated_by_reason"] and record["instruction"] is not None

    # killed mid-run: the last shard and the assembled outputs gone; the resumed run writes the same bytes
    finished = {name: (out / name).read_bytes() for name in ("evolved.jsonl", "eliminated.jsonl")}
    for name in ("manifest.json", "evolved.jsonl", "eliminated.jsonl"):
        (out / name).unlink()
    (out / "shards" / "00001.jsonl").unlink()
    assert run("evolve", recipe)["shards"]["resumed"] == 1
    assert {name: (out / name).read_bytes() for name in finished} == finished
