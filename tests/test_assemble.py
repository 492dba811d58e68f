"""Assembly: finished synthesis runs merged into the training inputs (dedup by content across runs and shards,
decontaminated, lineage kept, resumable), and `push-data`'s folder read back by `datasets`."""

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from alignment.data import load_jsonl, read_rows, write_rows
from alignment.stages import StageError, write_manifest
from data_synthesis.assemble import AssembleStage
from data_synthesis.decontam import ContaminationCheck
from qwen2_align.cli import main
from qwen2_align.hub import decode_row
from qwen2_align.stage_table import load_recipe, run

SECRET = "hf_thisIsNotARealTokenButMustNeverBeWritten"
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
SOLUTION = ("    return sorted(set(x for x in values if x % 2 == 0 and x > limit), reverse=True)[:count]"
            " + [limit, count]\n")


def _d(row_id, user, reply, **lineage):
    return {"id": row_id, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
            "source": "synth", "meta": {"lineage": lineage} if lineage else {}}


def _p(row_id, user, chosen, rejected, **lineage):
    return {"id": row_id, "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "source": "synth", "meta": {"lineage": lineage, "extra": [1, {"x": None}]}}


def _finished_run(root: Path, name: str, stage: str, demonstrations=None, preferences=None) -> Path:
    """A run as a synthesis stage leaves it: D / P files and a manifest, written by the runtime's own writers."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    for output, rows in (("demonstrations", demonstrations), ("preferences", preferences)):
        if rows is not None:
            write_rows(run_dir / f"{output}.jsonl", rows)
    write_manifest(run_dir, {"stage": stage, "fingerprint": f"fp-{name}", "run_dir": str(run_dir),
                             "recipe": {"stage": stage, "run_dir": str(run_dir), "seed": 7}})
    return run_dir


def _runs(root: Path) -> list[str]:
    rej = dict(stage="rejection", model="teacher-a", seed=0)
    con = dict(stage="constitution", model="teacher-b", seed=3)
    rejection = _finished_run(root, "rejection", "rejection", demonstrations=[
        _d("q0-c0", "What is 2 + 2?", "2 + 2 = 4.", parent_id="q0", **rej),
        _d("q1-c0", f"Solve: {QUESTION}", "72 clips.", parent_id="q1", **rej),  # contaminated (gsm8k)
        {"id": "bad", "messages": [{"role": "user", "content": "no reply"}], "source": "synth", "meta": {}},
        _d("q2-c0", "What is 3 + 5?", "3 + 5 = 8.", parent_id="q2", **rej),
        _d("q3-c0", "Write the filter.", f"def f(values, limit, count):\n{SOLUTION}", parent_id="q3", **rej),
    ], preferences=[_p("q0-p0", "What is 2 + 2?", "2 + 2 = 4.", "5", parent_id="q0", **rej)])
    constitution = _finished_run(root, "constitution", "constitution", demonstrations=[
        _d("s0-d", "What  is 2 + 2? ", "2 + 2 =  4.", parent_id="s0", **con),  # a copy of q0-c0 (white space)
        _d("s1-d", "Is it safe to mix bleach and vinegar?", "No: it releases chlorine gas.", parent_id="s1", **con),
        _d("s2-d", "What is 3 + 5?", "3 + 5 = 8.", parent_id="s2", **con),  # a copy of q2-c0, in another shard
        {"id": "text-row", "text": "plain text is not a conversation", "source": "synth", "meta": {}},
    ], preferences=[
        _p("s0-p", "What is 2 + 2?", "2 + 2 = 4.", "5", parent_id="s0", **con),  # a copy of q0-p0
        _p("s1-p", "Is it safe to mix bleach and vinegar?", "No.", "Yes, go ahead.", parent_id="s1", **con),
    ])
    return [str(rejection), str(constitution / "demonstrations.jsonl"), str(constitution / "preferences.jsonl")]


def _recipe(tmp_path: Path, run_dir: str = "assemble", shard_size: int = 2, runs=None) -> Path:
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    write_rows(tests / "gsm8k.jsonl", [{"question": "What is 1 + 1?", "answer": "2"},
                                       {"question": QUESTION, "answer": "#### 72"}])
    write_rows(tests / "humaneval.jsonl", [{"task_id": "H/0", "prompt": "def f(values, limit, count):\n",
                                            "canonical_solution": SOLUTION, "test": "", "entry_point": "f"}])
    recipe = {"stage": "assemble", "run_dir": str(tmp_path / run_dir), "shard_size": shard_size,
              "runs": runs if runs is not None else _runs(tmp_path / "runs"),
              "inputs": {"gsm8k": str(tests / "gsm8k.jsonl"), "humaneval": str(tests / "humaneval.jsonl")}}
    path = tmp_path / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


OUTPUTS = ("demonstrations", "preferences", "duplicates", "contaminated", "quarantine")


def _outputs(run_dir: Path) -> dict[str, str]:
    return {name: (run_dir / f"{name}.jsonl").read_text() for name in OUTPUTS}


def test_merge_dedups_decontaminates_quarantines_and_keeps_lineage(tmp_path):
    manifest = run("assemble", load_recipe(_recipe(tmp_path)))
    out = {name: load_jsonl(tmp_path / "assemble" / f"{name}.jsonl") for name in OUTPUTS}
    assert [r["id"] for r in out["demonstrations"]] == ["rejection/q0-c0", "rejection/q2-c0", "constitution/s1-d"]
    assert [r["id"] for r in out["preferences"]] == ["rejection/q0-p0", "constitution/s1-p"]
    assert {(r["id"], r["duplicate_of"]) for r in out["duplicates"]} == {
        ("constitution/s0-d", "rejection/q0-c0"), ("constitution/s2-d", "rejection/q2-c0"),
        ("constitution/s0-p", "rejection/q0-p0")}
    assert {(r["id"], r["test_set"], r["rule"]) for r in out["contaminated"]} == {
        ("rejection/q1-c0", "gsm8k", "ngram"), ("rejection/q3-c0", "humaneval", "ngram")}  # by the solution
    assert sorted(r["row"]["id"] for r in out["quarantine"]) == ["bad", "text-row"]
    # every output row keeps the synthesis lineage under the assembly's, and the readers take them as they are
    first = out["demonstrations"][0]
    assert first["meta"]["lineage"] == {"stage": "assemble", "parent_id": "q0-c0",
                                        "source_run": str(tmp_path / "runs/rejection"), "source_stage": "rejection",
                                        "source_fingerprint": "fp-rejection",
                                        "previous": {"stage": "rejection", "model": "teacher-a", "seed": 0,
                                                     "parent_id": "q0"}}
    for name, kind in (("demonstrations", "demonstration"), ("preferences", "preference")):
        read = read_rows(tmp_path / "assemble" / f"{name}.jsonl", kind)
        assert not read.quarantined and len(read.rows) == len(out[name])
    # rows in = rows out + duplicates + contaminated + quarantined, per source and in all
    counts = manifest["counts"]
    assert counts["rows_in"] == 12 == sum(len(out[n]) for n in OUTPUTS)
    sources = manifest["sources"]
    assert sources[str(tmp_path / "runs/rejection")]["outputs"]["demonstrations"] == {
        "rows_in": 5, "kept": 2, "duplicates": 0, "contaminated": 2, "quarantined": 1}
    assert sources[str(tmp_path / "runs/constitution")]["outputs"]["demonstrations"] == {
        "rows_in": 4, "kept": 1, "duplicates": 2, "contaminated": 0, "quarantined": 1}
    assert sources[str(tmp_path / "runs/constitution")]["recipe"]["seed"] == 7
    assert manifest["duplicates"] == 3
    assert manifest["test_sets"]["gsm8k"]["contaminated_train_rows"] == {"ngram": 1, "lcs": 0}
    assert manifest["lineage"]["demonstrations"] == {"rows": 3, "by_stage": {"constitution": 1, "rejection": 2},
                                                     "by_model": {"teacher-a": 2, "teacher-b": 1},
                                                     "by_seed": {"0": 2, "3": 1}}


def test_outputs_do_not_depend_on_sharding_and_resume_after_a_kill_is_identical(tmp_path, monkeypatch):
    runs = _runs(tmp_path / "runs")
    run("assemble", load_recipe(_recipe(tmp_path, "whole", shard_size=1000, runs=runs)))
    whole = _outputs(tmp_path / "whole")
    recipe = load_recipe(_recipe(tmp_path, "killed", shard_size=2, runs=runs))
    process = AssembleStage.process

    def dies_at_shard_3(self, rows, ctx):
        if ctx.index == 3:
            raise KeyboardInterrupt  # what the run sees of a kill: nothing after the finished shards is written
        return process(self, rows, ctx)

    monkeypatch.setattr(AssembleStage, "process", dies_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        run("assemble", recipe)
    assert len(list((tmp_path / "killed" / "shards").glob("*.jsonl"))) == 3
    assert not (tmp_path / "killed" / "manifest.json").exists()
    monkeypatch.setattr(AssembleStage, "process", process)
    manifest = run("assemble", recipe)
    assert manifest["shards"]["resumed"] == 3
    assert _outputs(tmp_path / "killed") == whole  # byte-identical, the cross-shard duplicates included


def test_a_listed_run_that_is_not_finished_is_a_one_line_error(tmp_path, capsys):
    runs = _runs(tmp_path / "runs")
    (tmp_path / "runs" / "half").mkdir()
    path = _recipe(tmp_path, runs=[*runs, str(tmp_path / "runs" / "half")])
    with pytest.raises(StageError, match=r"runs\[3\]: .*half: not a finished run \(no manifest.json\)"):
        run("assemble", load_recipe(path))
    assert main(["assemble", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "half: not a finished run" in err
    assert not (tmp_path / "assemble").exists()


def test_push_data_dry_run_round_trips_through_load_dataset_without_the_token(tmp_path, monkeypatch, capsys):
    run("assemble", load_recipe(_recipe(tmp_path)))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = tmp_path / "up"
    assert main(["push-data", "--run", str(tmp_path / "assemble"), "--repo", "me/tiny-data", "--dry-run",
                 "--out", str(folder), "--license", "cc-by-4.0"]) == 0
    assert "would upload" in capsys.readouterr().out
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {
        "README.md", "data/demonstrations-00000-of-00001.parquet", "data/preferences-00000-of-00001.parquet"}
    for split in ("demonstrations", "preferences"):
        # a cache of its own: datasets' cache key for a local folder can match an earlier test run's folder
        loaded = datasets.load_dataset(str(folder), split, split="train", cache_dir=str(tmp_path / "hf-cache"))
        assert [decode_row(r) for r in loaded] == load_jsonl(tmp_path / "assemble" / f"{split}.jsonl")
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "cc-by-4.0"
    assert [c["config_name"] for c in front["configs"]] == ["demonstrations", "preferences"]
    for line in ("| `{}` | rejection | demonstrations | 5 | 2 | 0 | 2 | 1 |".format(tmp_path / "runs/rejection"),
                 "| `{}` | constitution | preferences | 2 | 1 | 1 | 0 | 0 |".format(tmp_path / "runs/constitution"),
                 "| demonstrations | 3 |", "| preferences | 2 |", "| `teacher-b` | 1 |", "Duplicates dropped: 3",
                 "### assemble", "### rejection (", "### constitution ("):
        assert line in card, line
    for path in [*folder.rglob("*"), *(tmp_path / "assemble").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_push_data_refuses_a_run_that_is_not_an_assembly(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, "rejection", "rejection", demonstrations=[_d("a", "Hi?", "Hello.")])
    assert main(["push-data", "--run", str(run_dir), "--repo", "me/x", "--dry-run"]) == 2
    assert "a rejection run; push-data publishes an assemble run" in capsys.readouterr().err


def test_unreachable_hub_is_one_line_without_the_token(tmp_path):
    run("assemble", load_recipe(_recipe(tmp_path)))
    env = {**os.environ, "HF_TOKEN": SECRET, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2"}
    out = subprocess.run([sys.executable, "-m", "qwen2_align.cli", "push-data", "--run", str(tmp_path / "assemble"),
                          "--repo", "me/tiny-data", "--out", str(tmp_path / "up")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen2-align: push to me/tiny-data at http://127.0.0.1:9 failed:")
    assert "Traceback" not in out.stderr and SECRET not in out.stdout + out.stderr


def test_tiny_test_sets_catch_the_tiny_repurpose_rows():
    for stage in ("decontam", "assemble"):  # the world's held-out split (`make world`) and one shipped set
        recipe = load_recipe(f"recipes/tiny/{stage}.yaml")
        tests = {k: v for k, v in recipe.inputs.items() if k != "train"}
        assert {"arithmetic", "code", "constraints", "literature_qa"} <= set(tests), stage
    tests = {"literature_qa": tests["literature_qa"]}
    # repurpose answers with the passage itself: the literature_qa item quoting Austen's opening catches it
    check = ContaminationCheck(recipe, {name: load_jsonl(path) for name, path in tests.items()})
    passages = load_jsonl("recipes/tiny/data/literature.jsonl")
    rows = [_d(p["id"], "Write the opening of a novel.", p["text"]) for p in passages]
    hits = {row["id"]: match and match["test_set"] for row, match in zip(rows, check.matches(rows))}
    assert hits["austen-pride-1"] == "literature_qa" and list(hits.values()).count(None) == len(rows) - 1
