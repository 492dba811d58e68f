"""Data sets: validation, quarantine with file/row/field, and the row-count identity."""

import json

import datasets
import pytest

from alignment.data import DataError, read_rows, row_problem

GOOD_DEMO = {"id": "d1", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
GOOD_PREF = {
    "id": "p1",
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def _jsonl(tmp_path, lines: list) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_quarantine_names_file_row_and_field(tmp_path):
    lines = [
        GOOD_DEMO,
        '{"id": "broken", "messages": [',  # malformed JSON
        {"messages": GOOD_DEMO["messages"]},  # missing id
        {"id": "d3", "messages": []},  # empty messages
        {"id": "d4", "messages": [{"role": "robot", "content": "hi"}]},  # wrong role
        {"id": "d5", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
        {"id": "d6", "messages": [{"role": "user", "content": "hi"}]},  # no assistant reply
        {"id": "d7", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
        {**GOOD_DEMO, "id": "d8", "meta": "not a mapping"},
        {**GOOD_DEMO, "id": "d1"},  # duplicate id
        {**GOOD_DEMO, "id": "d9", "source": "unit-test"},
    ]
    path = _jsonl(tmp_path, lines)
    result = read_rows(path, "demonstration")
    assert result.read == 11 and len(result.rows) == 2 and len(result.quarantined) == 9
    assert [r["id"] for r in result.rows] == ["d1", "d9"]
    assert result.rows[0]["source"] == "" and result.rows[0]["meta"] == {}  # normalised
    reasons = {q.origin: q.reason for q in result.quarantined}
    assert reasons[f"{path}:2"].startswith("malformed JSON")
    assert reasons[f"{path}:3"] == "id: must be a non-empty string"
    assert reasons[f"{path}:4"] == "messages: must be a non-empty list of messages"
    assert reasons[f"{path}:5"] == "messages[0].role: must be one of ['system', 'user', 'assistant'], got 'robot'"
    assert reasons[f"{path}:6"] == "messages: roles must alternate user/assistant, turn 1 is 'user'"
    assert reasons[f"{path}:7"] == "messages: the last message must be from the assistant"
    assert reasons[f"{path}:8"] == "messages: a user or assistant message is empty"
    assert reasons[f"{path}:9"] == "meta: must be a mapping"
    assert reasons[f"{path}:10"] == "id: duplicate id 'd1'"


def test_preference_rows(tmp_path):
    bad_chosen = {**GOOD_PREF, "id": "p2", "chosen": [{"role": "user", "content": "4"}]}
    same = {**GOOD_PREF, "id": "p3", "rejected": GOOD_PREF["chosen"]}
    two = {**GOOD_PREF, "id": "p4", "chosen": GOOD_PREF["chosen"] * 2}
    prompt_ends_assistant = {**GOOD_PREF, "id": "p5", "prompt": GOOD_DEMO["messages"]}
    result = read_rows(_jsonl(tmp_path, [GOOD_PREF, bad_chosen, same, two, prompt_ends_assistant]), "preference")
    assert [r["id"] for r in result.rows] == ["p1"]
    assert [q.reason for q in result.quarantined] == [
        "chosen[0].role: must be 'assistant'",
        "chosen: identical to rejected",
        "chosen: must hold exactly one assistant message",
        "prompt: the last message must be from the user",
    ]
    assert row_problem(GOOD_PREF, "preference") is None


def test_parquet_via_datasets(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([GOOD_DEMO, {**GOOD_DEMO, "id": "d2"}]).to_parquet(str(path))
    result = read_rows(path, "demonstration")
    assert [r["id"] for r in result.rows] == ["d1", "d2"] and not result.quarantined


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_rows(tmp_path / "nope.jsonl", "demonstration")
