"""SFT's `inputs.replay`: pretraining text trained on alongside D, every token labelled, while D keeps its
assistant-only labels; the other trainer stages refuse it in one line."""

import json
from pathlib import Path

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import write_rows
from alignment.recipe_loader import RecipeError
from alignment.stages import Run
from alignment.train.common import load_training_data
from alignment.train.sft import build_sft_trainer
from qwen2_align.stage_table import load_recipe, run

DEMONSTRATIONS = [
    {"id": "d0", "messages": [{"role": "system", "content": "You answer in one line."},
                              {"role": "user", "content": "What is 3 + 4?"},
                              {"role": "assistant", "content": "3 + 4 = 7."}]},
    {"id": "d1", "messages": [{"role": "user", "content": "Name a prime above 10."},
                              {"role": "assistant", "content": "11 is a prime."}]},
    {"id": "d2", "messages": [{"role": "user", "content": "Spell cat backwards."},
                              {"role": "assistant", "content": "tac"},
                              {"role": "user", "content": "And dog?"},
                              {"role": "assistant", "content": "god"}]},
]
REPLAY = [
    {"id": "p0", "text": "The river ran north past the mill, and the miller's dog slept in the sun."},
    {"id": "p1", "text": "Granite is an igneous rock made mostly of quartz and feldspar."},
    {"id": "p2", "text": "In 1850 the town had two bakeries and one school."},
]
BAD_REPLAY = {"id": "p3", "text": "   "}  # quarantined: an empty text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    model = init_checkpoint("tiny", root / "init", seed=0, num_hidden_layers=2)
    write_rows(root / "demonstrations.jsonl", DEMONSTRATIONS)
    write_rows(root / "pretrain.jsonl", REPLAY + [BAD_REPLAY])
    return root, model


def _write_recipe(root: Path, stage: str, name: str, model: str | None, keys: dict | None = None, **training) -> Path:
    recipe = {"stage": stage, "run_dir": str(root / name), "dtype": "float32", **(keys or {}),
              "inputs": {"train": str(root / "demonstrations.jsonl"),
                         "replay": {"path": str(root / "pretrain.jsonl")}},
              "training": {"max_length": 128, "per_device_train_batch_size": 2, "logging_steps": 1,
                           "gradient_checkpointing": False, "save_strategy": "no", "disable_tqdm": True, **training}}
    if model is not None:
        recipe["model"] = model
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _samples(dataset) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input ids, labels) of each sample in a prepared dataset: a packed row is cut at its `seq_lengths`."""
    samples = []
    for row in dataset:
        start = 0
        for length in row.get("seq_lengths", [len(row["input_ids"])]):
            end = start + length
            samples.append((tuple(row["input_ids"][start:end]), tuple(row["labels"][start:end])))
            start = end
    return samples


@pytest.mark.parametrize("packing", [True, False])
def test_replay_text_is_all_labelled_and_demonstrations_only_on_assistant_tokens(setup, packing):
    root, model = setup
    recipe = load_recipe(_write_recipe(root, "sft", f"sft-packing-{packing}", str(model), packing=packing,
                                       assistant_only_loss=True))
    data = load_training_data(recipe, "demonstration", Run.start("sft", recipe, ["train", "replay"]))
    assert data.counts == {"rows_in": 7, "quarantined": 1, "merged_into_pairs": 0, "train": 3, "eval": 0, "replay": 3}
    quarantined = [json.loads(line) for line in (root / f"sft-packing-{packing}" / "quarantine.jsonl").open()]
    assert [q["row"]["id"] for q in quarantined] == ["p3"]
    trainer = build_sft_trainer(recipe, data, recipe.model)
    tokenizer = trainer.processing_class

    demonstrations = []
    for row in DEMONSTRATIONS:
        encoded = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        labels = [t if m else -100 for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
        demonstrations.append((tuple(encoded["input_ids"]), tuple(labels)))
    replay = []
    for row in REPLAY:  # TRL ends a text with the tokenizer's EOS and labels every token
        ids = tuple(tokenizer(row["text"] + tokenizer.eos_token).input_ids)
        replay.append((ids, ids))

    samples = _samples(trainer.train_dataset)
    assert sorted(samples) == sorted(demonstrations + replay)  # nothing dropped, nothing added, labels as expected
    # Spelled out: the system and user tokens of D are out of the loss, and only those.
    system_ids = tokenizer(DEMONSTRATIONS[0]["messages"][0]["content"]).input_ids
    d0_ids, d0_labels = next(s for s in samples if s == demonstrations[0])
    start = next(i for i in range(len(d0_ids)) if list(d0_ids[i:i + len(system_ids)]) == system_ids)
    assert set(d0_labels[start:start + len(system_ids)]) == {-100}
    assert 0 < sum(label != -100 for label in d0_labels) < len(d0_labels)
    labelled = sum(label != -100 for _, labels in samples for label in labels)
    replay_tokens = sum(len(ids) for ids, _ in replay)
    assert labelled == sum(sum(m) for m in (
        tokenizer.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True)
        ["assistant_masks"] for r in DEMONSTRATIONS)) + replay_tokens
    assert trainer.replay_tokens == replay_tokens
    if packing:
        assert set(trainer.train_dataset.column_names) == {"input_ids", "labels", "seq_lengths"}
    else:
        assert len(trainer.train_dataset) == len(DEMONSTRATIONS) + len(REPLAY)


def test_replay_counts_and_tokens_reach_the_manifest(setup):
    root, model = setup
    manifest = run("sft", load_recipe(_write_recipe(root, "sft", "sft-run", str(model), packing=True,
                                                    assistant_only_loss=True, max_steps=1)))
    assert manifest["counts"]["replay"] == 3 and manifest["counts"]["quarantined"] == 1
    assert manifest["inputs"]["replay"]  # fingerprinted with the run's other inputs
    assert manifest["metrics"]["replay_tokens"] > 0


@pytest.mark.parametrize("stage", ["dpo", "rm", "online-dpo", "pretrain"])
def test_replay_is_refused_by_the_other_trainer_stages_in_one_line(setup, stage):
    root, model = setup
    keys = {"merging": {"method": "none"}} if stage == "online-dpo" else {}  # its default merging needs a base model
    path = _write_recipe(root, stage, f"refused-{stage}", None if stage == "pretrain" else str(model), keys)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}: inputs.replay: only the sft stage") and "\n" not in message
