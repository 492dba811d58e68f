"""`accelerate launch` with 2 CPU processes (gloo) gives the same model as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.checkpoint import init_checkpoint
from data_synthesis.arithmetic import write_arithmetic_sets

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = init_checkpoint("tiny", root / "init", seed=0, num_hidden_layers=2)
    return root, model, write_arithmetic_sets(root / "data", n_demonstrations=64, n_preferences=32, seed=0)


def _run(root: Path, stage: str, model, train, name: str, processes: int, per_device: int) -> Path:
    recipe = {"stage": stage, "run_dir": str(root / name), "model": str(model), "dtype": "float32",
              "inputs": {"train": str(train)}, "seed": 0,
              # SGD: weights then differ exactly as much as the gradients do (Adam's first steps
              # follow the gradient's sign, which rounding can flip where a gradient is ~0).
              "training": {"max_steps": 4, "per_device_train_batch_size": per_device, "learning_rate": 0.5,
                           "optim": "sgd",
                           "max_length": 128, "logging_steps": 1, "bf16": False, "gradient_checkpointing": False,
                           "save_strategy": "no", "disable_tqdm": True, "dataloader_drop_last": True}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "alignment.cli", stage, "--recipe", str(path)]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"), "-m", "alignment.cli", stage,
                   "--recipe", str(path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return root / name / "model.safetensors"


@pytest.mark.parametrize("stage,data", [("sft", "demonstrations"), ("dpo", "preferences")])
def test_two_processes_match_one_with_the_same_global_batch(setup, stage, data):
    root, model, sets = setup
    one = load_file(_run(root, stage, model, sets[data], f"{stage}-1proc", processes=1, per_device=4))
    two = load_file(_run(root, stage, model, sets[data], f"{stage}-2proc", processes=2, per_device=2))
    start = load_file(Path(model) / "model.safetensors")
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training changed the weights
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-4, rtol=1e-3), k
