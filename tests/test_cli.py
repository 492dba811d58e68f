import json
from pathlib import Path

from helpers.cli import run_cli

from qwen2_align.cli import COMMANDS, main
from qwen2_align.stage_table import STAGES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_help_lists_every_stage_and_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in [*STAGES, *COMMANDS]:
        assert name in out.stdout


def test_a_stage_validates_its_recipe_before_it_runs(capsys, tmp_path):
    recipe = str(RECIPES / "tiny" / "annotate.yaml")
    assert main(["annotate", "--recipe", recipe, "--set", "judge.batch_size=0"]) == 2  # validated first
    assert "judge.batch_size: must be >= 1" in capsys.readouterr().err
    # export is for people's rankings: with a judge, or before the app ever ran, one line, status 2, nothing written
    run_dir = tmp_path / "annotate"
    assert main(["annotate", "export", "--recipe", recipe, "--set", f"run_dir={run_dir}"]) == 2
    assert "this recipe ranks with a judge" in capsys.readouterr().err
    database = tmp_path / "people.sqlite"
    assert main(["annotate", "export", "--recipe", recipe, "--set", "judge=null", "--set", f"run_dir={run_dir}",
                 "--set", f"database={database}"]) == 2
    err = capsys.readouterr().err
    assert f"{database}: no annotations database; serve the app first" in err and err.count("\n") == 1
    assert not run_dir.exists() and not database.exists()


def test_init_writes_a_loadable_checkpoint_and_chat_runs(tmp_path):
    out = run_cli("init", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "1")
    assert out.returncode == 0, out.stderr
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["hidden_size"] == 128
    chat = run_cli("chat", "--model", str(tmp_path / "ck"), "--prompt", "Hi", "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr
    assert "user: Hi" in chat.stdout and "assistant:" in chat.stdout


def test_unknown_preset_is_a_clear_error():
    out = run_cli("init", "--preset", "huge", "--out", "x")
    assert out.returncode == 2 and "invalid choice: 'huge'" in out.stderr


def test_init_tiny_moe_preset_writes_a_qwen2_moe_checkpoint(tmp_path, capsys):
    from alignment.checkpoint import load_causal_lm
    from alignment.model import Qwen2MoeForCausalLM

    assert main(["init", "--preset", "tiny-moe", "--out", str(tmp_path / "moe")]) == 0
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert isinstance(load_causal_lm(tmp_path / "moe"), Qwen2MoeForCausalLM)
