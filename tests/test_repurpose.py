"""Data repurposing: instructions at each detail level answered by the original text, byte for byte;
role-play conversations with the character profile as the system prompt."""

import json

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import read_rows
from alignment.generation import Completion
from alignment.recipe_loader import RecipeError
from alignment.stages import ShardContext
from data_synthesis.repurpose import DETAIL_TEMPLATES, RepurposeStage, clean_instruction
from qwen2_align.stage_table import load_recipe, run

TEXTS = [
    {"id": "t0", "text": "It is a truth universally acknowledged, that a single man in possession of a good "
                         "fortune, must be in want of a wife."},
    {"id": "t1", "text": "Call me Ishmael.  Some years ago\u2014never mind how long precisely\u2014I went to sea.\n"},
    {"id": "t2", "text": "It was the best of times, it was the worst of times."},
    {"id": "t3", "text": "Alice was beginning to get very tired of sitting by her sister on the bank."},
]
PROFILES = [
    {"id": "p0", "text": "You are Maren, a dry-humoured lighthouse keeper in the 1890s.", "meta": {"name": "Maren"}},
    {"id": "p1", "text": "You are Tobias, a talkative clockmaker's apprentice.", "meta": {"name": "Tobias"}},
]


def _recipe(tmp_path, kind="literature", **extra) -> dict:
    inputs = ({"documents": str(tmp_path / "texts.jsonl")} if kind == "literature"
              else {"profiles": str(tmp_path / "profiles.jsonl")})
    return {"stage": "repurpose", "run_dir": str(tmp_path / f"run-{kind}"), "seed": 5, "shard_size": 2,
            "inputs": inputs, "kind": kind,
            "generation": {"backend": "transformers", "model": str(tmp_path / "init"), "dtype": "float32",
                           "n": 1, "temperature": 1.0, "max_new_tokens": 8}, **extra}


def _load(tmp_path, data: dict):
    path = tmp_path / "repurpose.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_recipes_are_checked(tmp_path):
    for preset in ("tiny", "qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"):
        assert load_recipe(f"recipes/{preset}/repurpose.yaml").detail_levels == list(DETAIL_TEMPLATES)
    assert load_recipe("recipes/tiny/repurpose-roleplay.yaml").kind == "roleplay"
    assert _load(tmp_path, _recipe(tmp_path)).detail_levels == ["brief", "detailed", "very_detailed"]
    cases = [({"detail_levels": ["brief", "terse"]}, "detail_levels: unknown level 'terse'"),
             ({"detail_levels": ["brief", "brief"]}, "detail_levels: level 'brief' is listed twice"),
             ({"detail_levels": []}, "detail_levels: must list at least one")]
    for extra, expected in cases:
        with pytest.raises(RecipeError, match=expected):
            _load(tmp_path, _recipe(tmp_path, **extra))
    data = _recipe(tmp_path)
    data["generation"]["n"] = 2
    with pytest.raises(RecipeError, match="generation.n: must be 1"):
        _load(tmp_path, data)


def test_clean_instruction_drops_degenerate_ones():
    text = "Call me Ishmael."
    assert clean_instruction('  Instruction: "Open a novel in the first person."\n', text) == \
        "Open a novel in the first person."
    assert clean_instruction("Write one line.", text) == "Write one line."
    for bad in ("", "   \n", '""', "Instruction:", "Rewrite this: Call me Ishmael. Please."):
        assert clean_instruction(bad, text) == "", bad


class _Scripted:
    """A backend whose reply to each prompt comes from `answer(messages)`."""

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def generate(self, prompts, params):
        assert params.n == 1
        self.prompts += prompts
        return [[Completion(self.answer(p), 1, "stop")] for p in prompts]


def test_literature_rows_keep_the_text_and_drop_bad_instructions(tmp_path):
    stage = RepurposeStage(_load(tmp_path, _recipe(tmp_path)))
    rows = [dict(r, source="lit", meta={"work": r["id"]}) for r in TEXTS[:3]]

    def answer(messages):
        prompt = messages[-1]["content"]
        level = next(name for name, t in DETAIL_TEMPLATES.items() if prompt.startswith(t.split("{text}")[0]))
        if TEXTS[1]["text"] in prompt:  # every instruction for t1 is degenerate: t1 is quarantined
            return "" if level == "brief" else f"Repeat: {TEXTS[1]['text']}"
        if TEXTS[2]["text"] in prompt and level == "detailed":  # one level dropped
            return "   "
        return f"Instruction: write the {level} piece."

    stage.generator = _Scripted(answer)
    outcomes = stage.process(rows, ShardContext(0, 9))
    assert len(stage.generator.prompts) == 3 * 3  # texts x levels
    assert [len(o["demonstrations"]) for o in (outcomes[0], outcomes[2])] == [3, 2]
    assert "no level gave a usable instruction" in outcomes[1].reason and outcomes[1].row == rows[1]
    for row, out in ((rows[0], outcomes[0]), (rows[2], outcomes[2])):
        for d in out["demonstrations"]:
            level = d["meta"]["lineage"]["level"]
            assert d["messages"] == [{"role": "user", "content": f"write the {level} piece."},
                                     {"role": "assistant", "content": row["text"]}]
            assert d["meta"] == {"work": row["id"], "lineage": {
                "stage": "repurpose", "model": str(tmp_path / "init"), "seed": 9, "parent_id": row["id"],
                "kind": "literature", "level": level}}
            assert d["id"] == f"{row['id']}-{level}"
    assert [d["meta"]["lineage"]["level"] for d in outcomes[2]["demonstrations"]] == ["brief", "very_detailed"]


def test_roleplay_rows_have_the_profile_as_system_prompt(tmp_path):
    stage = RepurposeStage(_load(tmp_path, _recipe(tmp_path, kind="roleplay")))
    assert stage.inputs == {"profiles": "text"}
    rows = [dict(r, source="rp") for r in PROFILES] + [{"id": "p2", "text": "You are nobody.", "source": "",
                                                         "meta": {}}]

    def answer(messages):
        if messages[0]["role"] == "system":  # the in-character reply
            return f"(in character as {messages[0]['content'][8:14]}) Good evening."
        return "" if "nobody" in messages[-1]["content"] else "Message: Good evening, who are you?"

    stage.generator = _Scripted(answer)
    outcomes = stage.process(rows, ShardContext(0, 4))
    assert len(stage.generator.prompts) == 3 + 2  # openings for all, replies for the two with an opening
    assert "opening message was empty" in outcomes[2].reason
    for row, out in zip(rows, outcomes[:2]):
        [d] = out["demonstrations"]
        assert d["messages"] == [{"role": "system", "content": row["text"]},
                                 {"role": "user", "content": "Good evening, who are you?"},
                                 {"role": "assistant", "content": f"(in character as {row['text'][8:14]}) Good evening."}]
        assert d["meta"] == row["meta"] | {"lineage": {"stage": "repurpose", "model": str(tmp_path / "init"),
                                                       "seed": 4, "parent_id": row["id"], "kind": "roleplay"}}
    # the teacher replied with exactly the profile as its system prompt
    assert [p[0] for p in stage.generator.prompts[3:]] == [{"role": "system", "content": r["text"]} for r in rows[:2]]


def test_both_kinds_run_on_the_tiny_model_and_resume(tmp_path):
    init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    _write(tmp_path / "texts.jsonl", TEXTS + [{"id": "no-text", "text": "  "}])
    _write(tmp_path / "profiles.jsonl", PROFILES)
    recipe = _load(tmp_path, _recipe(tmp_path))
    manifest = run("repurpose", recipe)
    counts, out = manifest["counts"], tmp_path / "run-literature"
    assert counts["rows_in"] == 5 and counts["quarantined_on_read"] == 1
    assert counts["processed"] + counts["quarantined_by_stage"] == 4
    quarantine = (out / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == counts["quarantined_on_read"] + counts["quarantined_by_stage"]
    by_level = manifest["repurpose"]["rows_by_level"]
    assert counts["outputs"]["demonstrations"] == sum(by_level.values())
    assert counts["outputs"]["demonstrations"] == 4 * 3  # 8 random tokens: never empty, never the whole text

    demos = read_rows(out / "demonstrations.jsonl", "demonstration")
    assert not demos.quarantined and len(demos.rows) == 12  # SFT takes them as they are
    raw = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    for d in raw:
        lineage = d["meta"]["lineage"]
        assert set(lineage) == {"stage", "model", "seed", "parent_id", "kind", "level"}
        parent = next(t for t in TEXTS if t["id"] == lineage["parent_id"])
        assert d["messages"][-1] == {"role": "assistant", "content": parent["text"]}  # byte-identical
        assert d["messages"][0]["role"] == "user" and d["messages"][0]["content"].strip()
    assert any(t["text"].endswith("\n") for t in TEXTS)  # trailing whitespace is kept too

    # killed mid-run: the last shard and the outputs gone; the resumed run writes the same bytes
    finished = (out / "demonstrations.jsonl").read_bytes()
    for name in ("manifest.json", "demonstrations.jsonl"):
        (out / name).unlink()
    (out / "shards" / "00001.jsonl").unlink()
    resumed = run("repurpose", load_recipe(tmp_path / "repurpose.yaml"))
    assert resumed["shards"]["resumed"] == 1
    assert (out / "demonstrations.jsonl").read_bytes() == finished

    manifest = run("repurpose", _load(tmp_path, _recipe(tmp_path, kind="roleplay")))
    counts = manifest["counts"]
    assert counts["processed"] + counts["quarantined_by_stage"] == 2
    assert counts["outputs"]["demonstrations"] == counts["processed"] == 2
    for d in read_rows(tmp_path / "run-roleplay" / "demonstrations.jsonl", "demonstration").rows:
        profile = next(p for p in PROFILES if p["id"] == d["meta"]["lineage"]["parent_id"])
        assert d["messages"][0] == {"role": "system", "content": profile["text"]}
        assert [m["role"] for m in d["messages"]] == ["system", "user", "assistant"]
        assert d["meta"]["name"] == profile["meta"]["name"] and d["meta"]["lineage"]["kind"] == "roleplay"
