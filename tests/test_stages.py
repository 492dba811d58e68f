"""The stage runner: shards, manifest, quarantine accounting, no-op re-runs, SIGKILL resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.stages import StageError
from qwen2_align.stage_table import load_recipe, run

N_PROMPTS = 18


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=0, num_hidden_layers=2,
                           initializer_range=0.3)


def _prompts(path: Path, bad: bool = True) -> Path:
    rows = [{"id": f"p{i:02d}", "messages": [{"role": "user", "content": f"Count to {i}."}], "source": "t", "meta": {}}
            for i in range(N_PROMPTS)]
    lines = [json.dumps(r) for r in rows]
    if bad:
        lines.insert(3, '{"id": "bad", "messages": [{"role": "assistant", "content": "no prompt"}]}')
        lines.insert(7, "not json at all")
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(tmp_path: Path, model_dir: Path, run_dir: Path, prompts: Path, **generation) -> Path:
    recipe = {
        "stage": "generate", "run_dir": str(run_dir), "seed": 7, "shard_size": 3,
        "inputs": {"prompts": str(prompts)},
        "generation": {"backend": "transformers", "model": str(model_dir), "dtype": "float32", "n": 2,
                       "temperature": 0.9, "max_new_tokens": 6, "batch_size": 4, **generation},
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(recipe: Path) -> subprocess.Popen:
    """The CLI in a process of its own, computing with this process's number of threads (the rounding of a CPU
    matmul depends on it), so its bytes can be compared with a run in this process."""
    return subprocess.Popen([sys.executable, "-m", "qwen2_align.cli", "generate", "--recipe", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})


def test_manifest_counts_and_noop_rerun(tmp_path, model_dir, capsys):
    prompts = _prompts(tmp_path / "prompts.jsonl")
    recipe = load_recipe(_recipe(tmp_path, model_dir, tmp_path / "run", prompts))
    manifest = run("generate", recipe)
    run_dir = tmp_path / "run"
    assert manifest["stage"] == "generate" and manifest["seed"] == 7
    assert manifest["inputs"]["prompts"]["rows"] == N_PROMPTS + 2
    assert len(manifest["inputs"]["prompts"]["sha256"]) == 64
    counts = manifest["counts"]
    assert counts["rows_in"] == N_PROMPTS + 2 and counts["quarantined_on_read"] == 2
    assert counts["processed"] + counts["quarantined_by_stage"] == N_PROMPTS
    assert counts["outputs"]["completions"] == counts["processed"]
    assert manifest["shards"] == {"total": 6, "resumed": 0, "size": 3}
    assert manifest["recipe"]["generation"]["temperature"] == 0.9
    assert {"torch", "transformers", "trl"} <= set(manifest["packages"])
    assert "git_commit" in manifest and manifest["duration_s"] > 0
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["shard_size"] == 3 and saved["generation"]["n"] == 2
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"p{i:02d}" for i in range(N_PROMPTS)]
    assert all(len(r["completions"]) == 2 for r in rows)
    quarantine = [json.loads(x) for x in (run_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [q["origin"] for q in quarantine] == [f"{prompts}:4", f"{prompts}:8"]
    assert quarantine[1]["reason"].startswith("malformed JSON")
    capsys.readouterr()
    assert run("generate", recipe)["fingerprint"] == manifest["fingerprint"]
    assert "nothing to do" in capsys.readouterr().out


def test_a_different_recipe_in_a_finished_run_dir_is_refused(tmp_path, model_dir):
    prompts = _prompts(tmp_path / "prompts.jsonl", bad=False)
    run("generate", load_recipe(_recipe(tmp_path, model_dir, tmp_path / "run", prompts, max_new_tokens=2)))
    with pytest.raises(StageError, match="holds a finished run of a different recipe"):
        run("generate", load_recipe(_recipe(tmp_path, model_dir, tmp_path / "run", prompts, max_new_tokens=3)))


def test_sigkill_then_resume_is_byte_identical(tmp_path, model_dir):
    prompts = _prompts(tmp_path / "prompts.jsonl")
    run("generate", load_recipe(_recipe(tmp_path, model_dir, tmp_path / "reference", prompts)))

    recipe = _recipe(tmp_path, model_dir, tmp_path / "killed", prompts)
    shards = tmp_path / "killed" / "shards"
    kill_after = random.Random(os.getpid()).randint(1, 4)  # of 6 shards
    proc = _cli(recipe)
    deadline = time.time() + 600
    while len(list(shards.glob("*.jsonl"))) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(shards.glob("*.jsonl")))
    assert done_before < 6 and not (tmp_path / "killed" / "manifest.json").exists()

    resumed = _cli(recipe)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming, {done_before} of 6 shards already done" in out
    for name in ("completions.jsonl", "quarantine.jsonl"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["shards"]["resumed"] == done_before
