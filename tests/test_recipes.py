"""Recipes: validated before anything runs, one-line errors naming file and key."""

import subprocess
import sys
from pathlib import Path

import pytest

from alignment.recipe_loader import RecipeError
from qwen2_align.stage_table import STAGES, check_recipe_dir, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _error(path, **kw) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


NOT_RECIPE_DIRS = ("accelerate", "constitution")  # launcher configs; constitutions the constitution stage reads


@pytest.mark.parametrize("model", sorted(p.name for p in RECIPES.iterdir() if p.is_dir() and p.name not in NOT_RECIPE_DIRS))
def test_every_shipped_recipe_is_valid(model):
    found = check_recipe_dir(RECIPES / model)
    expected = {name for name, spec in STAGES.items() if model == "tiny" or not spec.demo_only}
    assert set(found) == expected, f"{model}: missing {expected - set(found)}, unexpected {set(found) - expected}"


def test_report_settings_in_real_sft_recipes():
    for model in ("qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"):
        r = load_recipe(RECIPES / model / "sft.yaml")
        t = r.training
        assert t["max_length"] == 32768 and t["num_train_epochs"] == 2 and t["learning_rate"] == 7e-6
        assert t["weight_decay"] == 0.1 and t["max_grad_norm"] == 1.0
        assert t["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}


def test_unknown_key_names_file_key_and_nearest(tmp_path):
    path = _write(tmp_path, "stage: generate\nrun_dir: x\nshard_sise: 4\n")
    assert _error(path) == f"{path}: shard_sise: unknown key (did you mean 'shard_size'?)"


def test_unknown_nested_and_trl_keys(tmp_path):
    path = _write(tmp_path, "stage: generate\nrun_dir: x\ngeneration: {tempreature: 0.5}\n")
    assert _error(path) == f"{path}: generation.tempreature: unknown key (did you mean 'temperature'?)"
    path = _write(tmp_path, "stage: sft\nrun_dir: x\nmodel: m\ntraining: {learnig_rate: 1.0e-5}\n")
    assert _error(path) == f"{path}: training.learnig_rate: unknown key (did you mean 'learning_rate'?)"


def test_wrong_types(tmp_path):
    path = _write(tmp_path, "stage: generate\nrun_dir: x\nshard_size: many\n")
    assert _error(path) == f"{path}: shard_size: expected int, got str 'many'"
    path = _write(tmp_path, "stage: generate\nrun_dir: x\ngeneration: {backend: tensorflow}\n")
    assert "generation.backend: must be one of ['transformers', 'vllm', 'vllm-server', 'openai']" in _error(path)
    path = _write(tmp_path, "stage: sft\nrun_dir: x\nmodel: m\ntraining: {num_train_epochs: [1]}\n")
    assert _error(path) == f"{path}: training.num_train_epochs: expected float, got list [1]"


def test_missing_file_bad_yaml_missing_key_wrong_stage(tmp_path):
    assert _error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: recipe file not found"
    path = _write(tmp_path, "stage: [unclosed\n")
    assert "invalid YAML" in _error(path)
    path = _write(tmp_path, "stage: sft\nrun_dir: x\n")
    assert _error(path) == f"{path}: model: required key is missing"
    path = _write(tmp_path, "stage: sfft\nrun_dir: x\n")
    assert _error(path) == f"{path}: stage: unknown stage 'sfft' (did you mean 'sft'?)"
    path = _write(tmp_path, "stage: generate\nrun_dir: x\n")
    assert _error(path, stage="dpo") == f"{path}: stage: this recipe is for 'generate', not 'dpo'"


def test_overrides_parse_yaml_values(tmp_path):
    path = _write(tmp_path, "stage: generate\nrun_dir: x\ngeneration: {model: m}\n")
    r = load_recipe(path, overrides=["generation.temperature=0", "shard_size=3", "generation.stop=[a, b]"])
    assert r.generation.temperature == 0.0 and r.shard_size == 3 and r.generation.stop == ["a", "b"]
    assert r.generation.model == "m"


def test_overrides_index_lists_and_name_a_bad_index(tmp_path):
    path = _write(tmp_path, "stage: responses\nrun_dir: x\ninputs: {instructions: i.jsonl}\ngenerators:\n"
                            "  - {strategy: greedy, model: a}\n  - {strategy: sampled, model: b, n: 2}\n")
    r = load_recipe(path, overrides=["generators.1.n=5", "generators.0.model=c"])
    assert [(g.model, g.n) for g in r.generators] == [("c", 1), ("b", 5)]
    for bad in ("generators.2.n=5", "generators.first.n=5"):
        with pytest.raises(RecipeError, match=r"--set generators\.\w+\.n=5: generators has 2 items"):
            load_recipe(path, overrides=[bad])


def test_cli_prints_one_line_without_traceback(tmp_path):
    path = _write(tmp_path, "stage: generate\nrun_dir: x\nshard_sise: 4\n")
    out = subprocess.run([sys.executable, "-m", "qwen2_align.cli", "generate", "--recipe", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"qwen2-align: {path}: shard_sise: unknown key (did you mean 'shard_size'?)"
    assert "Traceback" not in out.stderr


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads 3e-3 as a string; the recipe field is a float, so it is converted.
    path = _write(tmp_path, "stage: sft\nrun_dir: x\nmodel: m\ntraining: {learning_rate: 3e-3}\n")
    assert load_recipe(path, overrides=["training.weight_decay=1e-2"]).training["learning_rate"] == 3e-3
    assert load_recipe(path, overrides=["training.weight_decay=1e-2"]).training["weight_decay"] == 1e-2
