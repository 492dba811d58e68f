"""InsTag: lenient JSON reading of tagger answers, each normalisation step on tag lists with known answers
(real MiniLM embeddings, real FP-Growth), manual refinements, and the stage end to end."""

import json

import numpy as np
import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import read_rows
from alignment.generation import Completion
from alignment.recipe_loader import RecipeError
from alignment.stages import StageError
from data_synthesis.instag import load_refinements, normalise_tags, parse_tags, sentence_embedder
from qwen2_align.stage_table import load_recipe, run

AUTO = dict(min_tag_frequency=1, semantic_min_similarity=0.8, association_min_support=2,
            association_min_confidence=0.99)


def _apart(phrases: list[str]) -> np.ndarray:
    """Orthogonal embeddings: the semantic step merges nothing, so the other steps are seen alone."""
    return np.eye(len(phrases))


def _ontology(tag_lists, embed=_apart, **overrides):
    return normalise_tags(tag_lists, embed=embed, **(AUTO | overrides))


@pytest.mark.parametrize("text, tags", [
    ('```json\n[{"tag": "math", "explanation": "arithmetic"}]\n```', ["math"]),
    ('Sure, here you go:\n[{"tag": "coding", "explanation": "a function"}]\nHope this helps! [1]', ["coding"]),
    ('[{"tag": "a", "explanation": "x", "sure": true,}, {"tag": "b", "explanation": null},]', ["a", "b"]),
    ("[{'tag': 'translation', 'explanation': \"it's French\"}]", ["translation"]),
    ('Tags:\n```\n{"tag": "advice", "explanation": "one object"}\n```', ["advice"]),
    ('{"tags": [{"tag": "x"}, {"tag": " x "}, {"tag": "y"}]}', ["x", "y"]),
])
def test_tags_are_read_from_fences_prose_trailing_commas_and_single_quotes(text, tags):
    assert parse_tags(text) == tags


@pytest.mark.parametrize("text", ["I am not sure what you mean.", "[{", '[{"tag": ""}]', "[]", '{"tag": 3}',
                                  "[__import__('os').system('touch /tmp/instag-pwned')]"])
def test_unreadable_answers_give_none(text):
    assert parse_tags(text) is None


def test_rule_aggregation_merges_stem_variants():
    onto = _ontology([["sorting", "Python"], ["sorts"], ["Sort!", "data_analysis"], ["Data  Analysis?"]])
    assert {raw: onto.mapping[raw] for raw in ("sorting", "sorts", "Sort!")} == dict.fromkeys(
        ("sorting", "sorts", "Sort!"), "sort")
    assert onto.mapping["data_analysis"] == onto.mapping["Data  Analysis?"] == "data analysis"
    assert onto.mapping["Python"] == "python"
    assert onto.tags_after["rule"] == 3 and onto.merges["rule"] == 3


def test_semantic_aggregation_merges_measured_near_synonyms_only():
    # all-MiniLM-L6-v2 cosine similarity, measured: math/mathematics 0.91, translation/language translation
    # 0.84, coding/programming 0.75, email writing/letter writing 0.70, math/poetry far below
    embed = sentence_embedder("all-MiniLM-L6-v2")
    rows = [["math"], ["mathematics"], ["translation"], ["language translation"], ["coding"], ["programming"],
            ["email writing"], ["letter writing"], ["poetry"]]
    onto = _ontology(rows, embed=embed)
    assert onto.mapping["mathematics"] == onto.mapping["math"] == "math"
    assert onto.mapping["language translation"] == "translation"
    assert len({onto.mapping[t] for t in ("coding", "programming", "email writing", "letter writing", "poetry",
                                           "math")}) == 6
    assert onto.merges["semantic"] == 2
    strict = _ontology(rows, embed=embed, semantic_min_similarity=0.95)  # the paper's 0.05 read as a distance
    assert strict.merges["semantic"] == 0


def test_association_merges_tags_that_always_co_occur():
    rows = [["python", "snake case"], ["python", "snake case", "web"], ["web"], ["web", "css"], ["css", "web"],
            ["lonely", "pair"]]
    onto = _ontology(rows)
    assert onto.mapping["python"] == onto.mapping["snake case"]  # 2 of 2 both ways
    assert onto.mapping["css"] != onto.mapping["web"]  # css -> web always, web -> css 2 of 4
    assert onto.mapping["lonely"] != onto.mapping["pair"]  # always together, but on 1 < 2 instructions
    assert onto.merges["association"] == 1
    assert _ontology(rows, association_min_support=1).merges["association"] == 2


def test_rare_tags_drop_and_rows_keep_the_rest():
    onto = _ontology([["math", "once"], ["math"], ["Math!"]], min_tag_frequency=2)
    assert "once" not in onto.mapping and "Math!" not in onto.mapping  # raw strings are counted, as in the paper
    assert onto.normalise(["math", "once"]) == ["math"]
    assert onto.tags_after["raw"] == 3 and onto.tags_after["frequency"] == 1


def test_refinements_apply_after_the_automatic_steps(tmp_path):
    rows = [["sorting", "python"], ["Sort!", "python"], ["poetry"], ["junk"]]
    path = tmp_path / "edits.yaml"
    path.write_text(yaml.safe_dump({"merges": {"poetry": "creative writing", "python": "sort"},
                                    "renames": {"sort": "sorting code"}, "deletions": ["junk", "not a tag"]}))
    first = _ontology(rows, association_min_support=3, refinements=load_refinements(path))
    assert first.mapping == {"sorting": "sorting code", "Sort!": "sorting code", "python": "sorting code",
                             "poetry": "creative writing"}
    assert first.unmatched_refinements == ["not a tag"] and first.merges["manual"] == 2
    again = _ontology(rows, association_min_support=3, refinements=load_refinements(path))
    assert again.mapping == first.mapping  # every run applies them
    assert _ontology(rows, association_min_support=3).mapping["python"] == "python"
    for text, message in [("merge: {}\n", "merge: unknown key"), ("deletions: junk\n", "deletions: expected a list"),
                          ("renames: {a: ''}\n", "renames: must map tag names")]:
        path.write_text(text)
        with pytest.raises(RecipeError, match=message):
            load_refinements(path)


def _recipe(tmp_path, **extra) -> dict:
    return {"stage": "instag", "run_dir": str(tmp_path / "run"), "seed": 1, "shard_size": 3,
            "inputs": {"instructions": str(tmp_path / "instructions.jsonl")},
            "generation": {"backend": "transformers", "model": str(tmp_path / "init"), "dtype": "float32",
                           "n": 1, "temperature": 1.0, "max_new_tokens": 8},
            **AUTO, **extra}


def _write(tmp_path, recipe: dict, instructions: list[str]):
    (tmp_path / "instructions.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": q}], "source": "t", "meta": {"k": i}})
        + "\n" for i, q in enumerate(instructions)))
    path = tmp_path / "instag.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_checks(tmp_path):
    cases = [({"semantic_min_similarity": 0.05}, "semantic_min_similarity: must be >= 0.5"),
             ({"refinements": str(tmp_path / "missing.yaml")}, "refinements file not found"),
             ({"min_tag_frequency": 0}, "must be >= 1")]
    for extra, message in cases:
        with pytest.raises(RecipeError, match=message):
            load_recipe(_write(tmp_path, _recipe(tmp_path, **extra), ["x"]))


ANSWERS = {  # the scripted teacher: instruction -> answer
    "Sort a list in Python.": '```json\n[{"tag": "Sorting", "explanation": "s"}, {"tag": "Code"},]\n```',
    "Sort names.": "Tags: [{'tag': 'sorts', 'explanation': 'x'}, {'tag': 'code', 'explanation': 'y'}]. Done.",
    "Sort and sum numbers.": '[{"tag": "Sort!"}, {"tag": "mathematics"}]',
    "What is 2 + 2?": '[{"tag": "math"}, {"tag": "rare thing"}]',
    "Hello?": "I cannot tag this.",
    "Add 3 and 4, then write a poem.": '[{"tag": "math"}, {"tag": "poetry"}]',
}


class _Scripted:
    def generate(self, prompts, params):
        assert params.n == 1
        return [[Completion(next(a for q, a in ANSWERS.items() if p[-1]["content"].endswith(f"Query: {q}")), 5,
                            "stop")] for p in prompts]

    def close(self):
        pass


def test_the_stage_tags_normalises_resumes_and_keeps_edits(tmp_path, monkeypatch):
    monkeypatch.setattr("data_synthesis.generate.make_generator", lambda spec: _Scripted())
    edits = tmp_path / "edits.yaml"
    edits.write_text("renames: {sort: sorting}\nmerges: {poetry: creative writing}\ndeletions: [rare thing]\n")
    recipe_path = _write(tmp_path, _recipe(tmp_path, refinements=str(edits)), list(ANSWERS))
    manifest = run("instag", load_recipe(recipe_path))
    out = tmp_path / "run"
    assert manifest["counts"]["processed"] == 5 and manifest["counts"]["quarantined_by_stage"] == 1
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["row"]["id"] for q in quarantine] == ["q4"] and "I cannot tag this." in quarantine[0]["reason"]
    ontology = json.loads((out / "ontology.json").read_text())
    assert ontology == [
        {"tag": "math", "aliases": ["math", "mathematics"], "count": 3, "examples": ["q2", "q3", "q5"]},
        {"tag": "sorting", "aliases": ["Sort!", "Sorting", "sorts"], "count": 3, "examples": ["q0", "q1", "q2"]},
        {"tag": "code", "aliases": ["Code", "code"], "count": 2, "examples": ["q0", "q1"]},
        {"tag": "creative writing", "aliases": ["poetry"], "count": 1, "examples": ["q5"]},
    ]
    tagged = read_rows(out / "tagged.jsonl", "prompt").rows
    assert [r["id"] for r in tagged] == ["q0", "q1", "q2", "q3", "q5"]
    assert tagged[0]["meta"] == {"k": 0, "tags": ["Sorting", "Code"], "tags_normalised": ["sorting", "code"],
                                 "lineage": {"stage": "instag", "model": str(tmp_path / "init"), "seed": 1,
                                             "parent_id": "q0"}}
    assert tagged[3]["meta"]["tags_normalised"] == ["math"]  # "rare thing" deleted by hand
    info = manifest["instag"]
    assert info["rows"] == 5 and info["quarantined"] == 1 and info["raw_tags"] == 9
    assert info["tags_after"] == {"raw": 9, "frequency": 9, "rule": 6, "semantic": 5, "association": 5, "manual": 4}
    assert info["merges"] == {"rule": 3, "semantic": 1, "association": 0, "manual": 1}
    assert manifest["inputs"]["refinements"]["sha256"] and (out / "ontology.png").stat().st_size > 1000

    # killed before the end: the resumed run re-normalises from the shards, the edits included, to the same bytes
    finished = {name: (out / name).read_bytes() for name in ("tagged.jsonl", "ontology.json")}
    for name in ("manifest.json", "tagged.jsonl", "ontology.json"):
        (out / name).unlink()
    (out / "shards" / "00001.jsonl").unlink()
    assert run("instag", load_recipe(recipe_path))["shards"]["resumed"] == 1
    assert {name: (out / name).read_bytes() for name in finished} == finished
    edits.write_text("deletions: [math]\n")  # edited refinements are another run, never the finished one
    with pytest.raises(StageError, match="different recipe or inputs"):
        run("instag", load_recipe(recipe_path))


def test_the_stage_runs_on_the_tiny_model(tmp_path):
    init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    recipe_path = _write(tmp_path, _recipe(tmp_path), ["Sort a list.", "What is 2 + 2?", "Write a poem.", "Hi."])
    manifest = run("instag", load_recipe(recipe_path))
    counts, out = manifest["counts"], tmp_path / "run"
    # a random model writes no JSON: every row is quarantined with its raw answer, and the ontology is empty
    assert counts["rows_in"] == 4 and counts["processed"] + counts["quarantined_by_stage"] == 4
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    tagged = read_rows(out / "tagged.jsonl", "prompt").rows
    assert len(quarantine) == counts["quarantined_by_stage"] and len(tagged) == counts["processed"]
    assert all(q["reason"].startswith("no tags could be read from the tagger's answer: '") for q in quarantine)
    assert manifest["instag"]["rows"] == len(tagged) and manifest["instag"]["quarantined"] == len(quarantine)
    assert counts["quarantined_by_stage"] == 4 and json.loads((out / "ontology.json").read_text()) == []
    assert (out / "ontology.png").exists()
