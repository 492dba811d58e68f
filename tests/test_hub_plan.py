"""Hub push (dry run and an unreachable Hub) and the memory plan."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from helpers.cli import run_cli

from alignment.checkpoint import init_checkpoint, load_causal_lm, reward_model_class
from alignment.model.loss import CHUNK_ROWS
from alignment.recipe_loader import RecipeError
from alignment.stages import write_manifest
from alignment.reward_model import RewardModel
from alignment.tokenizer import load_tokenizer
from alignment.train.common import load_frozen_model
from qwen2_align.plan import count_parameters, model_config, online_dpo_phases
from qwen2_align.stage_table import load_recipe

SECRET = "hf_thisIsNotARealTokenButMustNeverBeWritten"


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
    return subprocess.run([sys.executable, "-m", "qwen2_align.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_TOKEN": SECRET, **(env or {})})


def test_dry_run_writes_a_folder_stock_transformers_loads(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = run_cli("push", "--run", str(run_dir), "--repo", "me/tiny-aligned", "--dry-run",
                  "--out", str(tmp_path / "up"))
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


GIB = 2**30
# Qwen2-7B by hand: a layer is q 3584x3584 + 3584 bias, k and v 3584x512 + 512 bias each, o 3584x3584,
# two norms of 3584 and SwiGLU 3 x 3584 x 18944 = 233,057,792; 28 of them, embedding and untied head of
# 152,064 x 3,584 each, final norm: 7,615,616,512, the released count.
P_7B, LAYER_7B, VOCAB_7B = 7_615_616_512, 233_057_792, 2 * 152_064 * 3_584
# Qwen2-57B-A14B by hand: a layer is the same attention and norms (29,371,904), 64 experts of 3 x 3584 x 2560,
# a shared expert of 3 x 3584 x 20480 + its 3584 gate, a router of 3584 x 64: 2,011,413,504. A token passes
# 8 of the 64 experts: 470,006,784 per layer. Embedding and untied head of 151,936 x 3,584 each.
P_57B, LAYER_57B, VOCAB_57B = 57_408_658_944, 2_011_413_504, 2 * 151_936 * 3_584
ACTIVE_57B = 28 * 470_006_784 + VOCAB_57B + 3_584


def _recipe(directory: Path, stage: str, model: str, max_length: int) -> Path:
    """A trainer recipe with what the plan reads: one sequence (or pair) of max_length, checkpointing on."""
    directory.mkdir(exist_ok=True)
    path = directory / f"{stage}.yaml"
    path.write_text(f"stage: {stage}\nrun_dir: runs/plan/{stage}\nmodel: {model}\ntraining: {{max_length: {max_length}, "
                    f"per_device_train_batch_size: 1, gradient_checkpointing: true}}\n")
    return path


def _plan_lines(stdout: str) -> dict[str, float]:
    """The plan's `component   N.NN GiB` lines as {component: GiB}."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^  (\S.*?)\s+(\d+\.\d+) GiB$", stdout, re.M)}


def test_parameter_counts_match_the_models():
    for preset in ("qwen2-0.5b", "qwen2-7b", "qwen2-72b"):
        counts = count_parameters(model_config(f"Qwen/{preset.replace('qwen2', 'Qwen2').replace('b', 'B')}"))
        expected = {"qwen2-0.5b": 494_032_768, "qwen2-7b": 7_615_616_512, "qwen2-72b": 72_706_203_648}[preset]
        assert counts.total == expected, preset
    moe = count_parameters(model_config("Qwen/Qwen2-57B-A14B"))
    assert (moe.total, moe.active_per_token, max(moe.per_layer)) == (P_57B, ACTIVE_57B, LAYER_57B)
    for config in (model_config("Qwen/tiny"), model_config("Qwen/Qwen2-57B-A14B")):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config.to_dict()))
        assert count_parameters(config).total == sum(p.numel() for p in model.parameters()), config.model_type


def test_plan_of_a_dpo_run_is_the_hand_calculation_for_the_base_model_it_traces_to(tmp_path):
    # runs/plan/sft does not exist: the plan follows sft.yaml's run_dir to Qwen/Qwen2-7B.
    _recipe(tmp_path, "sft", "Qwen/Qwen2-7B", 32768)
    out = run_cli("plan", "--recipe", str(_recipe(tmp_path, "dpo", "runs/plan/sft", 8192)), "--gpus", "8")
    assert out.returncode == 0, out.stderr
    assert f"{P_7B / 1e9:.3f} B parameters" in out.stdout
    tokens = 2 * 8192  # one pair (chosen + rejected) of max_length 8192
    expected = {
        "weights (fp32 master, sharded)": 4 * P_7B / 8,
        "gradients (fp32, sharded)": 4 * P_7B / 8,
        "Adam moments (fp32, sharded)": 8 * P_7B / 8,
        "gathered layers (bf16, 2 in flight)": 2 * 2 * LAYER_7B + 2 * VOCAB_7B / 8,
        # checkpointed: every layer's bf16 input, plus one layer's saved tensors (20 h + 8 intermediate bytes)
        "activations": tokens * 2 * 3584 * 28 + tokens * (20 * 3584 + 8 * 18944),
        "LM head chunk (logits + softmax)": CHUNK_ROWS * 152_064 * (2 + 4) + tokens * 3584 * 4,
        "reference model (bf16, sharded)": 2 * P_7B / 8,
    }
    expected["total per GPU"] = sum(expected.values())
    printed = _plan_lines(out.stdout)
    assert printed.keys() == expected.keys()
    for component, nbytes in expected.items():
        assert printed[component] == pytest.approx(nbytes / GIB, abs=0.006), component


def test_plan_says_whether_it_fits_and_how_many_gpus_would(tmp_path):
    # 57B SFT, one 32,768-token sequence: 16 bytes per parameter and the embeddings' gather are sharded
    # over n GPUs; two gathered layers, activations and the LM head chunk are not.
    tokens = 32_768
    sharded = 16 * P_57B + 2 * VOCAB_57B
    fixed = (2 * 2 * LAYER_57B + tokens * 2 * 3584 * 28 + tokens * (20 * 3584 + 8 * 20480)
             + CHUNK_ROWS * 151_936 * 6 + tokens * 3584 * 4)
    needed = next(n for n in (2**i for i in range(11)) if sharded / n + fixed <= 80 * GIB)
    assert needed == 16
    recipe = str(_recipe(tmp_path, "sft", "Qwen/Qwen2-57B-A14B", tokens))
    moe = run_cli("plan", "--recipe", recipe, "--gpus", "8")
    assert moe.returncode == 0, moe.stderr
    assert f"{P_57B / 1e9:.3f} B parameters ({ACTIVE_57B / 1e9:.3f} B active per token)" in moe.stdout
    assert _plan_lines(moe.stdout)["total per GPU"] == pytest.approx((sharded / 8 + fixed) / GIB, abs=0.006)
    assert f"does not fit in 80 GiB per GPU: needs at least {needed} GPUs" in moe.stdout
    at_16 = run_cli("plan", "--recipe", recipe, "--gpus", str(needed))
    spare = 80 - (sharded / needed + fixed) / GIB
    assert f"fits in 80 GiB per GPU ({spare:.1f} GiB to spare)" in at_16.stdout


def test_plan_of_online_dpo_adds_the_reward_model_and_the_engine_to_each_phase(tmp_path):
    """Beside the trainer on 8 GPUs: the reward model (a score head of 1 x hidden for the LM head) sharded with one
    decoder layer gathered, in every phase; the colocated vLLM engine's share of the GPU while sampling and for the
    held-out KL, and the KL's model sharded the same way; a `vllm-server` policy holds nothing on the trainer's
    GPUs and is planned on its own."""
    _recipe(tmp_path, "rm", "Qwen/Qwen2-7B", 8192)  # runs/plan/rm traces to Qwen2-7B

    def plan(generation: str):
        path = tmp_path / "online-dpo.yaml"
        path.write_text("stage: online-dpo\nrun_dir: runs/plan/online-dpo\nmodel: Qwen/Qwen2-7B\nreward_model: runs/plan/rm\n"
                        "dtype: bfloat16\ninputs: {prompts: prompts.jsonl}\nmerging: {method: none}\n"
                        f"generation: {{{generation}}}\n"
                        "training: {max_length: 8192, per_device_train_batch_size: 1, gradient_checkpointing: true}\n")
        out = run_cli("plan", "--recipe", str(path), "--gpus", "8")
        assert out.returncode == 0, out.stderr
        return out.stdout, _plan_lines(out.stdout)

    h, layer = 3_584, 3_584 * 3_584 * 2 + 3_584 + 2 * (3_584 * 512 + 512) + 2 * 3_584 + 3 * 3_584 * 18_944
    reward = 2 * ((P_7B - 152_064 * h + h) / 8 + layer)
    logprob_model = 2 * (P_7B / 8 + layer)
    stdout, printed = plan("backend: vllm, gpu_memory_utilization: 0.4")
    trainer = printed["total per GPU"] * GIB
    sharded = "(sharded, a layer gathered)"
    expected = {f"training: reward model {sharded}": reward, "training: trainer (above)": trainer,
                "training: total per GPU": trainer + reward,
                "sampling: vLLM engine (0.4 of the GPU)": 32 * GIB, f"sampling: reward model {sharded}": reward,
                "sampling: total per GPU": 32 * GIB + reward,
                f"held-out KL: policy or reference for log-probs {sharded}": logprob_model,
                "held-out KL: total per GPU": 32 * GIB + reward + logprob_model}
    expected["peak per GPU"] = max(expected["training: total per GPU"], expected["held-out KL: total per GPU"])
    for component, nbytes in expected.items():
        assert printed[component] == pytest.approx(nbytes / GIB, abs=0.011), component
    assert f"fits in 80 GiB per GPU ({80 - expected['peak per GPU'] / GIB:.1f} GiB to spare)" in stdout
    stdout, printed = plan("backend: vllm, gpu_memory_utilization: 0.95")
    assert printed["peak per GPU"] == pytest.approx((76 * GIB + reward + logprob_model) / GIB, abs=0.011)
    assert "does not fit in 80 GiB per GPU: needs at least 16 GPUs at this micro-batch" in stdout  # sharded models
    stdout, _ = plan("backend: vllm, gpu_memory_utilization: 0.99")  # the engine's share alone leaves too little
    assert "does not fit in 80 GiB per GPU: needs 83.5 GiB per GPU beside the trainer" in stdout

    stdout, printed = plan("backend: vllm-server, tensor_parallel_size: 4, gpu_memory_utilization: 0.5")
    assert printed["sampling: total per GPU"] == pytest.approx(reward / GIB, abs=0.011)  # no engine here
    assert printed["held-out KL: total per GPU"] == pytest.approx((reward + logprob_model) / GIB, abs=0.011)
    weights = 2 * P_7B / 4 / GIB
    assert (f"weights per GPU {weights:.2f} GiB of the engine's 40.00 GiB (0.5 of the GPU): fits: "
            f"{40 - weights:.1f} GiB of each share left for the KV cache") in stdout


def test_online_dpo_phases_count_the_bytes_of_the_models_online_dpo_loads(tmp_path):
    """The reward model and the whole policy `plan` counts are, to the byte, what online DPO holds: the models
    loaded here the way it loads them (tied and untied heads, a score head in place of the LM head)."""
    for preset in ("tiny", "tiny-untied"):
        policy = init_checkpoint(preset, tmp_path / preset, seed=0, num_hidden_layers=2)
        reward = reward_model_class(policy).from_pretrained(policy, num_labels=1)
        reward.save_pretrained(tmp_path / f"{preset}-rm")
        load_tokenizer(str(policy)).save_pretrained(tmp_path / f"{preset}-rm")
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/tiny/online-dpo.yaml", overrides=[
            f"model={policy}", f"reward_model={tmp_path / f'{preset}-rm'}", "dtype=float32"])
        phases = online_dpo_phases(recipe, model_config(str(policy)), None, 80.0)
        held = {"reward": RewardModel(str(tmp_path / f"{preset}-rm")).model,
                "policy": load_frozen_model(str(policy), recipe)}
        nbytes = {name: sum(p.numel() * p.element_size() for p in model.parameters()) for name, model in held.items()}
        assert phases["training"]["reward model (whole)"] == nbytes["reward"], preset
        assert phases["sampling"]["policy generator (whole)"] == nbytes["policy"], preset  # the transformers backend
        assert phases["held-out KL"]["policy or reference for log-probs (whole)"] == nbytes["policy"], preset
