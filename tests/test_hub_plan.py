"""Hub push (dry run and an unreachable Hub) and the memory plan."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from alignment.checkpoint import init_checkpoint, load_causal_lm
from alignment.pipeline import load_recipe
from alignment.plan import count_parameters, model_config
from alignment.recipes import RecipeError
from alignment.stages import write_manifest

SECRET = "hf_thisIsNotARealTokenButMustNeverBeWritten"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished (tiny) run: weights, tokenizer, manifest, as a trainer stage leaves them."""
    root = tmp_path_factory.mktemp("hub")
    run = init_checkpoint("tiny", root / "sft", seed=0, num_hidden_layers=2, initializer_range=0.3)
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "optimizer.pt").write_bytes(b"not uploaded")
    write_manifest(run, {"stage": "sft", "recipe": {"stage": "sft", "model": "Qwen/Qwen2-0.5B", "training": {}},
                         "inputs": {"train": {"source": "org/some-dataset", "hub": True, "rows": 100}},
                         "counts": {"rows_in": 100, "quarantined": 2, "train": 93, "eval": 5},
                         "metrics": {"eval_loss": 1.25}})
    return run


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_TOKEN": SECRET, **(env or {})})


def test_dry_run_writes_a_folder_stock_transformers_loads(run_dir, tmp_path):
    out = _cli("push", "--run", str(run_dir), "--repo", "me/tiny-aligned", "--dry-run", "--out", str(tmp_path / "up"))
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "up"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert not any(n.startswith(("checkpoint", "manifest", "optimizer")) for n in names)
    card = (folder / "README.md").read_text()
    assert "base_model: Qwen/Qwen2-0.5B" in card and "org/some-dataset" in card and "license: apache-2.0" in card
    assert "| sft | train | `org/some-dataset` | 100 | 2 | 93 | 5 |" in card and "eval_loss" in card
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_causal_lm(run_dir)
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (stock(ids).logits - ours(input_ids=ids).logits).abs().max() < 1e-5
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out.stdout + out.stderr


def test_unreachable_hub_is_one_line_without_the_token(run_dir, tmp_path):
    out = _cli("push", "--run", str(run_dir), "--repo", "me/tiny-aligned", "--out", str(tmp_path / "up"),
               env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "2"})
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen2-align: push to me/tiny-aligned at http://127.0.0.1:9 failed:")
    assert "Traceback" not in out.stderr and SECRET not in out.stdout + out.stderr


def test_a_token_in_a_recipe_is_refused(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text(f"stage: sft\nrun_dir: x\nmodel: m\ntraining: {{push_to_hub: true, hub_token: {SECRET}}}\n")
    with pytest.raises(RecipeError, match="training.hub_token: a token does not belong in a recipe"):
        load_recipe(path)


def test_parameter_counts_match_the_models():
    for preset in ("qwen2-0.5b", "qwen2-7b", "qwen2-72b"):
        counts = count_parameters(model_config(f"Qwen/{preset.replace('qwen2', 'Qwen2').replace('b', 'B')}"))
        expected = {"qwen2-0.5b": 494_032_768, "qwen2-7b": 7_615_616_512, "qwen2-72b": 72_706_203_648}[preset]
        assert counts.total == expected, preset
    tiny = model_config("Qwen/tiny")
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(tiny.to_dict()))
    assert count_parameters(tiny).total == sum(p.numel() for p in model.parameters())


def test_plan_command_traces_run_dirs_to_the_base_model():
    out = _cli("plan", "--recipe", str(RECIPES / "qwen2-7b" / "dpo.yaml"), "--gpus", "8")
    assert out.returncode == 0, out.stderr
    assert "model runs/qwen2-7b/sft: 7.616 B parameters" in out.stdout
    assert "reference model (bf16, sharded)" in out.stdout and "total per GPU" in out.stdout


def test_plan_says_whether_it_fits_and_how_many_gpus_would():
    moe = _cli("plan", "--recipe", str(RECIPES / "qwen2-57b-a14b" / "sft.yaml"), "--gpus", "8")
    assert moe.returncode == 0, moe.stderr
    assert "57.409 B parameters (14.249 B active per token)" in moe.stdout
    assert "does not fit in 80 GiB per GPU: needs at least 16 GPUs" in moe.stdout
    dense = _cli("plan", "--recipe", str(RECIPES / "qwen2-7b" / "sft.yaml"), "--gpus", "8", "--gpu-memory", "80")
    assert "fits in 80 GiB per GPU" in dense.stdout
