"""Shards on Ray workers: the same bytes as in-process, a killed worker's shard run again, a killed driver resumed
(slow: a second interpreter)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from alignment.checkpoint import init_checkpoint
from qwen2_align.demo.arithmetic import math_problems
from qwen2_align.stage_table import load_recipe, run
from reward import sandbox

ray = pytest.importorskip("ray")

STAGES = ("generate", "rejection", "execution", "decontam", "responses")
SHARDS = 5  # of 2 rows each, for every stage
LONG_TEST_ITEM = "the quick brown fox jumps over the lazy dog while seven silver swans swim slowly across the lake"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance with 2 CPUs for the module; its address lets a CLI driver join it."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    init_checkpoint("tiny", folder / "model", seed=0, num_hidden_layers=1, initializer_range=0.3)
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i} twice."}], "source": "t",
                "meta": {}} for i in range(2 * SHARDS)]
    prompts[3]["messages"][0]["content"] = LONG_TEST_ITEM  # decontam sets it aside
    tasks = [json.loads(line) for line in Path("recipes/tiny/data/code_tasks.jsonl").read_text().splitlines()]
    for name, rows in {"prompts": prompts, "problems": math_problems(2 * SHARDS, seed=1),
                       "tasks": (tasks * 2)[: 2 * SHARDS], "test_set": [{"question": LONG_TEST_ITEM, "answer": "-"}]
                       }.items():
        if name == "tasks":
            rows = [dict(row, id=f"{row['id']}-{i}") for i, row in enumerate(rows)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _recipe(inputs: Path, stage: str, run_dir: Path, executor: dict) -> Path:
    generation = {"backend": "transformers", "model": str(inputs / "model"), "dtype": "float32", "n": 3,
                  "temperature": 1.0, "max_new_tokens": 12, "batch_size": 8}
    recipe = {"stage": stage, "run_dir": str(run_dir), "seed": 3, "shard_size": 2, "executor": executor}
    recipe |= {
        "generate": {"inputs": {"prompts": str(inputs / "prompts.jsonl")}, "generation": generation},
        "rejection": {"inputs": {"problems": str(inputs / "problems.jsonl")}, "generation": generation},
        "execution": {"inputs": {"tasks": str(inputs / "tasks.jsonl")}, "kind": "code", "generation": generation,
                      "sandbox": {"timeout_s": 2.0, "memory_mb": 256, "workers": 1}},
        "decontam": {"inputs": {"train": str(inputs / "prompts.jsonl"), "test": str(inputs / "test_set.jsonl")}},
        "responses": {"inputs": {"instructions": str(inputs / "prompts.jsonl")},  # two engines: one per worker
                      "generators": [generation | {"strategy": "greedy", "n": 1, "temperature": 0.0},
                                     generation | {"strategy": "sampled", "n": 2}]},
    }[stage]
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


RAY = {"kind": "ray", "workers": 2}


@pytest.fixture(scope="module")
def local_runs(inputs, tmp_path_factory) -> dict[str, Path]:
    """Each stage run in-process: the bytes every Ray run must write."""
    folder = tmp_path_factory.mktemp("local")
    runs = {}
    for stage in STAGES:
        if stage == "execution" and sandbox.sandbox_unavailable_reason() is not None:
            continue
        runs[stage] = folder / stage
        run(stage, load_recipe(_recipe(inputs, stage, runs[stage], {"kind": "local"})))
    return runs


def _assert_same_files(run_dir: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("*.jsonl"))
    assert names == sorted(p.name for p in run_dir.glob("*.jsonl"))
    for name in names:
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name


def _busy_worker_pids() -> list[int]:
    """Ray names a worker process after what it runs: these are in the middle of a shard."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::ShardWorker.process"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _run_killing_a_worker(stage: str, recipe) -> tuple[dict, int | None]:
    """Run the stage in a thread and SIGKILL the first worker seen in the middle of a shard."""
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(manifest=run(stage, recipe)))
    driver.start()
    killed = None
    while driver.is_alive() and killed is None:
        if busy := _busy_worker_pids():
            os.kill(busy[0], signal.SIGKILL)
            killed = busy[0]
        time.sleep(0.01)
    driver.join(timeout=300)
    return result["manifest"], killed


@pytest.mark.parametrize("stage", STAGES)
def test_two_ray_workers_write_the_bytes_of_the_in_process_run(stage, cluster, inputs, local_runs, tmp_path):
    """rejection: one worker is SIGKILLed mid-shard; its shard runs again on a replacement, the bytes the same."""
    if stage not in local_runs:
        pytest.skip(f"sandbox unavailable: {sandbox.sandbox_unavailable_reason()}")
    recipe = load_recipe(_recipe(inputs, stage, tmp_path / stage, RAY))
    if stage == "rejection":
        manifest, killed = _run_killing_a_worker(stage, recipe)
        assert killed is not None, "no worker was seen in the middle of a shard"
    else:
        manifest = run(stage, recipe)
    _assert_same_files(tmp_path / stage, local_runs[stage])
    reference = json.loads((local_runs[stage] / "manifest.json").read_text())
    assert manifest["counts"] == reference["counts"]
    executor = manifest["executor"]
    workers = executor["workers"]
    assert executor["kind"] == "ray" and len({w["pid"] for w in workers.values()} | {os.getpid()}) == len(workers) + 1
    # a lost shard is counted where it finished; responses' shards are in two parts, one per engine's worker
    assert sum(w["shards"] for w in workers.values()) == SHARDS * executor["engines"]
    if stage == "rejection":  # the dead worker's shard, and the one queued behind it, ran on a replacement
        assert executor["workers_started"] == 3 and 1 <= len(executor["retries"]) <= 2
        assert {r["worker"] for r in executor["retries"]} in ({"worker-0"}, {"worker-1"})
    else:
        assert executor["retries"] == [] and executor["workers_started"] == 2
    if stage == "execution":  # the sandbox ran on the workers, and their counts reached the manifest
        assert manifest["execution"]["sandbox_executions"] == reference["execution"]["sandbox_executions"] > 0
    if stage == "responses":
        assert sorted(workers) == ["worker-0-engine-0", "worker-1-engine-1"]
    if stage == "decontam":
        assert [json.loads(line)["id"] for line in (tmp_path / stage / "contaminated.jsonl").open()] == ["p3"]


def test_the_executor_is_not_part_of_the_fingerprint(inputs, local_runs, capsys):
    """A run finished in-process is the same run when the recipe asks for Ray: nothing to do, no cluster."""
    done = local_runs["generate"]
    again = run("generate", load_recipe(_recipe(inputs, "generate", done, RAY)))
    assert again["fingerprint"] == json.loads((done / "manifest.json").read_text())["fingerprint"]
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_finished_shards(cluster, inputs, local_runs, tmp_path):
    run_dir = tmp_path / "rejection"
    recipe = _recipe(inputs, "rejection", run_dir, RAY | {"address": cluster})
    driver = subprocess.Popen([sys.executable, "-m", "qwen2_align.cli", "rejection", "--recipe", str(recipe)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    shards = run_dir / "shards"
    deadline = time.time() + 300
    while not list(shards.glob("*.jsonl")) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = len(list(shards.glob("*.jsonl")))
    assert 1 <= done_before < SHARDS and not (run_dir / "manifest.json").exists()

    manifest = run("rejection", load_recipe(recipe))
    assert manifest["shards"]["resumed"] == done_before
    _assert_same_files(run_dir, local_runs["rejection"])
