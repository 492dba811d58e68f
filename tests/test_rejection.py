"""Rejection sampling: paths judged by their final answer, D and P rows with lineage, pass rates."""

import json

import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import read_rows
from data_synthesis.rejection import judge_paths, rejection_rows
from qwen2_align.demo.arithmetic import math_problems, question
from qwen2_align.stage_table import load_recipe, run

PROBLEM = {"id": "q1", "messages": question(3, 4), "source": "arithmetic", "meta": {"answer": "7"}}
PATHS = ["3 + 4 = 7.", "Counting on from 3: 4, 5, 6, 7. The answer is 7.", "3 + 4 = 7.", "3 + 4 = 8.",
         "I think \\boxed{12}", "no idea"]


def test_paths_are_judged_by_their_final_answer_and_deduplicated():
    judged = judge_paths("7", PATHS)
    assert judged.correct == PATHS[:2]  # the repeated correct path is kept once
    assert judged.incorrect == PATHS[3:]
    assert (judged.samples, judged.correct_samples) == (6, 3)


def test_rows_are_valid_d_and_p_with_lineage_and_pass_rates(tmp_path):
    rows = rejection_rows(PROBLEM, judge_paths("7", PATHS), pairs_per_problem=2, model="teacher", seed=5)
    assert [r["messages"][-1]["content"] for r in rows["demonstrations"]] == PATHS[:2]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows["preferences"]] == \
        [(PATHS[0], PATHS[3]), (PATHS[1], PATHS[4])]
    assert rows["demonstrations"][0]["meta"]["lineage"] == {"stage": "rejection", "model": "teacher", "seed": 5,
                                                           "parent_id": "q1", "verdict": "correct"}
    assert rows["scores"] == [{"id": "q1", "samples": 6, "correct_samples": 3, "pass@1": 0.5, "pass@k": 1.0}]
    for kind, name in (("demonstration", "demonstrations"), ("preference", "preferences")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        assert not read_rows(path, kind).quarantined  # the trainers take them as they are
    only_wrong = rejection_rows(PROBLEM, judge_paths("7", PATHS[3:]), 1, "teacher", 5)
    assert not only_wrong["demonstrations"] and not only_wrong["preferences"]
    assert only_wrong["scores"][0]["pass@k"] == 0.0


def test_the_stage_runs_on_the_tiny_model_and_reports_pass_rates(tmp_path):
    model = init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    problems = math_problems(6, seed=0)
    problems.append({"id": "no-answer", "messages": question(1, 1), "source": "", "meta": {}})
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems))
    recipe = tmp_path / "rejection.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "rejection", "run_dir": str(tmp_path / "run"), "seed": 0, "shard_size": 4,
        "inputs": {"problems": str(tmp_path / "problems.jsonl")}, "pairs_per_problem": 1,
        "generation": {"backend": "transformers", "model": str(model), "dtype": "float32", "n": 3,
                       "temperature": 1.0, "max_new_tokens": 8},
    }))
    manifest = run("rejection", load_recipe(recipe))
    assert manifest["counts"]["processed"] == 6 and manifest["counts"]["quarantined_by_stage"] == 1
    assert manifest["counts"]["outputs"]["scores"] == 6
    scores = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert manifest["pass_rates"]["problems"] == 6 and manifest["pass_rates"]["k"] == 3
    assert manifest["pass_rates"]["mean_pass@1"] == sum(s["pass@1"] for s in scores) / 6
    assert all(s["samples"] == 3 for s in scores)
