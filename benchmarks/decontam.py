"""Decontamination throughput (training rows/s against a test set) and what each filter leaves.

    python benchmarks/decontam.py [--train 100000] [--test 10000] [--planted 1000] [--audit 20] [--seed 0]

The texts are synthetic but shaped like English: 100 common English words, then 30,000 made-up
ones, drawn with Zipf's 1/rank frequencies; sentences of 5-25 words with capitals, commas and
full stops; 20-300 words a row. `--planted` training rows are contaminated on purpose: half copy
a 13-40 word span of a test item into the row (the n-gram rule), half rewrite a whole test item
with one word in every 6-10 swapped, so that no 13 words stay consecutive (the LCS rule). Each
must be found, and every other row found must truly match (checked pair by pair). `--audit`
random rows are also compared with every test item by brute force, to show nothing is missed.
The LCS rule alone is also timed on `--sample` rows with common words counted by the matrix
product (the default) and with posting lists only. Results: benchmarks/results/decontam.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data_synthesis.decontam import DENSE_SHARE, ContaminationIndex, LcsIndex, lcs_length, min_lcs  # noqa: E402
from data_synthesis.text import tokenize  # noqa: E402

COMMON = ("the of and to a in is it you that he was for on are with as i his they be at one have this from or "
          "had by not but what some we can out other were all there when up use your how said an each she which do "
          "their time if will way about many then them write would like so these her long make thing see him two "
          "has look more day could go come did number sound no most people my over know water than call first who "
          "may down side been now find").split()
SYLLABLES = ("ba be bi bo bu ca ce co da de di do fa fe fi ga ge go ha he hi ho ka ke ki la le li lo lu ma me mi "
             "mo mu na ne ni no nu pa pe pi po ra re ri ro ru sa se si so su ta te ti to tu va ve vi wa we ya yo za "
             "ther ing tion er an ou str pl gr th ch sh").split()
NGRAM, LCS_MIN_TOKENS, LCS_RATIO = 13, 13, 0.6


class Corpus:
    """Zipf-distributed English-like words and the sentences made of them."""

    def __init__(self, rng: random.Random, made_up: int = 30_000):
        words = dict.fromkeys(COMMON)
        while len(words) < len(COMMON) + made_up:
            words.setdefault("".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))))
        self.words = list(words)
        self.cumulative = list(np.cumsum([1 / rank for rank in range(1, len(self.words) + 1)]))
        self.rng = rng

    def words_of(self, count: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cumulative, k=count)

    def rare_word(self) -> str:
        return self.rng.choice(self.words[5000:])

    def text(self, words: list[str]) -> str:
        """Words as sentences: capitalised, an occasional comma, a full stop or question mark."""
        sentences, i = [], 0
        while i < len(words):
            chunk = words[i : i + self.rng.randint(5, 25)]
            i += len(chunk)
            if len(chunk) > 6 and self.rng.random() < 0.5:
                cut = self.rng.randint(2, len(chunk) - 2)
                chunk = [*chunk[:cut - 1], chunk[cut - 1] + ",", *chunk[cut:]]
            sentence = " ".join(chunk)
            sentences.append(sentence[0].upper() + sentence[1:] + self.rng.choice(".....?!"))
        return " ".join(sentences)


def plant(corpus: Corpus, rng: random.Random, train: list[list[str]], test: list[list[str]], count: int
          ) -> dict[int, tuple[str, int]]:
    """Contaminate `count` training rows in place; row -> (rule it must trip, test item it came from)."""
    planted = {}
    for row in rng.sample(range(len(train)), count):
        item = rng.randrange(len(test))
        source = test[item]
        if len(planted) % 2 == 0:
            span = rng.randint(NGRAM, min(40, len(source)))
            start = rng.randint(0, len(source) - span)
            at = rng.randint(0, len(train[row]))
            train[row][at:at] = [w.upper() if rng.random() < 0.2 else w for w in source[start : start + span]]
            planted[row] = ("ngram", item)
        else:
            gap = rng.randint(6, 10)
            train[row] = [word if (i + 1) % gap else corpus.rare_word() + "x" for i, word in enumerate(source)]
            planted[row] = ("lcs", item)
    return planted


def _ngrams(tokens: list[str]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)}


def _within_lcs_rule(a: list[str], b: list[str]) -> bool:
    return lcs_length(a, b) >= min_lcs(min(len(a), len(b)), LCS_MIN_TOKENS, LCS_RATIO)


def truly_matches(hit: dict, row: list[str], test: list[list[str]]) -> bool:
    other = test[hit["test_index"]]
    return not _ngrams(row).isdisjoint(_ngrams(other)) if hit["rule"] == "ngram" else _within_lcs_rule(row, other)


def brute_force(row: list[str], test: list[list[str]]) -> dict | None:
    """The first match by comparing the row with every test item: n-gram rule first, then LCS."""
    grams = _ngrams(row)
    hit = next((i for i, item in enumerate(test) if not grams.isdisjoint(_ngrams(item))), None)
    if hit is not None:
        return {"rule": "ngram", "test_index": hit}
    hit = next((i for i, item in enumerate(test) if _within_lcs_rule(row, item)), None)
    return None if hit is None else {"rule": "lcs", "test_index": hit}


def lcs_stage_rows_per_s(index: ContaminationIndex, rows: list[str], dense_share: float) -> float:
    """Rows/s of the LCS rule alone over `rows`, with elements above `dense_share` of the test items in the
    matrix product (1.0: every element through its posting list, as a plain inverted index would)."""
    alone = LcsIndex(index.lcs.sequences, index.vocabulary.unknown, LCS_MIN_TOKENS, LCS_RATIO, dense_share=dense_share)
    sequences = [index.vocabulary.encode(tokenize(text)) for text in rows]
    t = time.perf_counter()
    alone.first_hits(sequences)
    return len(rows) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--planted", type=int, default=1000)
    ap.add_argument("--audit", type=int, default=20, help="rows compared with every test item by brute force")
    ap.add_argument("--sample", type=int, default=2000, help="rows the LCS rule alone is timed on, two ways")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from benchmarks.common import write_result

    rng = random.Random(a.seed)
    corpus = Corpus(rng)
    t = time.perf_counter()
    test = [corpus.words_of(rng.randint(20, 300)) for _ in range(a.test)]
    train = [corpus.words_of(rng.randint(20, 300)) for _ in range(a.train)]
    planted = plant(corpus, rng, train, test, a.planted)
    test_texts, train_texts = [corpus.text(w) for w in test], [corpus.text(w) for w in train]
    print(f"data: {a.train} training rows, {a.test} test items, {sum(map(len, train)) / a.train:.0f} words a "
          f"training row, {a.planted} planted ({time.perf_counter() - t:.0f} s to generate)")
    test_tokens, train_tokens = [tokenize(x) for x in test_texts], [tokenize(x) for x in train_texts]

    t = time.perf_counter()
    index = ContaminationIndex(test_texts, ngram=NGRAM, lcs_min_tokens=LCS_MIN_TOKENS, lcs_ratio=LCS_RATIO)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    results = index.check(train_texts)
    check_s = time.perf_counter() - t
    rows_per_s = a.train / (build_s + check_s)
    print(f"index: {build_s:.1f} s; check: {check_s:.1f} s; {rows_per_s:.0f} rows/s including the index "
          f"({a.train / check_s:.0f} rows/s checking)")

    missed = [row for row, (rule, item) in planted.items() if results[row] is None]
    wrong_rule = [row for row, (rule, item) in planted.items() if results[row] and results[row]["rule"] != rule]
    other_item = [row for row, (rule, item) in planted.items() if results[row] and results[row]["test_index"] != item]
    found = [row for row, hit in enumerate(results) if hit is not None]
    false = [row for row in found if not truly_matches(results[row], train_tokens[row], test_tokens)]
    natural = Counter(results[row]["rule"] for row in found if row not in planted)
    print(f"planted: {a.planted - len(missed)} of {a.planted} found ({len(wrong_rule)} by the other rule, "
          f"{len(other_item)} at a lower test index); unplanted rows found: {dict(natural)}; "
          f"found rows that do not truly match: {len(false)}")

    audited = rng.sample(range(a.train), a.audit)
    t = time.perf_counter()
    disagreements = [row for row in audited if brute_force(train_tokens[row], test_tokens) != results[row]]
    print(f"audit: {a.audit} random rows against all {a.test} test items by brute force: {len(disagreements)} "
          f"disagree ({time.perf_counter() - t:.0f} s)")

    stats = index.lcs.stats
    keys = ("posting_entries", "dense_entries", "candidates", "lcs_runs")
    per_row = {key: stats[key] / stats["rows"] for key in keys}
    print(f"LCS rule, per row it was checked on ({stats['rows']} rows): {per_row['posting_entries']:.0f} posting "
          f"entries read and {per_row['dense_entries']:.0f} counted by the matrix product instead; "
          f"{per_row['candidates']:.1f} of {a.test} test items reach the threshold in shared tokens; "
          f"{per_row['lcs_runs']:.1f} LCS runs")
    sample = rng.sample(train_texts, a.sample)
    split = {share: lcs_stage_rows_per_s(index, sample, share) for share in (DENSE_SHARE, 1.0)}
    print(f"LCS rule alone on {a.sample} rows: {split[DENSE_SHARE]:.0f} rows/s with elements held by over "
          f"{DENSE_SHARE:.0%} of the test items in the matrix product, {split[1.0]:.0f} rows/s with posting lists only")

    path = write_result("decontam", {
        "train_rows": a.train, "test_items": a.test, "planted": a.planted, "seed": a.seed,
        "rules": {"ngram": NGRAM, "lcs_min_tokens": LCS_MIN_TOKENS, "lcs_ratio": LCS_RATIO},
        "index_s": build_s, "check_s": check_s, "rows_per_s": rows_per_s,
        "planted_found": a.planted - len(missed), "planted_other_rule": len(wrong_rule),
        "unplanted_found": dict(natural), "found_not_matching": len(false),
        "audit_rows": a.audit, "audit_disagreements": len(disagreements),
        "per_lcs_row": per_row, "lcs_rule_rows_per_s": {"dense_split": split[DENSE_SHARE], "postings_only": split[1.0]},
    })
    print(f"results: {path}")
    if missed or false or disagreements:
        raise SystemExit(f"decontam benchmark: {len(missed)} planted rows missed, {len(false)} false hits, "
                         f"{len(disagreements)} audit disagreements")


if __name__ == "__main__":
    main()
