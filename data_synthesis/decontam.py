"""`decontam`: set aside training rows that overlap the test sets, by the Qwen2 report's rules.

A training text is contaminated when it shares an `ngram`-gram (13 tokens) with a test item, or,
failing that, when some test item is within the report's LCS rule: |LCS(s_t, s_e)| >= 13 and
|LCS| >= 0.6 x min(|s_t|, |s_e|), where LCS is the longest common subsequence of the two token
sequences. Both rules are decided exactly: the indexes below only skip pairs that provably
cannot match, and n-gram hash hits are checked token by token.

Tokens (`tokenize`): the text lower-cased and cut into runs of unicode letters and digits
(`[^\\W_]+`: white space, symbols, punctuation and `_` separate words and are dropped), except
that each CJK ideograph and kana is a token of its own, since those scripts put no spaces
between words (a Chinese sentence would otherwise be one token and never match).

Comparing every pair is out of reach (100,000 x 10,000 rows is 10^9 LCS runs), so the LCS runs
only where an exact upper bound allows. Number each token occurrence (the 2nd "the" of a text is
the element ("the", 2)): the number of elements two texts share is the size of their token
multisets' intersection, and |LCS| <= that. It is counted exactly for every pair, a batch of rows
against all test items at once. Elements held by few test items are counted from posting lists
(test items per element); the common ones ("the", "of": held by over `DENSE_SHARE` of the test
items) would make those lists long, one each as long as the test set, so they are counted by a
matrix product instead (rows x common elements @ common elements x test items, exact in
float32). Nothing is capped or weighted, so the bound stays exact. Where it reaches the rule's
threshold (on synthetic Zipf text, about 10 test items of 10,000 per row), a bit-parallel LCS
(Allison-Dix / Hyyro) over Python ints decides, lowest test index first.

On Zipfian text the rule itself flags long rows against short test items: a 20-word item of
mostly common words needs only 13 of its words in order somewhere in a 280-word row
(on the text of benchmarks/decontam.py: 43% of unrelated rows of 280-300 words, under 1% below 160).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from alignment.data import DataInput, Quarantined, as_sources, write_rows
from alignment.stages import DataStage, Outcome, ShardContext, StageRecipe

from .text import tokenize

_CONTENT_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected", "text")
_NOT_TEXT = ("id", "source", "meta")
_PROBE_ROWS = 1024  # rows hashed at once by NgramIndex (bounds its numpy temporaries)
DENSE_SHARE = 0.1  # elements held by more test items than this share are counted by a matrix product
_BATCH_CELLS = 1 << 22  # rows x test items counted at once by LcsIndex (bounds its overlap matrix)


def _strings(value: Any) -> Iterator[str]:
    """The text inside a field: a string, a message's content, or the strings of a list or mapping."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        yield from _strings(value["content"] if "content" in value else list(value.values()))


def row_text(row: dict) -> str:
    """What a row says, whatever its kind: the content of messages / prompt / completion / chosen /
    rejected / text where it has any of them (D, P and prompt rows), else every string field but
    id, source and meta (benchmark rows: question, choices, answer...)."""
    fields = [k for k in _CONTENT_FIELDS if k in row] or [k for k in row if k not in _NOT_TEXT]
    return "\n".join(s for k in fields for s in _strings(row[k]))


class Vocabulary:
    """Token -> id for the words of one side; any other word gets `unknown`, which matches nothing there."""

    def __init__(self, token_lists: list[list[str]]):
        self.ids: dict[str, int] = {}
        for tokens in token_lists:
            for token in tokens:
                self.ids.setdefault(token, len(self.ids))
        self.unknown = len(self.ids)

    def encode(self, tokens: list[str]) -> list[int]:
        get, unknown = self.ids.get, self.unknown
        return [get(token, unknown) for token in tokens]


def _ngram_hashes(sequences: Sequence[list[int]], n: int, token_hash: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, sequence index, start) of every n-gram of every sequence, vectorised over all of them."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    total = int(lengths.sum())
    if total < n:
        return np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64)
    values = token_hash[np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=total)]
    count = total - n + 1
    hashes = values[:count].copy()
    for j in range(1, n):
        hashes = hashes * np.uint64(0x100000001B3) + values[j : j + count]  # wraps mod 2^64
    owner = np.repeat(np.arange(len(sequences)), lengths)[:count]
    start = np.arange(count) - (np.cumsum(lengths) - lengths)[owner]
    valid = start + n <= lengths[owner]  # n-grams that do not run into the next sequence
    return hashes[valid], owner[valid], start[valid]


class NgramIndex:
    """Every n-gram of some token-id sequences as sorted 64-bit hashes, to tell which sequence (the
    lowest index) shares an n-gram with a probe. A hash hit is confirmed token by token, so a
    collision costs a comparison, never a wrong answer."""

    def __init__(self, sequences: list[list[int]], n: int, vocabulary_size: int):
        self.n, self.sequences = n, sequences
        self.token_hash = np.frombuffer(np.random.default_rng(0).bytes(8 * (vocabulary_size + 1)), dtype=np.uint64)
        hashes, owners, starts = _ngram_hashes(sequences, n, self.token_hash)
        order = np.lexsort((owners, hashes))  # by hash, then lowest sequence first
        self.hashes, self.owners, self.starts = hashes[order], owners[order], starts[order]

    def first_hits(self, probes: list[list[int]]) -> list[int | None]:
        """For each probe, the lowest index of an indexed sequence sharing an n-gram with it, or None."""
        firsts: list[int | None] = [None] * len(probes)
        if not len(self.hashes):
            return firsts
        for offset in range(0, len(probes), _PROBE_ROWS):
            batch = probes[offset : offset + _PROBE_ROWS]
            hashes, rows, starts = _ngram_hashes(batch, self.n, self.token_hash)
            slots = np.searchsorted(self.hashes, hashes)
            found = self.hashes[np.minimum(slots, len(self.hashes) - 1)] == hashes
            for slot, value, row, start in zip(slots[found].tolist(), hashes[found].tolist(), rows[found].tolist(),
                                               starts[found].tolist()):
                ngram = batch[row][start : start + self.n]
                best = firsts[offset + row]
                while slot < len(self.hashes) and self.hashes[slot] == value:
                    owner = int(self.owners[slot])
                    if best is not None and owner >= best:
                        break
                    test_start = int(self.starts[slot])
                    if self.sequences[owner][test_start : test_start + self.n] == ngram:
                        firsts[offset + row] = owner
                        break
                    slot += 1
        return firsts


def match_masks(sequence: Sequence[int]) -> dict[int, int]:
    """token -> an int whose bit i is set where sequence[i] is that token (the LCS's match vectors)."""
    masks: dict[int, int] = {}
    for i, token in enumerate(sequence):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def lcs_length_with_masks(probe: Sequence[int], masks: dict[int, int], length: int) -> int:
    """|LCS(probe, s)| for the `length`-token sequence s whose `match_masks` are given, bit-parallel:
    one add, subtract, and, or per probe token on length-bit ints (Hyyro 2004, V' = (V + U) | (V - U)
    with U = V & M); the zero bits of V count the LCS."""
    v = (1 << length) - 1
    for match in filter(None, map(masks.get, probe)):  # tokens s lacks leave V as it is
        u = v & match
        v = (v + u) | (v - u)
    return length - (v & ((1 << length) - 1)).bit_count()


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    return lcs_length_with_masks(a, match_masks(b), len(b))


def min_lcs(length: int, lcs_min_tokens: int, lcs_ratio: float) -> int:
    """The smallest |LCS| the rule flags when the shorter sequence has `length` tokens (0.6 x 5 is 3:
    the product is rounded up after shaving float noise)."""
    return max(lcs_min_tokens, math.ceil(lcs_ratio * length - 1e-9))


class LcsIndex:
    """Test sequences indexed for the LCS rule (the module docstring says how candidates are found)."""

    def __init__(self, sequences: list[list[int]], vocabulary_size: int, lcs_min_tokens: int, lcs_ratio: float,
                 dense_share: float = DENSE_SHARE):
        self.sequences, self.lcs_min_tokens, self.lcs_ratio = sequences, lcs_min_tokens, lcs_ratio
        self.stride = vocabulary_size + 1  # element key = occurrence number x stride + token id
        self.item_need = np.array([self.min_lcs(len(s)) for s in sequences], dtype=np.float32)
        self.element_ids: dict[int, int] = {}
        pair_elements, pair_items = [], []
        for item, sequence in enumerate(sequences):
            for key in self._element_keys(sequence):
                pair_elements.append(self.element_ids.setdefault(key, len(self.element_ids)))
                pair_items.append(item)
        elements, items = np.array(pair_elements, dtype=np.int64), np.array(pair_items, dtype=np.int64)
        self.holders = np.bincount(elements, minlength=len(self.element_ids))
        common = self.holders > dense_share * len(sequences)
        self.dense_row = np.full(len(self.holders), -1)
        self.dense_row[common] = np.arange(int(common.sum()))
        self.dense = np.zeros((int(common.sum()), len(sequences)), dtype=np.float32)  # common element x test item
        in_dense = common[elements]
        self.dense[self.dense_row[elements[in_dense]], items[in_dense]] = 1
        rare_elements = elements[~in_dense]
        self.posting_items = items[~in_dense][np.argsort(rare_elements, kind="stable")]  # grouped by element
        self.posting_start = np.concatenate(([0], np.cumsum(np.bincount(rare_elements, minlength=len(self.holders)))))
        self.masks: dict[int, dict[int, int]] = {}  # built on first use: most test items never get that far
        # rows, posting_entries and dense_entries (test items counted through each), candidates, lcs_runs
        self.stats: Counter[str] = Counter()

    def min_lcs(self, length: int) -> int:
        return min_lcs(length, self.lcs_min_tokens, self.lcs_ratio)

    def _element_keys(self, sequence: list[int]) -> list[int]:
        """The sequence's token occurrences as element keys: the k-th occurrence of token t is k x stride + t."""
        seen: dict[int, int] = {}
        keys = []
        for token in sequence:
            k = seen.get(token, 0)
            keys.append(k * self.stride + token)
            seen[token] = k + 1
        return keys

    def _match_masks(self, item: int) -> dict[int, int]:
        masks = self.masks.get(item)
        if masks is None:
            masks = self.masks[item] = match_masks(self.sequences[item])
        return masks

    def _shared_mass(self, batch: list[list[int]]) -> np.ndarray:
        """rows x test items: how many token occurrences each pair shares (the size of their multiset
        intersection), exactly. Common elements through a matrix product, the others through posting lists."""
        holding = np.zeros((len(batch), len(self.dense)), dtype=np.float32)
        rare: list[tuple[int, np.ndarray]] = []
        for row, sequence in enumerate(batch):
            if len(sequence) < self.lcs_min_tokens:
                continue
            element = np.array([e for e in map(self.element_ids.get, self._element_keys(sequence)) if e is not None],
                               dtype=np.int64)
            dense_row = self.dense_row[element]
            common = dense_row >= 0
            holding[row, dense_row[common]] = 1
            rare.append((row, element[~common]))
            self.stats["dense_entries"] += int(self.holders[element[common]].sum())
        shared = holding @ self.dense  # exact in float32: counts stay far below 2^24
        for row, element in rare:
            spans = zip(self.posting_start[element].tolist(), self.posting_start[element + 1].tolist())
            items = np.concatenate([self.posting_items[start:end] for start, end in spans] or [np.empty(0, np.int64)])
            shared[row] += np.bincount(items, minlength=len(self.sequences))
            self.stats["posting_entries"] += len(items)
        return shared

    def first_hits(self, sequences: list[list[int]]) -> list[int | None]:
        """For each sequence, the lowest index of a test sequence within the LCS rule, or None."""
        hits: list[int | None] = [None] * len(sequences)
        batch_rows = max(1, _BATCH_CELLS // max(1, len(self.sequences)))
        for offset in range(0, len(sequences), batch_rows):
            batch = sequences[offset : offset + batch_rows]
            # The threshold grows with the shorter length, so need(min(a, b)) = min(need(a), need(b)).
            row_need = np.array([self.min_lcs(len(s)) for s in batch], dtype=np.float32)
            need = np.minimum(row_need[:, None], self.item_need[None, :])
            rows, items = np.nonzero(self._shared_mass(batch) >= need)  # |LCS| <= shared mass
            bounds = np.searchsorted(rows, np.arange(len(batch) + 1)).tolist()
            self.stats.update(rows=len(batch), candidates=len(items))
            for row, sequence in enumerate(batch):
                for item in items[bounds[row] : bounds[row + 1]].tolist():  # ascending test index
                    self.stats["lcs_runs"] += 1
                    length = len(self.sequences[item])
                    lcs = lcs_length_with_masks(sequence, self._match_masks(item), length)
                    if lcs >= self.min_lcs(min(len(sequence), length)):
                        hits[offset + row] = item
                        break
        return hits


class ContaminationIndex:
    """The test items indexed once for both rules; `check` then takes training texts in any number of batches."""

    def __init__(self, test: list[str], *, ngram: int = 13, lcs_min_tokens: int = 13, lcs_ratio: float = 0.6):
        tokens = [tokenize(text) for text in test]
        self.vocabulary = Vocabulary(tokens)
        sequences = [self.vocabulary.encode(t) for t in tokens]
        self.ngrams = NgramIndex(sequences, ngram, self.vocabulary.unknown)
        self.lcs = LcsIndex(sequences, self.vocabulary.unknown, lcs_min_tokens, lcs_ratio)

    def check(self, train: list[str]) -> list[dict | None]:
        """Per training text: None if clean, else {"rule": "ngram" | "lcs", "test_index": lowest matching item}."""
        sequences = [self.vocabulary.encode(tokenize(text)) for text in train]
        results: list[dict | None] = [None] * len(train)
        unmatched = []
        for row, hit in enumerate(self.ngrams.first_hits(sequences)):
            if hit is None:
                unmatched.append(row)
            else:
                results[row] = {"rule": "ngram", "test_index": hit}
        for row, hit in zip(unmatched, self.lcs.first_hits([sequences[row] for row in unmatched])):
            if hit is not None:
                results[row] = {"rule": "lcs", "test_index": hit}
        return results


def find_contamination(train: list[str], test: list[str], *, ngram: int = 13, lcs_min_tokens: int = 13,
                       lcs_ratio: float = 0.6) -> list[dict | None]:
    """One entry per training text: None if clean, else {"rule": "ngram" | "lcs", "test_index": int},
    the lowest matching test index of the first rule that matches (n-gram checked first). Exact."""
    index = ContaminationIndex(test, ngram=ngram, lcs_min_tokens=lcs_min_tokens, lcs_ratio=lcs_ratio)
    return index.check(train)


def ngram_overlapping_test_items(train: list[str], test: list[str], ngram: int = 13) -> list[int]:
    """The indices of the test items that share an `ngram`-gram with any training text (the strict test split)."""
    train_tokens = [tokenize(text) for text in train]
    vocabulary = Vocabulary(train_tokens)
    index = NgramIndex([vocabulary.encode(t) for t in train_tokens], ngram, vocabulary.unknown)
    hits = index.first_hits([vocabulary.encode(tokenize(text)) for text in test])
    return [i for i, hit in enumerate(hits) if hit is not None]


def with_lineage(row: dict, stage: str, **provenance: Any) -> dict:
    """The row unchanged but for its lineage: this stage passed it on (`meta.lineage`, the shape the
    other stages write, with `provenance` added), the lineage it came with kept under `previous`."""
    meta = row.get("meta", {})
    lineage = {"stage": stage, "parent_id": row["id"], **provenance}
    if "lineage" in meta:
        lineage["previous"] = meta["lineage"]
    return {**row, "meta": {**meta, "lineage": lineage}}


def _row_problem(row: dict) -> str | None:
    """Why a training row cannot be passed on with its lineage, or None."""
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "id: must be a non-empty string"
    if not isinstance(row.get("meta", {}), dict):
        return "meta: must be a mapping"
    return None


def _source_label(data: DataInput) -> str:
    """An input's files (or Hub splits), as the manifest's inputs name them."""
    return " + ".join(str(source) for source in as_sources(data))


def item_text(row: dict) -> str:
    """What a test item says: every string field but id, source and meta. A benchmark row's `prompt` is only part
    of it (HumanEval: prompt, canonical_solution, test), so row_text's choice of content fields does not apply."""
    return "\n".join(s for k, v in row.items() if k not in _NOT_TEXT for s in _strings(v))


def _test_items(test_sets: dict[str, list[dict]]) -> list[tuple[str, int, dict]]:
    """(test set, index in it, row) of every test item, test sets in recipe order."""
    return [(name, i, row) for name, rows in test_sets.items() for i, row in enumerate(rows)]


def _reference(recipe: ContaminationRules, item: tuple[str, int, dict]) -> dict:
    """Where a test item is: its test set, that set's files, its index there and its id."""
    test_set, index, row = item
    return {"test_set": test_set, "test_file": _source_label(recipe.inputs[test_set]), "test_index": index,
            "test_id": row.get("id")}


class ContaminationCheck:
    """A recipe's test sets indexed once for both rules, for the stages that check training rows against them
    (decontam, assemble). A row matching several is charged to the first match: any n-gram hit before an LCS hit,
    then the earliest test set in recipe order, then the lowest index."""

    def __init__(self, recipe: ContaminationRules, test_sets: dict[str, list[dict]]):
        self.recipe = recipe
        self.items = _test_items(test_sets)
        self.index = ContaminationIndex([item_text(row) for _, _, row in self.items], ngram=recipe.ngram,
                                        lcs_min_tokens=recipe.lcs_min_tokens, lcs_ratio=recipe.lcs_ratio)

    def matches(self, rows: list[dict]) -> list[dict | None]:
        """Per row: None if clean, else {rule, test_set, test_file, test_index, test_id} of the item it overlaps."""
        return [None if hit is None else {"rule": hit["rule"], **_reference(self.recipe, self.items[hit["test_index"]])}
                for hit in self.index.check([row_text(row) for row in rows])]


def contamination_counts(recipe: ContaminationRules, test_sets: dict[str, list[dict]], contaminated: list[dict]
                    ) -> dict[str, dict]:
    """The manifest's `test_sets`: per test set its files, rows and the training rows charged to it per rule (from
    the contaminated records, {rule, test_set, row, ...}). With `strict_test_split` also the test items sharing an
    n-gram with training, written to run_dir/test_overlap.jsonl."""
    counts = {name: {"test_file": _source_label(recipe.inputs[name]), "test_rows": len(rows),
                     "contaminated_train_rows": {"ngram": 0, "lcs": 0}} for name, rows in test_sets.items()}
    for record in contaminated:
        counts[record["test_set"]]["contaminated_train_rows"][record["rule"]] += 1
    if recipe.strict_test_split:
        # Clean rows and LCS-rule rows share no n-gram with any test item, so the n-gram rows are all it takes.
        train = [row_text(r["row"]) for r in contaminated if r["rule"] == "ngram"]
        items = _test_items(test_sets)
        overlapping = ngram_overlapping_test_items(train, [item_text(row) for _, _, row in items], recipe.ngram)
        for name in counts:
            counts[name]["test_items_sharing_ngram"] = 0
        for item in overlapping:
            counts[items[item][0]]["test_items_sharing_ngram"] += 1
        write_rows(Path(recipe.run_dir) / "test_overlap.jsonl",
                   [{**_reference(recipe, items[i]), "row": items[i][2]} for i in overlapping])
    return counts


@dataclass
class ContaminationRules(StageRecipe):
    """The report's decontamination rules, shared by the stages that check rows against test sets
    (data_synthesis.decontam); `strict_test_split` also lists the test items that share an n-gram with training."""

    ngram: int = 13
    lcs_min_tokens: int = 13
    lcs_ratio: float = 0.6
    strict_test_split: bool = False

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram: must be >= 1, got {self.ngram}")
        if self.lcs_min_tokens < 1:
            raise ValueError(f"lcs_min_tokens: must be >= 1, got {self.lcs_min_tokens}")
        if not 0 < self.lcs_ratio <= 1:
            raise ValueError(f"lcs_ratio: must be > 0 and <= 1, got {self.lcs_ratio}")


@dataclass
class DecontamRecipe(ContaminationRules):
    """inputs.train against every other input (each one test set) -> the train rows with no test overlap."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not set(self.inputs) - {"train"}:
            raise ValueError("inputs: no test set; every input besides train is one (inputs.gsm8k: data/gsm8k.jsonl)")


class DecontamStage(DataStage):
    """inputs.train (rows of any kind) against every other input, each one test set (a benchmark):

        inputs:
          train: runs/qwen2-7b/data/demonstrations.jsonl
          gsm8k: {path: openai/gsm8k, name: main, split: test}
          mmlu: data/mmlu_test.jsonl

    outputs: `clean.jsonl` (the rows, with their lineage in meta) and `contaminated.jsonl` ({id, rule,
    test_set, test_file, test_index, test_id, row}; test_index counts the rows read from that test
    set, from 0); a row matching several test sets is charged as `ContaminationCheck` says. The manifest's
    `test_sets` counts contaminated rows per test set and rule; `strict_test_split` also writes
    `test_overlap.jsonl`, the test items sharing an n-gram with the training rows.
    """

    name = "decontam"
    recipe_class = DecontamRecipe
    inputs = {"train": "any"}  # and one input per test set, named by the recipe (see __init__)
    outputs = ("clean", "contaminated")

    def __init__(self, recipe: DecontamRecipe):
        super().__init__(recipe)
        self.inputs = {"train": "any", **{name: "any" for name in recipe.inputs if name != "train"}}

    def prepare(self, rows: list[dict], side_inputs: dict[str, list[dict]]) -> None:
        self.check = ContaminationCheck(self.recipe, side_inputs)

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        problems = [_row_problem(row) for row in rows]
        matches = iter(self.check.matches([row for row, problem in zip(rows, problems) if problem is None]))
        outcomes: list[Outcome] = []
        for row, problem in zip(rows, problems):
            if problem:
                outcomes.append(Quarantined(problem, row))
                continue
            match = next(matches)
            if match is None:
                outcomes.append({"clean": [with_lineage(row, self.name)]})
            else:
                outcomes.append({"contaminated": [{"id": row["id"], **match, "row": row}]})
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        return {"test_sets": contamination_counts(self.recipe, side_inputs, outputs["contaminated"])}
