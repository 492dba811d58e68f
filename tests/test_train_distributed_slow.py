"""`accelerate launch` with 2 CPU processes (gloo) gives the same model as one process with the same global batch:
data parallel (DDP), FSDP2 (accelerate's own sharding, on CPU through `tests/helpers/fsdp2_on_cpu.py`) and
DeepSpeed ZeRO-3 (its CPU accelerator; the `deepspeed` extra)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from alignment.checkpoint import init_checkpoint
from qwen2_align.demo.arithmetic import write_arithmetic_sets

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
LAUNCHERS = {
    "1proc": [sys.executable, "-m", "qwen2_align.cli"],
    "ddp": [*LAUNCH, str(ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"), "-m", "qwen2_align.cli"],
    "fsdp2": [*LAUNCH, str(HELPERS / "cpu-2proc-fsdp2.yaml"), str(HELPERS / "fsdp2_on_cpu.py")],
    "zero3": [*LAUNCH, str(HELPERS / "cpu-2proc-zero3.yaml"), str(HELPERS / "zero3_on_cpu.py")],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tied (Qwen2-0.5B's layout) and untied (7B and larger, the sharded recipes) tiny models."""
    root = tmp_path_factory.mktemp("ddp")
    models = {preset: init_checkpoint(preset, root / preset, seed=0, num_hidden_layers=2)
              for preset in ("tiny", "tiny-untied")}
    return root, models, write_arithmetic_sets(root / "data", n_demonstrations=64, n_preferences=32, seed=0)


def _run(root: Path, stage: str, model, train, launcher: str, lora: dict | None = None) -> tuple[Path, str]:
    """The run dir and stderr of a 4-step run; 4 rows per step in all (one process, or 2 x 2)."""
    name = f"{Path(model).name}-{stage}{'-lora' if lora else ''}-{launcher}"
    recipe = {"stage": stage, "run_dir": str(root / name), "model": str(model), "dtype": "float32",
              "inputs": {"train": str(train)}, "eval_fraction": 0.25, "seed": 0, "lora": lora,
              # SGD: weights then differ exactly as much as the gradients do (Adam's first steps
              # follow the gradient's sign, which rounding can flip where a gradient is ~0).
              "training": {"max_steps": 4, "per_device_train_batch_size": 4 if launcher == "1proc" else 2,
                           "learning_rate": 0.5, "optim": "sgd", "max_length": 128, "logging_steps": 1,
                           "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True,
                           "dataloader_drop_last": True}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([*LAUNCHERS[launcher], stage, "--recipe", str(path)], capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return root / name, out.stderr


def _assert_same_training(one: Path, two: Path, start: Path) -> None:
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    initial = load_file(start / "model.safetensors")
    shared = initial.keys() & first.keys()  # a reward model has a score head where the LM head was
    assert max((first[k] - initial[k]).abs().max().item() for k in shared) > 1e-3  # training changed the weights
    assert first.keys() == second.keys()
    for k in first:
        assert torch.allclose(first[k], second[k], atol=1e-4, rtol=1e-3), k
    metrics = [json.loads((d / "manifest.json").read_text())["metrics"] for d in (one, two)]
    for key in [k for k in metrics[0] if k.startswith("heldout_")]:  # evaluated in shares after training
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("stage,data", [("sft", "demonstrations"), ("dpo", "preferences")])
def test_two_processes_match_one_with_the_same_global_batch(setup, stage, data):
    root, models, sets = setup
    model = models["tiny"]
    one, _ = _run(root, stage, model, sets[data], "1proc")
    two, _ = _run(root, stage, model, sets[data], "ddp")
    _assert_same_training(one, two, model)


@pytest.mark.parametrize("stage,data,lora", [("sft", "demonstrations", None), ("dpo", "preferences", None),
                                             ("rm", "preferences", None),
                                             ("sft", "demonstrations", {"r": 4, "alpha": 8, "dropout": 0.0}),
                                             ("dpo", "preferences", {"r": 4, "alpha": 8, "dropout": 0.0})],
                         ids=["sft", "dpo", "rm", "sft-lora", "dpo-lora"])
def test_fsdp2_two_processes_match_one_with_the_same_global_batch(setup, stage, data, lora):
    """FSDP2 as accelerate applies it (decoder layers, then norm + head, in their own units): the
    saved model is the gathered full state dict, the DPO reference and the evaluated models are
    whole on every process, and with LoRA on an untied model the kernels read the head as a DTensor. The held-out
    scores after training (DPO margins, RM pair accuracy) come from the sharded models themselves."""
    root, models, sets = setup
    model = models["tiny-untied"]
    one, _ = _run(root, stage, model, sets[data], "1proc", lora)
    two, stderr = _run(root, stage, model, sets[data], "fsdp2", lora)
    assert stderr.count("fsdp2_on_cpu: FSDP2 units:") >= 2, stderr[-4000:]  # each process sharded a model
    _assert_same_training(one, two, model)
    stock = transformers.AutoModelForCausalLM.from_pretrained(two)
    assert type(stock).__name__ == "Qwen2ForCausalLM"


@pytest.mark.parametrize("stage,data", [("sft", "demonstrations"), ("dpo", "preferences"), ("rm", "preferences")])
def test_zero3_two_processes_match_one_with_the_same_global_batch(setup, stage, data):
    """ZeRO-3 partitions parameters, gradients and optimizer state over the 2 processes; the saved model is its
    gathered 16-bit weights (float32 here)."""
    pytest.importorskip("deepspeed")
    root, models, sets = setup
    model = models["tiny-untied"]
    one, _ = _run(root, stage, model, sets[data], "1proc")
    two, stderr = _run(root, stage, model, sets[data], "zero3")
    assert stderr.count("zero3_on_cpu: ZeRO stage 3") >= 2, stderr[-4000:]  # each process's engine
    _assert_same_training(one, two, model)
