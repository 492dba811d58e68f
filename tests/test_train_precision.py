"""Mixed precision: fp32 master weights under a bf16 recipe, and the CPU dtype chosen per machine."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment import precision
from alignment.checkpoint import init_checkpoint
from alignment.stages import Run
from alignment.train.common import load_training_data, save_model
from alignment.train.sft import build_sft_trainer
from qwen2_align.demo.arithmetic import write_arithmetic_sets
from qwen2_align.stage_table import load_recipe


def _sft_update(root, model, data, dtype: str, steps: int = 20):
    """Weights before and after `steps` AdamW steps at the report's LR, and the trainer."""
    recipe_path = root / f"sft-{dtype}.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "stage": "sft", "run_dir": str(root / f"sft-{dtype}"), "model": str(model), "dtype": dtype,
        "inputs": {"train": str(data["demonstrations"])}, "seed": 0,
        "training": {"max_length": 64, "per_device_train_batch_size": 2, "learning_rate": 7e-6, "max_steps": steps,
                     "lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 5,
                     "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True},
    }))
    recipe = load_recipe(recipe_path)
    run = Run.start("sft", recipe, ["train"])
    trainer = build_sft_trainer(recipe, load_training_data(recipe, "demonstration", run), recipe.model)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return before, after, trainer, recipe, run


def test_bf16_recipe_trains_fp32_master_weights_like_the_fp32_run(tmp_path):
    """At lr 7e-6 an AdamW step is below bf16's spacing near |w| = 0.02: weights kept in bf16 would
    mostly not move. With fp32 master weights the bf16 run's update follows the fp32 run's."""
    # A narrow model: CPUs without bf16 support multiply bf16 at ~1 GFLOP/s.
    model = init_checkpoint("tiny", tmp_path / "init", seed=0, dtype="bfloat16", num_hidden_layers=1, hidden_size=32,
                            intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    data = write_arithmetic_sets(tmp_path / "data", n_demonstrations=48, n_preferences=8, seed=0)
    before_fp32, after_fp32, _, _, _ = _sft_update(tmp_path, model, data, "float32")
    before_bf16, after_bf16, trainer, recipe, run = _sft_update(tmp_path, model, data, "bfloat16")
    assert torch.equal(before_fp32, before_bf16)
    update_fp32, update_bf16 = after_fp32 - before_fp32, after_bf16 - before_bf16
    cosine = torch.nn.functional.cosine_similarity(update_fp32.double(), update_bf16.double(), dim=0).item()
    changed = (update_bf16 != 0).float().mean().item()
    assert cosine >= 0.99, cosine
    assert changed >= 0.9, changed
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    save_model(trainer, recipe, run.run_dir, recipe.model)  # the checkpoint keeps the dtype it started in
    assert {t.dtype for t in load_file(run.run_dir / "model.safetensors").values()} == {torch.bfloat16}


def test_auto_dtype_on_cpu_follows_the_probe_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2_ALIGN_CACHE", str(tmp_path))
    measured = precision.measure_matmul(size=128, rounds=1, min_seconds=0.01)
    expected = "bfloat16" if measured.bf16_gflops >= precision.BF16_MIN_SPEEDUP * measured.fp32_gflops else "float32"
    assert measured.dtype == expected and measured.cpu == precision.cpu_model()
    chosen, why = precision.resolve_dtype("auto", "cpu")
    cached = json.loads((tmp_path / "cpu-precision.json").read_text())
    assert chosen == precision.MatmulProbe(**cached).dtype and cached["cpu"] in why
    # a cached verdict is reused as it is: change it on disk and auto follows
    flipped = "float32" if chosen == "bfloat16" else "bfloat16"
    cached["fp32_gflops"], cached["bf16_gflops"] = (1.0, 10.0) if flipped == "bfloat16" else (10.0, 1.0)
    (tmp_path / "cpu-precision.json").write_text(json.dumps(cached))
    assert precision.resolve_dtype("auto", "cpu")[0] == flipped
    # another thread count measures again
    cached["threads"] += 1
    (tmp_path / "cpu-precision.json").write_text(json.dumps(cached))
    assert precision.resolve_dtype("auto", "cpu")[0] == chosen
    assert precision.resolve_dtype("float32", "cpu")[0] == "float32"  # a recipe that names a dtype pins it


@pytest.mark.parametrize("fp32, bf16, dtype", [(293.0, 160.0, "float32"), (197.0, 902.0, "bfloat16"),
                                              (100.0, 120.0, "float32")])
def test_probe_verdicts_on_the_machines_seen(fp32, bf16, dtype):
    """Intel Xeon without AMX (bf16 slower), AMD EPYC with AVX512-BF16 (4.6x), and a small edge that does not pay."""
    assert precision.MatmulProbe("cpu", 2, torch.__version__, fp32, bf16).dtype == dtype
