"""Recipe keys of the trainer stages behave as in TRL, or are refused at validation in one line.

Each accepted key is checked against stock: TRL's own trainer on stock transformers' model with
the same weights, the same config and the same batch must give the same loss and gradients.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from trl import DPOTrainer, SFTTrainer

from alignment.checkpoint import init_checkpoint
from alignment.recipe_loader import RecipeError
from alignment.stages import Run
from alignment.train.common import load_frozen_model, load_training_data
from alignment.train.dpo import build_dpo_trainer
from alignment.train.sft import build_sft_trainer
from qwen2_align.demo.arithmetic import write_arithmetic_sets
from qwen2_align.stage_table import load_recipe, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    models = {preset: init_checkpoint(preset, root / preset, seed=0, num_hidden_layers=2, initializer_range=0.1)
              for preset in ("tiny", "tiny-moe")}
    data = write_arithmetic_sets(root / "data", n_demonstrations=32, n_preferences=16, seed=0)
    return root, models, data


def _write_recipe(root: Path, stage: str, model, train, name: str, run_seed: int = 0, **training) -> Path:
    recipe = {"stage": stage, "run_dir": str(root / name), "model": str(model), "dtype": "float32",
              "inputs": {"train": str(train)}, "seed": run_seed,
              "training": {"max_length": 128, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                           "logging_steps": 1, "gradient_checkpointing": False, "save_strategy": "no",
                           "disable_tqdm": True, **training}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _loss_and_grad(trainer, batch, num_items):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by the MoE aux loss
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grad = dict(trainer.model.named_parameters())["model.layers.1.self_attn.q_proj.weight"].grad
    return loss.item(), grad.clone()


SFT_CASES = {
    "nll": ("tiny", {}),
    "dft": ("tiny", {"loss_type": "dft"}),
    "label_smoothing": ("tiny", {"label_smoothing_factor": 0.1}),
    "moe_aux_loss": ("tiny-moe", {}),
    "packed": ("tiny", {"packing": True, "assistant_only_loss": True}),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_keys_give_stock_trl_loss_and_gradients(setup, case):
    root, models, data = setup
    preset, training = SFT_CASES[case]
    recipe = load_recipe(_write_recipe(root, "sft", models[preset], data["demonstrations"], f"sft-{case}", **training))
    split = load_training_data(recipe, "demonstration", Run.start("sft", recipe, ["train"]))
    ours = build_sft_trainer(recipe, split, recipe.model)
    stock = SFTTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(models[preset], dtype=torch.float32),
                       args=ours.args, train_dataset=split.train_dataset(),
                       processing_class=ours.processing_class)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    ours_loss, ours_grad = _loss_and_grad(ours, batch, num_items)
    stock_loss, stock_grad = _loss_and_grad(stock, batch, num_items)
    assert ours_loss == pytest.approx(stock_loss, rel=1e-5)
    assert torch.allclose(ours_grad, stock_grad, atol=1e-6, rtol=1e-4)
    if preset == "tiny-moe":
        assert ours._metrics["train"]["aux_loss"][-1] == pytest.approx(stock._metrics["train"]["aux_loss"][-1], rel=1e-5)


DPO_CASES = {
    "sigmoid": {},
    "wpo_weighting": {"use_weighting": True},
    "ipo": {"loss_type": ["ipo"]},
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_keys_give_stock_trl_loss_and_gradients(setup, case):
    root, models, data = setup
    recipe = load_recipe(_write_recipe(root, "dpo", models["tiny"], data["preferences"], f"dpo-{case}", beta=0.1,
                                       **DPO_CASES[case]))
    split = load_training_data(recipe, "preference", Run.start("dpo", recipe, ["train"]))
    ours = build_dpo_trainer(recipe, split, recipe.model, load_frozen_model(recipe.model, recipe))
    stock_model = lambda: transformers.AutoModelForCausalLM.from_pretrained(models["tiny"], dtype=torch.float32)  # noqa: E731
    stock = DPOTrainer(model=stock_model(), ref_model=stock_model(), args=ours.args,
                       train_dataset=split.train_dataset(), processing_class=ours.processing_class)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    ours_loss, ours_grad = _loss_and_grad(ours, batch, None)
    stock_loss, stock_grad = _loss_and_grad(stock, batch, None)
    assert ours_loss == pytest.approx(stock_loss, rel=1e-3)  # WPO weights exponentiate per-token float32 sums
    assert torch.allclose(ours_grad, stock_grad, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("key, value, says", [
    ("seed", 3, "top-level seed"),
    ("output_dir", "elsewhere", "run_dir"),
    ("bf16", True, "dtype"),
    ("hub_token", "hf_x", "HF_TOKEN"),
    ("learnig_rate", 1e-3, "did you mean 'learning_rate'"),
])
def test_keys_with_another_home_are_refused_in_one_line(setup, key, value, says):
    root, models, data = setup
    path = _write_recipe(root, "sft", models["tiny"], data["demonstrations"], f"refused-{key}", **{key: value})
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}: training.{key}: ") and says in message and "\n" not in message


def test_trl_cross_field_checks_run_at_validation(setup):
    root, models, data = setup
    path = _write_recipe(root, "sft", models["tiny"], data["demonstrations"], "post-init", load_best_model_at_end=True,
                         eval_strategy="steps", save_strategy="epoch")
    with pytest.raises(RecipeError, match=r"training: .*strateg") as error:
        load_recipe(path)
    assert "\n" not in str(error.value)


def test_resume_from_checkpoint_names_the_checkpoint_to_resume(setup):
    """A run told to resume from another run's checkpoint carries on from it: its first two logged
    losses are that run's (a fresh run with this seed shuffles other batches and logs others)."""
    root, models, data = setup

    def logged_losses(name: str, seed: int, **training) -> list[float]:
        path = _write_recipe(root, "sft", models["tiny"], data["demonstrations"], name, run_seed=seed, max_steps=4,
                             **training)
        run("sft", load_recipe(path))
        history = json.loads((root / name / "metrics.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    first = logged_losses("resume-a", 0, save_strategy="steps", save_steps=2)
    resumed = logged_losses("resume-b", 1, resume_from_checkpoint=str(root / "resume-a" / "checkpoint-2"))
    fresh = logged_losses("resume-c", 1)
    assert resumed[:2] == first[:2] and fresh[:2] != first[:2]
    assert len(resumed) == 4
