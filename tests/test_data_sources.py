"""Data sets as users have them: Hub-layout folders, splits, fractions, mixtures, column
mappings, TRL's dataset types converted to our schema, and input fingerprints."""

import hashlib
import json

import datasets
import pytest
from helpers.hub_layouts import (ULTRACHAT_SPLITS, ultrachat_folder, ultrachat_rows, ultrafeedback_folder,
                                 ultrafeedback_rows, write_hub_folder)
from huggingface_hub import constants as hub_constants

from alignment.data import DataError, DataSource, content_id, read_rows, trl_dataset
from alignment.recipe_loader import RecipeError
from alignment.stages import Run, StageRecipe, describe_input
from qwen2_align.stage_table import load_recipe


@pytest.fixture(scope="module")
def ultrachat(tmp_path_factory):
    return ultrachat_folder(tmp_path_factory.mktemp("ultrachat_200k"))


@pytest.fixture(scope="module")
def ultrafeedback(tmp_path_factory):
    return ultrafeedback_folder(tmp_path_factory.mktemp("ultrafeedback_binarized"))


def _jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_ultrachat_folder_reads_as_demonstrations(ultrachat):
    result = read_rows(DataSource(str(ultrachat), split="train_sft"), "demonstration")
    source = ultrachat_rows("train_sft", 40)
    assert result.read == 40 and len(result.rows) == 40 and not result.quarantined
    assert [{k: v for k, v in r.items() if k != "id"} for r in result.rows] == [
        {"messages": s["messages"], "source": "", "meta": {"prompt": s["prompt"], "prompt_id": s["prompt_id"]}}
        for s in source]
    canonical = json.dumps({"messages": source[0]["messages"]}, sort_keys=True, separators=(",", ":"))
    assert result.rows[0]["id"] == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert len(set(_ids(result.rows))) == 40
    again = read_rows(DataSource(str(ultrachat), split="train_sft"), "demonstration")
    assert _ids(again.rows) == _ids(result.rows)


def test_split_selection(ultrachat):
    result = read_rows(DataSource(str(ultrachat), split="test_sft"), "demonstration")
    assert [r["messages"] for r in result.rows] == [s["messages"] for s in ultrachat_rows("test_sft", 10)]
    with pytest.raises(DataError) as e:
        read_rows(DataSource(str(ultrachat), split="validation"), "demonstration")
    assert str(e.value).startswith(f"{ultrachat}[validation]: cannot load this split (")
    assert "\n" not in str(e.value)


def test_ultrafeedback_folder_reads_as_preferences(ultrafeedback):
    result = read_rows(DataSource(str(ultrafeedback), split="train_prefs"), "preference")
    source = ultrafeedback_rows("train_prefs", 40)
    assert result.read == 40 and len(result.rows) == 40 and not result.quarantined
    for row, s in zip(result.rows, source):
        assert row["prompt"] == [{"role": "user", "content": s["prompt"]}]
        assert row["chosen"] == [s["chosen"][1]] and row["rejected"] == [s["rejected"][1]]
        assert row["meta"] == {k: s[k] for k in ("prompt_id", "messages", "score_chosen", "score_rejected")}
    assert len(set(_ids(result.rows))) == 40
    test = read_rows(DataSource(str(ultrafeedback), split="test_prefs"), "preference")
    assert [r["prompt"][0]["content"] for r in test.rows] == [s["prompt"] for s in ultrafeedback_rows("test_prefs", 10)]


def test_prompt_column_must_match_the_conversations(tmp_path):
    row = ultrafeedback_rows("train_prefs", 1)[0]
    path = _jsonl(tmp_path / "p.jsonl", [{**row, "prompt": "Another question?"}])
    result = read_rows(path, "preference")
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        (f"{path}:1", "prompt: differs from the turns that chosen and rejected share")]


def test_fraction_is_stable_nested_and_in_order(ultrachat):
    def fraction(f: float) -> list[dict]:
        return read_rows(DataSource(str(ultrachat), split="train_sft", fraction=f), "demonstration").rows

    everything = _ids(fraction(1.0))
    quarter, half = _ids(fraction(0.25)), _ids(fraction(0.5))
    assert len(quarter) == 10 and len(half) == 20
    assert quarter == _ids(fraction(0.25))
    assert set(quarter) < set(half)
    assert quarter == [i for i in everything if i in set(quarter)]  # source order
    assert quarter != everything[:10]  # a spread share, not the head


def test_mixture_concatenates_in_order(ultrachat, ultrafeedback):
    mixture = [DataSource(str(ultrachat), split="train_sft", fraction=0.5),
               DataSource(str(ultrachat), split="test_sft")]
    result = read_rows(mixture, "demonstration")
    train_half = read_rows(mixture[0], "demonstration").rows
    assert result.read == 30 and not result.quarantined
    assert result.rows == train_half + read_rows(mixture[1], "demonstration").rows
    preferences = read_rows([DataSource(str(ultrafeedback), split=s) for s in ("test_prefs", "train_prefs")],
                            "preference")
    assert len(preferences.rows) == 50 and preferences.rows[0]["prompt"][0]["content"].startswith("[test_prefs]")


def test_column_mapping(tmp_path):
    rows = [{"uid": f"u{i}", "conversation": s["messages"]} for i, s in enumerate(ultrachat_rows("train_sft", 5))]
    path = tmp_path / "mapped.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    result = read_rows(DataSource(str(path), columns={"id": "uid", "messages": "conversation"}), "demonstration")
    assert _ids(result.rows) == [f"u{i}" for i in range(5)] and not result.quarantined
    assert [r["messages"] for r in result.rows] == [r["conversation"] for r in rows]
    assert all(r["meta"] == {} for r in result.rows)
    with pytest.raises(DataError, match=r"mapped\.parquet: columns\.messages: no column 'dialogue'"):
        read_rows(DataSource(str(path), columns={"messages": "dialogue"}), "demonstration")


def test_bad_row_in_a_mixture_is_quarantined_with_file_row_and_field(tmp_path, ultrachat):
    rows = ultrachat_rows("train_sft", 6)
    rows[4]["messages"][1]["content"] = "  "
    bad_folder = write_hub_folder(tmp_path / "bad", {"train_sft": rows})
    bad_file = _jsonl(tmp_path / "extra.jsonl", [{"messages": rows[1]["messages"]}, "{not json"])
    result = read_rows([DataSource(str(ultrachat), split="test_sft"), DataSource(str(bad_folder), split="train_sft"),
                        bad_file], "demonstration")
    assert [(q.origin, q.reason.split(" (")[0]) for q in result.quarantined] == [
        (f"{bad_folder}[train_sft]:5", "messages: a user or assistant message is empty"),
        (f"{bad_file}:1", f"id: duplicate id {content_id({'messages': rows[1]['messages']})!r}"),
        (f"{bad_file}:2", "malformed JSON"),
    ]
    assert result.read == 10 + 6 + 2 == len(result.rows) + len(result.quarantined)


def test_trl_dataset_types_convert_to_our_schema(tmp_path):
    user, reply = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    demos = read_rows(_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Hi?", "completion": "Hello."},  # prompt-completion, strings
        {"prompt": [user], "completion": [{"role": "assistant", "content": "Hey."}], "lang": "en"},
    ]), "demonstration")
    assert [r["messages"] for r in demos.rows] == [[user, reply], [user, {"role": "assistant", "content": "Hey."}]]
    assert demos.rows[1]["meta"] == {"lang": "en"} and not demos.quarantined

    text = read_rows(_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": " "}]), "demonstration")
    assert [(r["text"], r["meta"]) for r in text.rows] == [("Once upon a time.", {})]
    assert [q.reason for q in text.quarantined] == ["text: must be a non-empty string"]

    prefs = read_rows(_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},  # explicit prompt, strings
        {"chosen": [user, reply], "rejected": [user, {"role": "assistant", "content": "No."}]},  # implicit prompt
    ]), "preference")
    assert [(r["prompt"], r["chosen"], r["rejected"][0]["content"]) for r in prefs.rows] == [
        ([user], [reply], "Go away."), ([user], [reply], "No.")]

    prompts = read_rows(_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi?"}]), "prompt")
    assert prompts.rows[0]["messages"] == [user]


def test_unpaired_preferences_are_paired_and_leftovers_quarantined(tmp_path):
    path = _jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Hi?", "completion": "Hello.", "label": True, "rater": "a"},
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "Hi?", "completion": "Go away.", "label": False, "rater": "b"},
        {"prompt": "Hi?", "completion": "Hey there.", "label": True},
        {"prompt": "3+3?", "completion": "7", "label": "no"},
    ])
    result = read_rows(path, "preference")
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["meta"])
            for r in result.rows] == [("Hi?", "Hello.", "Go away.", {"chosen": {"rater": "a"}, "rejected": {"rater": "b"}})]
    assert [(q.origin, q.reason) for q in result.quarantined] == [
        (f"{path}:5", "label: must be true or false, got 'no'"),
        (f"{path}:4", "label: no False completion of the same prompt to pair with"),
        (f"{path}:2", "label: no False completion of the same prompt to pair with"),
    ]
    assert result.read == 5 and result.merged == 1


def test_text_and_messages_do_not_mix(tmp_path, ultrachat):
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "Plain text."}])
    with pytest.raises(DataError) as e:
        read_rows([DataSource(str(ultrachat), split="test_sft"), text], "demonstration")
    assert str(e.value) == (f"{text}:1: a plain text row, but {ultrachat}[test_sft]:1 is a conversation; "
                            "an input must be all text or all messages")


def test_trl_dataset_columns(ultrachat, ultrafeedback, tmp_path):
    demos = read_rows(DataSource(str(ultrachat), split="test_sft"), "demonstration").rows
    assert trl_dataset(demos, "demonstration")["messages"] == [r["messages"] for r in demos]
    text = read_rows(_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}]), "demonstration").rows
    assert trl_dataset(text, "demonstration").column_names == ["text"]
    prefs = read_rows(DataSource(str(ultrafeedback), split="test_prefs"), "preference").rows
    ds = trl_dataset(prefs, "preference")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and ds[3]["chosen"] == prefs[3]["chosen"]


def test_fingerprint_follows_data_files_and_split(tmp_path, monkeypatch):
    folder = ultrachat_folder(tmp_path / "uc")

    def fingerprint(source: DataSource, workdir: str) -> str:
        """The stage fingerprint of a recipe reading `source`, run from a fresh directory (same run_dir text)."""
        (tmp_path / workdir).mkdir()
        monkeypatch.chdir(tmp_path / workdir)
        return Run.start("t", StageRecipe(stage="t", run_dir="run", inputs={"x": source}), ["x"]).fingerprint

    train = DataSource(str(folder), split="train_sft")
    described = describe_input(train)
    assert described["split"] == "train_sft" and len(described["sha256"]) == 64
    before = fingerprint(train, "a")
    assert fingerprint(train, "b") == before
    assert fingerprint(DataSource(str(folder), split="test_sft"), "c") != before
    assert fingerprint(DataSource(str(folder), split="train_sft", fraction=0.5), "d") != before
    rows = ultrachat_rows("test_sft", ULTRACHAT_SPLITS["test_sft"])
    rows[0]["prompt"] += " (edited)"
    write_hub_folder(folder, {"test_sft": rows})
    assert describe_input(train)["sha256"] != described["sha256"]
    assert fingerprint(train, "e") != before
    mixture = describe_input([train, str(folder / "data" / "test_sft-00000-of-00001.parquet")])
    assert [len(m["sha256"]) for m in mixture["mixture"]] == [64, 64]


def test_hub_id_offline_revision(tmp_path):
    if not hub_constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it)")
    assert describe_input("HuggingFaceH4/ultrachat_200k")["revision"] == "unresolved"
    pinned = describe_input(DataSource("HuggingFaceH4/ultrachat_200k", split="train_sft", revision="abc123"))
    assert (pinned["hub"], pinned["revision"], pinned["split"]) == (True, "abc123", "train_sft")


def _recipe(tmp_path, inputs: str) -> str:
    path = tmp_path / "sft.yaml"
    path.write_text(f"stage: sft\nrun_dir: run\nmodel: m\ninputs:\n{inputs}")
    return str(path)


def test_recipe_inputs_take_strings_sources_and_mixtures(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "  train: [a.jsonl, {path: org/data, split: train_sft, fraction: 0.5}]\n"
                                           "  eval: {path: org/data, split: test_sft, columns: {id: uid}}\n"))
    assert recipe.inputs["train"] == ["a.jsonl", DataSource("org/data", split="train_sft", fraction=0.5)]
    assert recipe.inputs["eval"] == DataSource("org/data", split="test_sft", columns={"id": "uid"})
    generate = tmp_path / "generate.yaml"
    generate.write_text("stage: generate\nrun_dir: run\ninputs: {prompts: {path: org/prompts}}\n")
    assert load_recipe(generate).inputs["prompts"] == DataSource("org/prompts")


@pytest.mark.parametrize("inputs, error", [
    ("  train: {path: d, fraction: 1.5}\n", "inputs.train.fraction: must be > 0 and <= 1, got 1.5"),
    ("  train: [a.jsonl, {path: d, splt: x}]\n", "inputs.train[1].splt: unknown key (did you mean 'split'?)"),
    ("  train: {split: x}\n", "inputs.train.path: required key is missing"),
    ("  train: [a.jsonl, 3]\n", "inputs.train[1]: expected str | DataSource, got int 3"),
])
def test_recipe_input_errors_are_one_line(tmp_path, inputs, error):
    path = _recipe(tmp_path, inputs)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: {error}") and "\n" not in str(e.value)
