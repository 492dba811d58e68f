"""Decontamination: the report's 13-gram and LCS rules, exact against brute force, and the stage."""

import json
import random
from pathlib import Path

import pytest
import yaml

from alignment.recipe_loader import RecipeError
from data_synthesis.decontam import find_contamination, lcs_length, min_lcs, ngram_overlapping_test_items, row_text
from data_synthesis.text import tokenize
from qwen2_align.stage_table import load_recipe, run

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
ROBE = "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"
MOONS = ("Which planet in our solar system has the most moons, and how many moons had astronomers confirmed "
         "by the end of the year?")
UNRELATED = "Write a short poem about autumn leaves falling on a quiet village street after the first frost."


def _with_filler(text: str, every: int, filler: str = "really") -> str:
    """The text's words with `filler` after every `every`-th one: the order survives, long runs do not."""
    words = tokenize(text)
    return " ".join(w + (f" {filler}" if (i + 1) % every == 0 else "") for i, w in enumerate(words))


def dp_lcs(a: list, b: list) -> int:
    """The textbook O(n m) dynamic programme, as the reference for the bit-parallel one."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_tokens_ignore_case_symbols_and_punctuation_and_split_cjk():
    assert tokenize("Hello, WORLD! it's 42-ish; snake_case") == ["hello", "world", "it", "s", "42", "ish", "snake",
                                                                 "case"]
    assert tokenize("Café naïve") == ["café", "naïve"]
    assert tokenize("写一句关于秋天的话。") == list("写一句关于秋天的话")


def test_exact_copy_is_an_ngram_hit():
    train = [f"Please solve this for me. {QUESTION} Thanks!"]
    assert find_contamination(train, [UNRELATED, QUESTION]) == [{"rule": "ngram", "test_index": 1}]


def test_case_and_punctuation_do_not_matter():
    shouted = QUESTION.upper().replace(",", " ;").replace(".", "!!").replace("?", " ...")
    assert find_contamination([shouted], [QUESTION]) == [{"rule": "ngram", "test_index": 0}]


def test_paraphrase_in_order_without_13_consecutive_words_is_an_lcs_hit():
    paraphrase = _with_filler(MOONS, every=6)
    assert find_contamination([paraphrase], [MOONS]) == [{"rule": "lcs", "test_index": 0}]
    assert find_contamination([paraphrase], [MOONS], lcs_min_tokens=30) == [None]


def test_short_shared_phrase_is_clean():
    train = ["My cousin sold clips to 48 of her friends in class at the school fair, for charity."]
    assert dp_lcs(tokenize(train[0]), tokenize(QUESTION)) == 8  # "sold clips to 48 of her friends in"
    assert find_contamination(train, [QUESTION, ROBE, MOONS]) == [None]


def test_lcs_ratio_is_against_the_shorter_sequence():
    shared = tokenize(MOONS)[:13]
    other = [f"w{i}" for i in range(30)]
    spread = " ".join(w for pair in zip(shared, other) for w in pair) + " " + " ".join(other[13:])  # 13 of 43 in order
    test = " ".join(shared[:6]) + " x " + " ".join(shared[6:]) + " " + " ".join(f"v{i}" for i in range(26))  # 40 words
    assert dp_lcs(tokenize(spread), tokenize(test)) == 13
    assert find_contamination([spread], [test]) == [None]  # 13 < 0.6 x 40
    short_test = " ".join(shared[:6]) + " x " + " ".join(shared[6:]) + " y z"  # 16 words: 13 >= 0.6 x 16
    assert find_contamination([spread], [short_test]) == [{"rule": "lcs", "test_index": 0}]


def test_threshold_rounds_up_the_exact_product():
    assert [min_lcs(m, 13, 0.6) for m in (5, 21, 22, 30, 31)] == [13, 13, 14, 18, 19]
    assert min_lcs(100, 13, 0.55) == 55 and min_lcs(101, 13, 0.55) == 56  # 0.55 * 100 is 55.00000000000001 in floats


def test_ngrams_do_not_run_from_one_text_into_the_next():
    words = tokenize(QUESTION)
    halves = [" ".join(words[:7]), " ".join(words[7:19])]  # 19 words of the question, but no 13 in one text
    assert find_contamination([" ".join(words[:19])], [QUESTION], lcs_min_tokens=100) == [{"rule": "ngram",
                                                                                           "test_index": 0}]
    assert find_contamination(halves, [QUESTION], lcs_min_tokens=100) == [None, None]
    assert find_contamination([QUESTION], halves, lcs_min_tokens=100) == [None]


def test_lowest_test_index_and_ngram_before_lcs():
    train = [f"{_with_filler(MOONS, every=6)} and also {QUESTION}", QUESTION]
    test = [UNRELATED, MOONS, QUESTION, QUESTION]
    assert find_contamination(train, test) == [{"rule": "ngram", "test_index": 2}, {"rule": "ngram", "test_index": 2}]
    assert find_contamination([_with_filler(MOONS, every=6)] * 2, [UNRELATED, MOONS, MOONS]) == [
        {"rule": "lcs", "test_index": 1}] * 2


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for trial in range(400):
        alphabet = rng.randint(1, 12)
        a = [rng.randrange(alphabet) for _ in range(rng.randint(0, 90))]
        b = [rng.randrange(alphabet) for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == dp_lcs(a, b), (trial, a, b)


def _brute_force(train: list[str], test: list[str], n: int, k: int, ratio: tuple[int, int]) -> list[dict | None]:
    """Every pair, by the definitions: shared n-gram sets, then |LCS| >= k and >= ratio x the shorter length."""
    test_tokens = [tokenize(t) for t in test]
    test_grams = [{tuple(t[i : i + n]) for i in range(len(t) - n + 1)} for t in test_tokens]
    results = []
    for text in train:
        tokens = tokenize(text)
        grams = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
        hit = next((i for i, g in enumerate(test_grams) if grams & g), None)
        if hit is not None:
            results.append({"rule": "ngram", "test_index": hit})
            continue
        numerator, denominator = ratio
        hit = next((i for i, t in enumerate(test_tokens) if (lcs := lcs_length(tokens, t)) >= k
                    and denominator * lcs >= numerator * min(len(tokens), len(t))), None)
        results.append(None if hit is None else {"rule": "lcs", "test_index": hit})
    return results


@pytest.mark.parametrize("n, k, ratio", [(13, 13, (3, 5)), (4, 5, (1, 2)), (6, 8, (4, 5))])
def test_indexes_find_exactly_what_brute_force_finds(n, k, ratio):
    rng = random.Random(n)
    words = [f"w{i}" for i in range(40)]
    weights = [1 / (r + 1) for r in range(len(words))]  # Zipf: a few words everywhere, as in natural text
    text = lambda length: rng.choices(words, weights, k=length)  # noqa: E731
    test = [text(rng.randint(3, 60)) for _ in range(50)]
    train = []
    for _ in range(200):
        tokens = text(rng.randint(3, 70))
        if rng.random() < 0.3:  # near copies: a test item's slice with some words swapped
            source = rng.choice(test)
            start = rng.randrange(len(source))
            kept = source[start : start + rng.randint(5, 60)]
            tokens = [w if rng.random() < 0.85 else rng.choice(words) for w in kept]
        train.append(" ".join(tokens))
    test_texts = [" ".join(t) for t in test]
    expected = _brute_force(train, test_texts, n, k, ratio)
    found = find_contamination(train, test_texts, ngram=n, lcs_min_tokens=k, lcs_ratio=ratio[0] / ratio[1])
    assert found == expected
    rules = [r and r["rule"] for r in found]
    assert rules.count(None) > 10 and rules.count("lcs") > 5  # the comparison covers both outcomes


def test_ngram_overlapping_test_items():
    assert ngram_overlapping_test_items([f"so: {QUESTION}", UNRELATED], [ROBE, QUESTION, MOONS, QUESTION]) == [1, 3]
    assert ngram_overlapping_test_items([], [ROBE]) == []


def test_empty_sides():
    assert find_contamination([QUESTION, ""], []) == [None, None]
    assert find_contamination([], [QUESTION]) == []
    assert find_contamination([""], [QUESTION, ""]) == [None]


def test_row_text_of_each_row_kind():
    assert row_text({"id": "d", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                     "meta": {"note": "not text"}}) == "Hi\nYo"
    assert row_text({"id": "p", "prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant",
                     "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}], "source": "s"}) == "Q\nA\nB"
    assert row_text({"id": "t", "text": "plain"}) == "plain"
    assert row_text({"id": "m", "question": "Q?", "choices": ["a", "b"], "answer": 1}) == "Q?\na\nb"


# --- the stage ---------------------------------------------------------------------------------------------------


ORIGIN = {"stage": "rejection", "model": "teacher", "seed": 0, "parent_id": "q2"}


def _messages(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stage_recipe(tmp_path: Path, strict: bool = True, **inputs) -> Path:
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"id": "d0", "messages": _messages(QUESTION, "72 clips."), "source": "s", "meta": {"k": 1}},
        {"id": "d1", "messages": _messages(_with_filler(MOONS, every=6), "Saturn."), "source": "s", "meta": {}},
        {"messages": _messages("No id here.", "So it is set aside.")},
        {"id": "d2", "messages": _messages(UNRELATED, "Leaves drift..."), "source": "s", "meta": {"lineage": ORIGIN}},
        {"id": "p0", "prompt": [{"role": "user", "content": "Help?"}],
         "chosen": [{"role": "assistant", "content": ROBE}], "rejected": [{"role": "assistant", "content": "No."}],
         "source": "s", "meta": {}},
        {"id": "t0", "text": "She sold clips to 48 of her friends in class.", "source": "s", "meta": {}},
    ])
    gsm8k = _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": QUESTION, "answer": "72"},
                                                    {"question": ROBE, "answer": "3"},
                                                    {"question": "What is the sum of 1 to 10?", "answer": "55"}])
    trivia = _write_jsonl(tmp_path / "trivia.jsonl", [{"id": "tv0", "question": MOONS, "answer": "Saturn"}])
    recipe = {"stage": "decontam", "run_dir": str(tmp_path / "run"), "shard_size": 2, "strict_test_split": strict,
              "inputs": inputs or {"train": str(train), "gsm8k": str(gsm8k), "trivia": str(trivia)}}
    path = tmp_path / "decontam.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_outputs_counts_side_files_and_noop_rerun(tmp_path, capsys):
    recipe_path = _stage_recipe(tmp_path)
    manifest = run("decontam", load_recipe(recipe_path))
    run_dir = tmp_path / "run"
    counts = manifest["counts"]
    assert counts["rows_in"] == 6 and counts["quarantined_by_stage"] == 1
    assert counts["outputs"] == {"clean": 2, "contaminated": 3}
    assert counts["processed"] == counts["outputs"]["clean"] + counts["outputs"]["contaminated"]

    clean = _jsonl(run_dir / "clean.jsonl")
    assert [r["id"] for r in clean] == ["d2", "t0"]
    assert clean[0]["meta"] == {"lineage": {"stage": "decontam", "parent_id": "d2", "previous": ORIGIN}}
    assert clean[1]["meta"] == {"lineage": {"stage": "decontam", "parent_id": "t0"}}
    assert {k: v for k, v in clean[0].items() if k != "meta"} == {"id": "d2", "messages": _messages(UNRELATED,
                                                                  "Leaves drift..."), "source": "s"}
    contaminated = {r["id"]: r for r in _jsonl(run_dir / "contaminated.jsonl")}
    assert {i: (r["rule"], r["test_set"], r["test_index"]) for i, r in contaminated.items()} == {
        "d0": ("ngram", "gsm8k", 0), "d1": ("lcs", "trivia", 0), "p0": ("ngram", "gsm8k", 1)}
    assert contaminated["d1"]["test_id"] == "tv0" and contaminated["d1"]["test_file"] == str(tmp_path / "trivia.jsonl")
    assert contaminated["d0"]["row"]["meta"] == {"k": 1}  # the row as it came in
    quarantine = _jsonl(run_dir / "quarantine.jsonl")
    assert [q["reason"] for q in quarantine] == ["id: must be a non-empty string"]

    assert manifest["test_sets"]["gsm8k"] == {"test_file": str(tmp_path / "gsm8k.jsonl"), "test_rows": 3,
                                              "contaminated_train_rows": {"ngram": 2, "lcs": 0},
                                              "test_items_sharing_ngram": 2}
    assert manifest["test_sets"]["trivia"]["contaminated_train_rows"] == {"ngram": 0, "lcs": 1}
    assert manifest["test_sets"]["trivia"]["test_items_sharing_ngram"] == 0
    overlap = _jsonl(run_dir / "test_overlap.jsonl")
    assert [(o["test_set"], o["test_index"], o["row"]["answer"]) for o in overlap] == [("gsm8k", 0, "72"),
                                                                                       ("gsm8k", 1, "3")]

    outputs = {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")}
    capsys.readouterr()
    assert run("decontam", load_recipe(recipe_path)) == manifest
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")} == outputs

    # Killed after the last shard, before the manifest: the rerun assembles the same files, side file included.
    (run_dir / "manifest.json").unlink()
    (run_dir / "test_overlap.jsonl").unlink()
    resumed = run("decontam", load_recipe(recipe_path))
    assert resumed["shards"]["resumed"] == resumed["shards"]["total"] == 3
    assert resumed["test_sets"] == manifest["test_sets"]
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")} == outputs


def test_stage_without_strict_split_writes_no_overlap_file(tmp_path):
    manifest = run("decontam", load_recipe(_stage_recipe(tmp_path, strict=False)))
    assert not (tmp_path / "run" / "test_overlap.jsonl").exists()
    assert "test_items_sharing_ngram" not in manifest["test_sets"]["gsm8k"]
    assert manifest["counts"]["outputs"] == {"clean": 2, "contaminated": 3}


def test_recipe_needs_a_test_set_and_sane_thresholds(tmp_path):
    with pytest.raises(RecipeError, match="decontam.yaml: inputs: no test set"):
        load_recipe(_stage_recipe(tmp_path, train="train.jsonl"))
    with pytest.raises(RecipeError, match="decontam.yaml: lcs_ratio: must be > 0 and <= 1, got 1.5"):
        load_recipe(_stage_recipe(tmp_path), overrides=["lcs_ratio=1.5"])
    with pytest.raises(RecipeError, match="decontam.yaml: ngram: must be >= 1"):
        load_recipe(_stage_recipe(tmp_path), overrides=["ngram=0"])
