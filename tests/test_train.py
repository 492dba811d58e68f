"""Trainer stages on a tiny model: SFT, reward model, DPO, packing, and resume after a kill."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers.hub_layouts import ULTRACHAT_SPLITS, ULTRAFEEDBACK_SPLITS, ultrachat_folder, ultrafeedback_folder
from safetensors.torch import load_file

from alignment.checkpoint import init_checkpoint
from alignment.train.common import last_complete_checkpoint
from qwen2_align.demo.arithmetic import write_arithmetic_sets
from qwen2_align.stage_table import load_recipe, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = init_checkpoint("tiny", root / "init", seed=0, num_hidden_layers=2)
    data = write_arithmetic_sets(root / "data", n_demonstrations=96, n_preferences=48, seed=0)
    return root, model, data


@pytest.fixture(scope="module")
def moe(setup) -> Path:
    """A tiny MoE checkpoint, shared by the MoE tests (they only read it)."""
    root, _, _ = setup
    return init_checkpoint("tiny-moe", root / "init-moe", seed=0, num_hidden_layers=2)


def _recipe(root: Path, stage: str, model, train, run_dir: Path, **training) -> Path:
    recipe = {
        "stage": stage, "run_dir": str(run_dir), "model": str(model), "dtype": "float32",
        "inputs": {"train": str(train)}, "eval_fraction": 0.25, "seed": 0,
        "training": {"max_length": 256, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                     "logging_steps": 1, "gradient_checkpointing": False,
                     "save_strategy": "no", "disable_tqdm": True, **training},
    }
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sft_loss_falls_and_saves_a_standard_checkpoint(setup):
    root, model, data = setup
    recipe = _recipe(root, "sft", model, data["demonstrations"], root / "sft", max_steps=12, packing=True,
                     assistant_only_loss=True)
    manifest = run("sft", load_recipe(recipe))
    m = manifest["metrics"]
    assert m["last_logged_loss"] < 0.7 * m["first_logged_loss"]
    assert manifest["counts"] == {"rows_in": 96, "quarantined": 0, "merged_into_pairs": 0, "train": 72, "eval": 24}
    assert "eval_loss" in m and manifest["steps"] == 12
    assert m["startup_s"] < manifest["duration_s"] - m["train_runtime_s"]  # the wait before the first step, recorded
    assert (root / "sft" / "curves.png").stat().st_size > 0
    stock = transformers.AutoModelForCausalLM.from_pretrained(root / "sft")  # stock transformers loads it
    assert type(stock).__name__ == "Qwen2ForCausalLM"
    history = json.loads((root / "sft" / "metrics.json").read_text())["log_history"]
    accuracy = [h["mean_token_accuracy"] for h in history if "mean_token_accuracy" in h and "loss" in h]
    assert len(accuracy) == 12 and accuracy[-1] > accuracy[0] + 0.1  # the model learns the answer format


def test_trainer_tokenizer_tokenises_and_saves_as_loaded_and_hashes_stably(setup, tmp_path):
    """What TRL's trainers get (`load_trainer_tokenizer`) is the checkpoint's tokenizer less its construction
    copies: same ids and assistant masks, same saved files, and a fingerprint `datasets` reproduces."""
    from datasets.fingerprint import Hasher

    from alignment.tokenizer import load_tokenizer
    from alignment.train.common import load_trainer_tokenizer

    _, model, _ = setup
    loaded, trainer = load_tokenizer(str(model)), load_trainer_tokenizer(str(model))
    conversation = [{"role": "user", "content": "What is 12 * 7?"}, {"role": "assistant", "content": "12 * 7 = 84."}]
    encode = lambda tok: tok.apply_chat_template(conversation, return_dict=True,  # noqa: E731
                                                 return_assistant_tokens_mask=True)
    assert encode(trainer) == encode(loaded) and 1 in encode(trainer)["assistant_masks"]
    assert trainer("naïve café 🙂").input_ids == loaded("naïve café 🙂").input_ids
    loaded.save_pretrained(tmp_path / "loaded")
    trainer.save_pretrained(tmp_path / "trainer")
    files = sorted(p.name for p in (tmp_path / "loaded").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "trainer").iterdir())
    assert all((tmp_path / "loaded" / f).read_bytes() == (tmp_path / "trainer" / f).read_bytes() for f in files)
    assert Hasher.hash(trainer) == Hasher.hash(load_trainer_tokenizer(str(model)))  # map caches still hit


def test_packed_batch_loss_equals_samples_alone(setup):
    """TRL's padding-free collator packs samples into one row; our model keeps them apart."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from alignment.checkpoint import load_causal_lm

    _, model_dir, _ = setup
    model = load_causal_lm(model_dir).eval()
    a = {"input_ids": list(range(100, 117)), "labels": [-100] * 5 + list(range(105, 117))}
    b = {"input_ids": list(range(300, 311)), "labels": [-100] * 3 + list(range(303, 311))}
    packed = DataCollatorForLanguageModeling(pad_token_id=151643, padding_free=True)([a, b])
    assert "attention_mask" not in packed and packed["position_ids"].shape == (1, 28)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         labels=packed["labels"], num_items_in_batch=1).loss
        alone = sum(model(input_ids=torch.tensor([x["input_ids"]]), labels=torch.tensor([x["labels"]]),
                          num_items_in_batch=1).loss for x in (a, b))
    assert abs(together.item() - alone.item()) < 1e-3


def test_reward_model_trains_and_loads_in_stock_transformers(setup):
    root, model, data = setup
    path = _recipe(root, "rm", model, data["preferences"], root / "rm", max_steps=6)
    text = yaml.safe_load(Path(path).read_text())
    text["eval_fraction"], text["inputs"]["eval"] = 0.0, str(data["preferences"])
    Path(path).write_text(yaml.safe_dump(text))
    manifest = run("rm", load_recipe(path))
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(root / "rm")
    assert type(stock).__name__ == "Qwen2ForSequenceClassification" and stock.config.num_labels == 1
    from alignment.data import load_jsonl
    from alignment.reward_model import RewardModel

    scorer = RewardModel(str(root / "rm"))
    tok = scorer.tokenizer

    def stock_score(conversation: list[dict]) -> float:
        enc = tok(tok.apply_chat_template(conversation, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return stock(**enc).logits.item()

    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]
    assert abs(stock_score(conv) - scorer([conv])[0]) < 1e-4
    pairs = load_jsonl(data["preferences"])  # the held-out accuracy, recounted with stock transformers
    wins = sum(stock_score(p["prompt"] + p["chosen"]) > stock_score(p["prompt"] + p["rejected"]) for p in pairs)
    assert manifest["metrics"]["heldout_pair_accuracy"] == pytest.approx(wins / len(pairs))


def test_dpo_raises_the_margin_on_training_pairs(setup):
    root, model, data = setup
    recipe = _recipe(root, "dpo", model, data["preferences"], root / "dpo", max_steps=8, beta=0.1,
                     learning_rate=1e-3)
    yaml_path = Path(recipe)
    text = yaml.safe_load(yaml_path.read_text())
    text["eval_fraction"] = 0.0
    text["inputs"]["eval"] = str(data["preferences"])  # held-out = the training pairs here: it must move
    yaml_path.write_text(yaml.safe_dump(text))
    metrics = run("dpo", load_recipe(yaml_path))["metrics"]
    assert metrics["heldout_margin_policy"] > metrics["heldout_margin_reference"] + 1.0


def test_sft_killed_mid_training_resumes_to_the_same_weights(setup):
    root, model, data = setup
    common = dict(max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=None)
    ref = _recipe(root, "sft", model, data["demonstrations"], root / "sft-ref", **common)
    killed = _recipe(root, "sft", model, data["demonstrations"], root / "sft-killed", **common)
    cli = lambda r: subprocess.Popen([sys.executable, "-m", "qwen2_align.cli", "sft", "--recipe", str(r)],  # noqa: E731
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run("sft", load_recipe(ref))  # the uninterrupted reference, in this process
    proc = cli(killed)
    deadline = time.time() + 600
    while not (root / "sft-killed" / "checkpoint-4" / "trainer_state.json").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "sft-killed" / "manifest.json").exists()
    # as if the kill had landed while the Trainer wrote the newest checkpoint's state (last, and in place)
    newest = max((root / "sft-killed").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    (newest / "trainer_state.json").write_text("")
    resumed = cli(killed)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a = load_file(root / "sft-ref" / "model.safetensors")
    b = load_file(root / "sft-killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path: Path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None), (10, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_lora_sft_trains_adapters_only_and_saves_a_merged_model(setup):
    root, model, data = setup
    path = _recipe(root, "sft", model, data["demonstrations"], root / "sft-lora", max_steps=3, learning_rate=1e-2)
    text = yaml.safe_load(Path(path).read_text())
    text["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    Path(path).write_text(yaml.safe_dump(text))
    run("sft", load_recipe(path))
    saved = load_file(root / "sft-lora" / "model.safetensors")
    start = load_file(Path(model) / "model.safetensors")
    assert not any("lora" in k for k in saved) and saved.keys() == start.keys()  # merged into plain weights
    changed = {k for k in saved if not torch.equal(saved[k], start[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_moe_sft_and_dpo_train_with_the_router_aux_loss(setup, moe):
    """An MoE checkpoint goes through the same stages; TRL's trainers log the load-balancing loss."""
    root, _, data = setup
    sft = _recipe(root, "sft", moe, data["demonstrations"], root / "sft-moe", max_steps=6, packing=True)
    m = run("sft", load_recipe(sft))["metrics"]
    assert m["last_logged_loss"] < m["first_logged_loss"]
    history = json.loads((root / "sft-moe" / "metrics.json").read_text())["log_history"]
    assert all("aux_loss" in h for h in history if "loss" in h)  # its value: tests/test_train_recipes.py vs stock
    assert type(transformers.AutoModelForCausalLM.from_pretrained(root / "sft-moe")).__name__ == "Qwen2MoeForCausalLM"
    dpo = _recipe(root, "dpo", root / "sft-moe", data["preferences"], root / "dpo-moe", max_steps=2, beta=0.1)
    run("dpo", load_recipe(dpo))
    history = json.loads((root / "dpo-moe" / "metrics.json").read_text())["log_history"]
    assert all("aux_loss" in h for h in history if "loss" in h)


def test_moe_reward_model_trains_and_loads_in_stock_transformers(setup, moe):
    root, _, data = setup
    run("rm", load_recipe(_recipe(root, "rm", moe, data["preferences"], root / "rm-moe", max_steps=2)))
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(root / "rm-moe")
    assert type(stock).__name__ == "Qwen2MoeForSequenceClassification"
    from alignment.reward_model import RewardModel

    scorer = RewardModel(str(root / "rm-moe"))
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]
    enc = scorer.tokenizer(scorer.tokenizer.apply_chat_template(conv, tokenize=False), return_tensors="pt",
                           add_special_tokens=False)
    with torch.no_grad():
        assert abs(stock(**enc).logits.item() - scorer([conv])[0]) < 1e-4


def test_sft_and_dpo_train_on_hub_data_sets_as_users_have_them(setup, tmp_path):
    """Folders laid out like ultrachat_200k and ultrafeedback_binarized, named with their splits:
    nothing is quarantined and every row is trained or evaluated on."""
    root, model, _ = setup
    chat, feedback = ultrachat_folder(tmp_path / "ultrachat_200k"), ultrafeedback_folder(tmp_path / "ultrafeedback")
    for stage, folder, (train_split, eval_split), sizes, run_dir in (
        ("sft", chat, ULTRACHAT_SPLITS, ULTRACHAT_SPLITS, root / "sft-hub"),
        ("dpo", feedback, ULTRAFEEDBACK_SPLITS, ULTRAFEEDBACK_SPLITS, root / "dpo-hub"),
    ):
        path = _recipe(root, stage, model, "unused", run_dir, max_steps=2, beta=0.1) if stage == "dpo" else \
            _recipe(root, stage, model, "unused", run_dir, max_steps=2)
        text = yaml.safe_load(Path(path).read_text())
        text["eval_fraction"] = 0.0
        text["inputs"] = {"train": {"path": str(folder), "split": train_split},
                          "eval": {"path": str(folder), "split": eval_split}}
        Path(path).write_text(yaml.safe_dump(text))
        manifest = run(stage, load_recipe(path))
        assert manifest["counts"] == {"rows_in": sizes[train_split] + sizes[eval_split], "quarantined": 0,
                                      "merged_into_pairs": 0, "train": sizes[train_split], "eval": sizes[eval_split]}


def test_trainer_datasets_are_not_hashed_and_training_randomness_is_untouched():
    """Inside `unhashed_datasets` (around a TRL trainer's construction) `datasets` pickles no map argument, the
    tokenizer among them, and draws its fingerprints from its own generator, not the global random state."""
    import random

    import datasets

    from alignment.train.common import unhashed_datasets

    class Counted:
        pickled = 0

        def __reduce__(self):
            Counted.pickled += 1
            return (Counted, ())

    rows = datasets.Dataset.from_list([{"x": i} for i in range(4)])
    add = lambda row, argument: {"y": row["x"] + 1}  # noqa: E731
    rows.map(add, fn_kwargs={"argument": Counted()})
    assert Counted.pickled > 0  # outside: hashed for the fingerprint
    Counted.pickled = 0
    random.seed(3)
    state = random.getstate()
    with unhashed_datasets():
        first = rows.map(add, fn_kwargs={"argument": Counted()})
        second = rows.map(add, fn_kwargs={"argument": Counted()})
    assert Counted.pickled == 0 and random.getstate() == state
    assert first["y"] == [1, 2, 3, 4] and first._fingerprint != second._fingerprint
