"""The demo: its recipes chained stage to stage, a shortened run of every stage on a small tiny world in the
default suite, and the full `make demo` (slow) with the issue's acceptance: held-out arithmetic accuracy
base < SFT (by 20 points or more) <= DPO <= online DPO."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qwen2_align.demo import STEPS, run_demo
from qwen2_align.demo.tiny_world import TinyWorld, write_world
from qwen2_align.stage_table import load_recipe

ROOT = Path(__file__).resolve().parents[1]
OWN_OUTPUTS = ("run_dir", "database")


def _paths(value, key: str = "") -> list[str]:
    """Every `runs/tiny/...` path a recipe reads (not the ones it writes)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() if k not in OWN_OUTPUTS for p in _paths(v, k)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v, key)]
    return [value] if isinstance(value, str) and value.startswith("runs/tiny/") else []


def test_every_demo_recipe_reads_the_world_the_base_model_or_an_earlier_step(tmp_path):
    world = {f"runs/tiny/world/{p.relative_to(tmp_path).as_posix()}"
             for p in write_world(TinyWorld(documents=10), tmp_path).values()}
    produced = {"runs/tiny/base"}
    for step in STEPS:
        data = yaml.safe_load((ROOT / step.recipe_path).read_text())
        assert data["stage"] == step.stage and data["run_dir"] == f"runs/tiny/{step.name}"
        for path in _paths(data):
            run = "/".join(path.split("/")[:3])
            assert path in world or run in produced, f"{step.name} reads {path}, which nothing before it writes"
        produced.add(data["run_dir"])
        load_recipe(ROOT / step.recipe_path)  # and it is valid
    teachers = {s.name for s in STEPS if "runs/tiny/base" in _paths(yaml.safe_load((ROOT / s.recipe_path).read_text()))}
    assert {"instag", "evolve", "responses", "annotate", "rejection", "execution", "constitution", "sft"} <= teachers


SHORT_WORLD = {"max_operand": 5, "eval_pairs": 10, "documents": 300}
FAST_GENERATION = ["generation.max_new_tokens=8", "generation.n=2"]
SHORT = {
    "pretrain": ["training.max_steps=15", "training.save_steps=100", "training.logging_steps=5"],
    "generate": FAST_GENERATION, "instag": ["generation.max_new_tokens=24"], "select": ["num_instructions=8"],
    "evolve": ["generation.max_new_tokens=16"],
    "responses": ["generators.0.max_new_tokens=8", "generators.1.max_new_tokens=8"],
    "annotate": ["judge.generation.max_new_tokens=12"], "rejection": FAST_GENERATION,
    "execution": FAST_GENERATION, "execution-if": FAST_GENERATION, "repurpose": ["generation.max_new_tokens=8"],
    "repurpose-roleplay": ["generation.max_new_tokens=8"], "constitution": ["generation.max_new_tokens=8"],
    "sft": ["training.max_steps=6", "training.save_steps=100"], "rm": ["training.max_steps=4"],
    "dpo": ["training.max_steps=4"],
    "online-dpo": ["episodes=1", "prompts_per_episode=4", "eval_prompts=2", "generation.max_new_tokens=8"],
    "eval": ["generation.max_new_tokens=12", "passkey=null"],
}


def _in_a_checkout_copy(tmp_path: Path) -> Path:
    """A directory with the recipes (the demo's paths are relative), where runs/ is the test's own."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    return tmp_path


def test_a_shortened_demo_runs_every_stage_resumes_after_kill_9_and_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_in_a_checkout_copy(tmp_path))
    runs = tmp_path / "runs/tiny"
    script = f"from qwen2_align.demo import run_demo; run_demo(overrides={SHORT!r}, world={SHORT_WORLD!r})"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 600
    while not (runs / "rejection/manifest.json").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the demo ended before it could be killed"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = {s.name: (runs / s.name / "manifest.json").read_text() for s in STEPS
                if (runs / s.name / "manifest.json").exists()}
    assert "instag" in finished and "eval" not in finished

    summary = run_demo(overrides=SHORT, world=SHORT_WORLD)  # resumes: what finished is not redone
    for name, manifest in finished.items():
        assert (runs / name / "manifest.json").read_text() == manifest, name
    for step in STEPS:
        manifest = json.loads((runs / step.name / "manifest.json").read_text())
        assert manifest["stage"] == step.stage
    assert set(summary["arithmetic_accuracy"]) == {"base", "sft", "dpo", "online-dpo"}
    report = runs / "report"
    for name in ("report.md", "summary.json", "metrics_by_stage.png", "rows_by_stage.png", "stage_times.png",
                 "reward_by_episode.png", "curves-sft.png", "curves-pretrain.png"):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    eval_metrics = json.loads((runs / "eval/metrics.json").read_text())
    assert f"{eval_metrics['sft']['arithmetic_accuracy']:.3f}" in text  # the report quotes the eval run
    rejection = json.loads((runs / "rejection/manifest.json").read_text())["counts"]
    assert summary["rows"]["rejection"]["in"] == rejection["rows_in"] == 3 * (36 - 10)
    assert (runs / "push/model/README.md").exists() and (runs / "push/data/README.md").exists()
    assert "demo finished" in capsys.readouterr().out
    state = json.loads((runs / "demo.json").read_text())
    assert state["finished"] and set(state["seconds"]) >= {s.name for s in STEPS}

    # a demo started after a finished one runs the stages afresh; the base model comes from the cache
    marker = runs / "sft" / "marker"
    marker.write_text("old run")
    run_demo(overrides=SHORT, world=SHORT_WORLD)
    assert not marker.exists()
    assert json.loads((runs / "base/manifest.json").read_text())["fingerprint"] == state["base"]


@pytest.mark.slow
def test_make_demo_shows_each_stage_buying_held_out_accuracy(tmp_path, monkeypatch):
    """The full demo (the README's figures): base < SFT by 20 points or more, SFT <= DPO <= online DPO."""
    monkeypatch.chdir(_in_a_checkout_copy(tmp_path))
    if os.environ.get("QWEN2_ALIGN_DEMO_BASE"):  # a base model trained earlier, to skip the 7-minute pretrain
        (tmp_path / "runs/tiny").mkdir(parents=True)
        (tmp_path / "runs/tiny/base").symlink_to(os.environ["QWEN2_ALIGN_DEMO_BASE"])
    accuracy = run_demo()["arithmetic_accuracy"]
    assert accuracy["sft"] >= accuracy["base"] + 0.2
    assert accuracy["base"] < accuracy["sft"] <= accuracy["dpo"] <= accuracy["online-dpo"]
