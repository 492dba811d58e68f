"""Execution feedback for instruction following: seed constraint checkers on known-right and known-wrong
responses in the real sandbox, model-written checkers cross-validated (wrong, raising, looping and lying ones
rejected), D/P selection by pass rate, and the stage end to end on a tiny model, resumed after a kill."""

import json
import random

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import Quarantined, read_rows
from alignment.recipe_loader import RecipeError
from data_synthesis.execution import (ExecutionStage, constraint_checks, cross_validate, row_constraints,
                                      select_responses, teacher_checker)
from qwen2_align.stage_table import load_recipe, run
from reward import sandbox
from reward.sandbox import SandboxSpec
from reward.constraints import (SEED_KINDS, CheckerVerdicts, ConstraintError, constrained_prompt, constraint_from_spec,
                                constraints_from_specs, draw_constraints, make_constraint, run_checkers)

needs_bwrap = pytest.mark.skipif(sandbox.sandbox_unavailable_reason() is not None,
                                 reason=f"sandbox unavailable: {sandbox.sandbox_unavailable_reason()}")

NO_COMMAS_RIGHT = "def evaluate(response):\n    return ',' not in response and '\\uff0c' not in response\n"
NO_COMMAS_RIGHT_TOO = "def evaluate(response: str) -> bool:\n    return not any(c in response for c in ',\\uff0c')\n"
WRONG = "def evaluate(response):\n    return True\n"
RAISES = "def evaluate(response):\n    return response[1000] != ','\n"
LOOPS = "def evaluate(response):\n    while True:\n        pass\n"
NOT_BOOL = "def evaluate(response):\n    return int(',' not in response)\n"


def _judge(checkers, texts, timeout=2.0):
    [verdicts], _ = run_checkers([(checkers, texts)], SandboxSpec(timeout_s=timeout, memory_mb=256, workers=1))
    return verdicts


def test_seed_kinds_cover_ifeval_and_draws_are_deterministic_and_compatible():
    assert len(SEED_KINDS) >= 12
    for seed in range(30):
        drawn = draw_constraints(random.Random(seed), 3)
        assert len({c.kind for c in drawn}) == 3
        assert not {c.kind for c in drawn} >= {"lowercase", "capitals"}
        assert drawn == draw_constraints(random.Random(seed), 3)
    row = {"id": "r1", "messages": [{"role": "user", "content": "Hi."}], "meta": {}}
    assert row_constraints(row, 0, 2, []) == row_constraints(row, 0, 2, [])  # by (seed, id): resume draws the same
    assert {c.kind for c in draw_constraints(random.Random(0), 2, ["title", "no_commas"])} == {"title", "no_commas"}
    with pytest.raises(ValueError, match="constraints_per_prompt"):
        draw_constraints(random.Random(0), 2, ["lowercase", "capitals"])
    prompt = constrained_prompt(row, [make_constraint("no_commas", {})])
    assert prompt[-1]["content"] == "Hi.\n\nIn your entire response, refrain from the use of any commas."


@needs_bwrap
def test_every_seed_checker_agrees_with_its_cases_and_known_responses_in_one_sandbox_job():
    constraints = [make_constraint(k, kind.draw(random.Random(seed))) for seed in range(3)
                   for k, kind in SEED_KINDS.items()]
    known = [  # (spec, response, follows)
        ({"kind": "include_keywords", "keywords": ["river"]}, "The River runs.", True),
        ({"kind": "include_keywords", "keywords": ["river"]}, "Rivers run.", False),
        ({"kind": "number_words", "relation": "at most", "num_words": 3}, "One two, three!", True),
        ({"kind": "number_words", "relation": "at least", "num_words": 3}, "One two.", False),
        ({"kind": "number_sentences", "relation": "at least", "num_sentences": 2}, "It costs 3.50 dollars.", False),
        ({"kind": "number_paragraphs", "num_paragraphs": 2}, "First.\n***\nSecond.", True),
        ({"kind": "number_bullets", "num_bullets": 2}, "* a\n* b\n* c", False),
        ({"kind": "title"}, "<<Sea>>\nWaves.", True),
        ({"kind": "json_format"}, '```json\n{"answer": 4}\n```', True),
        ({"kind": "json_format"}, "Answer: 4", False),
        ({"kind": "end_phrase", "end_phrase": "Any other questions?"}, "Done. Any other questions?  ", True),
        ({"kind": "postscript"}, "Bye.\nP.S. See you.", True),
        ({"kind": "no_commas"}, "Yes, no.", False),
    ]
    spec_constraints = [constraint_from_spec(spec) for spec, _, _ in known]
    checkers = [c.checker for c in constraints + spec_constraints]
    texts = [text for c in constraints for text, _ in c.cases] + [text for _, text, _ in known]
    verdicts = _judge(checkers, texts)
    assert verdicts.status == "ok" and verdicts.errors == [None] * len(checkers)
    start = 0
    for row, c in enumerate(constraints):
        assert verdicts.verdicts[row][start:start + len(c.cases)] == [e for _, e in c.cases], (c.kind, c.params)
        start += len(c.cases)
    for k, (_, _, follows) in enumerate(known):
        assert verdicts.verdicts[len(constraints) + k][start + k] is follows, known[k]


def test_bad_specs_give_one_line_errors_naming_the_field():
    cases = [
        ([{"kind": "no_comas"}], r"meta.constraints\[0\].kind: unknown kind 'no_comas'"),
        ([{"kind": "no_commas"}, {"kind": "number_words", "relation": "at least"}],
         r"meta.constraints\[1\].num_words: required parameter of number_words is missing"),
        ([{"kind": "number_words", "relation": "about", "num_words": 5}],
         r"meta.constraints\[0\].relation: expected one of \['at least', 'at most'\], got 'about'"),
        ([{"kind": "number_words", "relation": "at least", "num_words": "fifty"}],
         r"meta.constraints\[0\].num_words: expected an int from 1 to 2000, got 'fifty'"),
        ([{"kind": "no_commas", "count": 1}], r"meta.constraints\[0\].count: not a parameter of no_commas"),
        ([{"instruction": ""}], r"meta.constraints\[0\].instruction: expected a non-empty string"),
        ([{"kind": "lowercase"}, {"kind": "capitals"}], "kinds 'lowercase' and 'capitals' conflict"),
        ([{"kind": "title"}, {"kind": "title"}], "kind 'title' is listed twice"),
        ([], "meta.constraints: expected a non-empty list"),
    ]
    for specs, message in cases:
        with pytest.raises(ConstraintError, match=message) as e:
            constraints_from_specs(specs)
        assert "\n" not in str(e.value)
    free = constraint_from_spec({"instruction": " Mention a cat. "})
    assert (free.kind, free.description, free.checker, free.cases) == ("instruction", "Mention a cat.", None, [])


@needs_bwrap
def test_wrong_raising_looping_and_lying_checkers_are_rejected_and_the_rest_judged():
    fake_marker = ("def evaluate(response):\n    import sys\n"
                   "    print('verdicts-0:{\"verdicts\": [[true]], \"errors\": [null]}', flush=True)\n"
                   "    sys.stdout.write('\\n'); return ',' not in response\n")
    exits = "import sys\nsys.exit(0)\n"
    replies = [f"```python\n{code}```\n```json\n" + json.dumps([{"response": "a, b", "follows": False},
                                                              {"response": "a b", "follows": True}]) + "\n```"
               for code in (NO_COMMAS_RIGHT_TOO, WRONG, RAISES, LOOPS, NOT_BOOL, fake_marker, exits)]
    checks = constraint_checks(make_constraint("no_commas", {}), replies)
    assert len(checks.teacher) == 6 and checks.written == 7  # `exits` defines no evaluate: not a checker
    texts = [text for text, _ in checks.cases]
    verdicts = _judge(checks.checkers, texts, timeout=1.0)
    assert verdicts.status == "ok"
    kept = cross_validate(checks, verdicts.verdicts, verdicts.errors, 0.8)
    assert kept == [True, False, False, False, False, True]  # the liar's lie went nowhere; its verdicts are right
    assert "timed out" in verdicts.errors[4] and "IndexError" in verdicts.errors[3]
    assert "not bool" in verdicts.errors[5]
    # a seed kind's teacher case that its trusted checker contradicts is left out, not held against checkers
    bad_case = "```python\n" + NO_COMMAS_RIGHT + "```\n```json\n[{\"response\": \"a b\", \"follows\": false}]\n```"
    checks = constraint_checks(make_constraint("no_commas", {}), [bad_case])
    verdicts = _judge(checks.checkers, [text for text, _ in checks.cases])
    assert cross_validate(checks, verdicts.verdicts, verdicts.errors, 0.8) == [True]


def test_three_copies_of_one_checker_are_one_distinct_checker_and_a_free_text_row_is_quarantined(tmp_path):
    copies = [NO_COMMAS_RIGHT, NO_COMMAS_RIGHT.replace("    return", "    # no commas\n    return"),
              NO_COMMAS_RIGHT.replace("'", '"')]
    replies = [f"```python\n{code}```\n```json\n[{{\"response\": \"a, b\", \"follows\": false}}]\n```"
               for code in copies]
    assert teacher_checker(replies[0]) == (NO_COMMAS_RIGHT.rstrip("\n"), [("a, b", False)])
    free = constraint_from_spec({"instruction": "Use no commas."})
    checks = constraint_checks(free, replies)
    assert len(checks.teacher) == 1 and len(checks.cases) == 3
    stage = _stage(tmp_path, teacher_checkers=3)
    row = {"id": "r", "messages": [{"role": "user", "content": "Hi."}], "source": "t", "meta": {}}
    judged = CheckerVerdicts([[True, False, False, False, False]], [None], "ok")  # 2 replies, 3 cases
    out = stage._instruction_rows(row, row["messages"], [checks], ["x", "y"], judged, 0)
    assert isinstance(out, Quarantined) and "too few checkers: 1 distinct teacher checkers" in out.reason
    rewritten = [replies[0].replace("',' not in", "response.count(',') == 0 and ',' not in"),
                 replies[0].replace("',' not in response", "response.find(',') < 0")]
    distinct = constraint_checks(free, [replies[0], *rewritten])
    assert len(distinct.teacher) == 3
    judged = CheckerVerdicts([[True, False, False, False, False]] * 3, [None] * 3, "ok")
    assert not isinstance(stage._instruction_rows(row, row["messages"], [distinct], ["x", "y"], judged, 0),
                          Quarantined)


def test_d_and_p_by_pass_rate_on_hand_built_verdicts(tmp_path):
    assert select_responses(["a", "b", "c", "a", " ", "d"], [1.0, 0.5, 0.0, 1.0, 0.0, 0.0], 0.5) == (
        [("a", 1.0)], [("a", 1.0, "c"), ("b", 0.5, "d")])
    assert select_responses(["a", "b"], [0.4, 0.0], 0.5) == ([], [])  # 0.4 is not a chosen
    stage = _stage(tmp_path)
    row = {"id": "r", "messages": [{"role": "user", "content": "Hi."}], "source": "t", "meta": {"keep": 1}}
    constraints = [make_constraint("no_commas", {}), make_constraint("title", {})]
    checks = [constraint_checks(c, []) for c in constraints]
    prompt = constrained_prompt(row, constraints)
    replies = ["<<T>> ok", "<<T>>, no", "none, at all", "plain"]
    cases = [len(c.cases) for c in constraints]
    judged = CheckerVerdicts([[True, False, False, True] + [True] * sum(cases),
                              [True, True, False, False] + [True] * sum(cases)], [None, None], "ok")
    out = stage._instruction_rows(row, prompt, checks, replies, judged, 3)
    assert [d["messages"][-1]["content"] for d in out["demonstrations"]] == ["<<T>> ok"]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in out["preferences"]] == [
        ("<<T>> ok", "none, at all")]
    assert out["demonstrations"][0]["messages"][:-1] == prompt
    lineage = out["preferences"][0]["meta"]["lineage"]
    assert out["preferences"][0]["meta"]["keep"] == 1
    assert lineage == {"stage": "execution", "model": str(tmp_path / "init"), "seed": 3, "parent_id": "r",
                       "kind": "instruction_following", "constraints": [{"kind": "no_commas"}, {"kind": "title"}],
                       "chosen_pass_rate": 1.0, "rejected_pass_rate": 0.0}
    score = out["scores"][0]
    assert score["pass_rates"] == [1.0, 0.5, 0.0, 0.5] and score["followed_all"] == 1
    assert [c["followed"] for c in score["constraints"]] == [2, 2]


def _recipe(tmp_path, **extra) -> dict:
    return {"stage": "execution", "run_dir": str(tmp_path / "run"), "seed": 0, "shard_size": 2,
            "inputs": {"tasks": str(tmp_path / "tasks.jsonl")}, "kind": "instruction_following",
            "sandbox": {"timeout_s": 2.0, "memory_mb": 256, "workers": 2},
            "generation": {"backend": "transformers", "model": str(tmp_path / "init"), "dtype": "float32", "n": 2,
                           "temperature": 1.0, "max_new_tokens": 8}, **extra}


def _stage(tmp_path, **extra) -> ExecutionStage:
    path = tmp_path / "execution-if.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, **extra)))
    return ExecutionStage(load_recipe(path))


def test_recipe_fields_are_validated_and_code_refuses_instruction_following_fields(tmp_path):
    for preset in ("tiny", "qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"):
        assert load_recipe(f"recipes/{preset}/execution-if.yaml").kind == "instruction_following"
    path = tmp_path / "r.yaml"
    for change, expected in (({"constraint_kinds": ["no_comas"]}, "constraint_kinds: unknown kind 'no_comas'"),
                             ({"constraint_kinds": ["lowercase", "capitals"]}, "constraints_per_prompt: no 2 kinds"),
                             ({"checker_min_accuracy": 1.5}, "checker_min_accuracy: must be > 0 and <= 1"),
                             ({"min_checkers": 0}, "min_checkers: must be >= 1"),
                             ({"kind": "code", "teacher_checkers": 3},
                              "teacher_checkers: applies to kind instruction_following only")):
        path.write_text(yaml.safe_dump(_recipe(tmp_path, **change)))
        with pytest.raises(RecipeError, match=expected) as e:
            load_recipe(path)
        assert "\n" not in str(e.value)


@needs_bwrap
def test_the_stage_runs_on_the_tiny_model_and_resumes(tmp_path):
    init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": text}], "source": "t", "meta": {}}
            for i, text in enumerate(["Describe the sea.", "Name a colour."])]
    rows.append({"id": "easy", "messages": [{"role": "user", "content": "Say anything."}], "source": "t",
                 "meta": {"constraints": [{"kind": "forbidden_words", "forbidden_words": ["xylophonist"]}]}})
    rows.append({"id": "free", "messages": [{"role": "user", "content": "Say hi."}], "source": "t",
                 "meta": {"constraints": [{"instruction": "Say hi twice."}]}})
    rows.append({"id": "bad", "messages": [{"role": "user", "content": "Say hi."}], "source": "t",
                 "meta": {"constraints": [{"kind": "shouting"}]}})
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "execution-if.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, teacher_checkers=1)))
    manifest = run("execution", load_recipe(path))
    counts, info, out = manifest["counts"], manifest["execution"], tmp_path / "run"
    assert counts["processed"] + counts["quarantined_by_stage"] == len(rows)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {q["origin"]: q["reason"].split(":")[0] for q in quarantine} == {
        "free": "meta.constraints[0]", "bad": "meta.constraints[0].kind"}
    assert info["dropped_too_few_checkers"] == 1 and info["instructions"] == 3 == counts["processed"]
    assert info["responses_checked"] == 6 and info["sandbox_executions"] == 4  # the free row ran, then was dropped
    assert info["teacher_checkers_written"] == 5  # p0 and p1 draw 2 constraints, easy has 1: one reply each
    assert info["pass_rate_by_kind"]["forbidden_words"] == 1.0  # random tokens never spell the word
    demos = read_rows(out / "demonstrations.jsonl", "demonstration")
    assert not demos.quarantined and any(d["meta"]["lineage"]["parent_id"] == "easy" for d in demos.rows)
    for d in demos.rows:
        assert d["meta"]["lineage"]["pass_rate"] == 1.0 and d["meta"]["lineage"]["constraints"]
        assert d["messages"][0]["content"].startswith(next(r for r in rows if r["id"] == d["meta"]["lineage"][
            "parent_id"])["messages"][0]["content"] + "\n\n")
    prefs = read_rows(out / "preferences.jsonl", "preference")
    assert not prefs.quarantined
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert info["following_all_rate"] == sum(s["followed_all"] for s in scores) / 6

    # killed mid-run: the last shard and the assembled outputs gone; the resumed run writes the same bytes
    names = ("demonstrations.jsonl", "preferences.jsonl", "scores.jsonl", "quarantine.jsonl")
    finished = {name: (out / name).read_bytes() for name in names}
    for name in ("manifest.json", *names):
        (out / name).unlink()
    (out / "shards" / "00001.jsonl").unlink()
    resumed = run("execution", load_recipe(path))
    assert resumed["shards"]["resumed"] == 2
    assert {name: (out / name).read_bytes() for name in names} == finished
    assert resumed["execution"]["dropped_too_few_checkers"] == 1
