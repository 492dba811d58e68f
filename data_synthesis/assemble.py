"""`assemble`: merge the D and P outputs of finished synthesis runs into the training inputs.

The recipe lists the runs (`runs: [runs/tiny/rejection, runs/tiny/constitution/demonstrations.jsonl]`): a run
directory gives its `demonstrations.jsonl` and `preferences.jsonl`, whichever it has; a file gives only itself.
Their files become the stage's primary input `sources` (a list of files, read in recipe order, D before P
within a run), and every input of the recipe is a test set, as in `decontam`. Each row ends in exactly one of:

- `demonstrations.jsonl` / `preferences.jsonl`: valid rows for the sft / dpo readers, id `RUN/ID` (RUN the run
  directory's name, so two runs' ids never collide), `meta.lineage` the assembly's ({stage: assemble, parent_id,
  source_run, source_stage, source_fingerprint}) with the synthesis stage's lineage under `previous`;
- `duplicates.jsonl`: {id, duplicate_of, source_file, row}, a row whose content (normalised messages, or prompt +
  chosen + rejected) an earlier row already has: the first in recipe order wins;
- `contaminated.jsonl`: {id, rule, test_set, test_file, test_index, test_id, source_file, row}, by decontam's rules;
- `quarantine.jsonl`: rows that are not valid D / P rows, with the reason.

Which rows are duplicates is decided in `setup` from all the sources at once (the runtime hands a stage its shards
one by one, and a resumed run only the unfinished ones), by row position: shard i holds rows
[i x shard_size, (i + 1) x shard_size) of the sources. So the outcome of a row does not depend on the sharding or
on which shards a crash left to do. Only first occurrences are checked against the test sets (a copy has the
same text as its first occurrence).
"""

from __future__ import annotations

import copy
import hashlib
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.data import Quarantined, load_jsonl, normalise, read_rows, row_problem
from alignment.stages import DataStage, Outcome, ShardContext, StageError

from .decontam import ContaminationCheck, ContaminationRules, contamination_counts, with_lineage

SOURCES = "sources"  # the primary input: the runs' D and P files
KINDS = {"demonstrations": "demonstration", "preferences": "preference"}  # output file -> row kind


@dataclass(frozen=True)
class SourceFile:
    """One D or P file of a listed run, with what the assembled rows record about that run."""

    run: str  # the run directory
    name: str  # its directory name, the prefix of assembled ids
    output: str  # demonstrations | preferences
    path: str
    stage: str
    fingerprint: str


def source_files(runs: list[str]) -> list[SourceFile]:
    """The D and P files of the listed runs, in recipe order; a run that is not finished is a one-line error."""
    files: list[SourceFile] = []
    names: dict[str, str] = {}
    for i, entry in enumerate(runs):
        path = Path(entry)
        if path.suffix == ".jsonl":
            if path.stem not in KINDS:
                raise StageError(f"assemble: runs[{i}]: {entry}: not a demonstrations.jsonl or preferences.jsonl")
            run_dir, outputs = path.parent, [path.stem]
        else:
            run_dir, outputs = path, list(KINDS)
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.is_file():
            raise StageError(f"assemble: runs[{i}]: {run_dir}: not a finished run (no manifest.json); "
                             "run its stage first")
        other = names.setdefault(run_dir.name, str(run_dir))
        if Path(other) != run_dir:
            raise StageError(f"assemble: runs[{i}]: {run_dir} and {other} have the same name {run_dir.name!r}, which "
                             "prefixes the assembled ids; rename one")
        manifest = json.loads(manifest_path.read_text())
        found = [SourceFile(str(run_dir), run_dir.name, output, str(run_dir / f"{output}.jsonl"), manifest["stage"],
                            manifest["fingerprint"]) for output in outputs if (run_dir / f"{output}.jsonl").is_file()]
        if not found:
            raise StageError(f"assemble: runs[{i}]: {entry}: no {' or '.join(f'{o}.jsonl' for o in outputs)}")
        files += found
    return files


def _normalised(text: str) -> str:
    """Text as duplicates are compared: NFKC, white space runs as one space, trimmed (case is kept)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def content_key(row: dict, kind: str) -> str:
    """A row's content as duplicates are compared: its messages (D) or prompt + chosen + rejected (P), roles and
    normalised text. Chosen and rejected are one message each, so the flat list is unambiguous."""
    messages = row["messages"] if kind == "demonstration" else row["prompt"] + row["chosen"] + row["rejected"]
    flat = [kind] + [[m["role"], _normalised(m["content"])] for m in messages]
    return hashlib.sha256(json.dumps(flat, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class RowPlan:
    """What happens to the row at one position of the sources, decided in `setup`."""

    source: int  # index into the stage's source files
    row_id: Any  # the row's own id, to check that a shard lines up with the sources
    problem: str | None
    duplicate_of: str | None


@dataclass
class AssembleRecipe(ContaminationRules):
    """The D and P outputs of the finished synthesis runs in `runs` (run directories, or their demonstrations.jsonl /
    preferences.jsonl) -> the training inputs, deduplicated by content and checked against every input (each one
    test set); see data_synthesis.assemble."""

    runs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.runs:
            raise ValueError("runs: list the synthesis runs to merge (runs: [runs/tiny/rejection, ...])")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError("runs: a run is listed twice")
        if SOURCES in self.inputs:
            raise ValueError(f"inputs.{SOURCES}: reserved for the runs' D and P files; name the test set otherwise")
        if not self.inputs:
            raise ValueError("inputs: no test set; every input is one (inputs.gsm8k: data/gsm8k.jsonl)")


class AssembleStage(DataStage):
    name = "assemble"
    recipe_class = AssembleRecipe
    inputs = {SOURCES: "any"}  # and one input per test set, named by the recipe (see __init__)
    outputs = ("demonstrations", "preferences", "duplicates", "contaminated")

    def __init__(self, recipe: AssembleRecipe):
        self.sources = source_files(recipe.runs)
        resolved = copy.copy(recipe)  # the runs' files become an input: hashed, fingerprinted and read by the runtime
        resolved.inputs = {SOURCES: [s.path for s in self.sources], **recipe.inputs}
        super().__init__(resolved)
        self.inputs = {SOURCES: "any", **{name: "any" for name in recipe.inputs}}

    def input_files(self) -> dict[str, str]:
        """The listed runs' manifests: the rows record their fingerprints, so a re-run source is a new assembly."""
        runs = dict.fromkeys(s.run for s in self.sources)
        return {f"manifest of {run}": str(Path(run) / "manifest.json") for run in runs}

    def assembled_id(self, row: dict, source: SourceFile) -> str:
        return f"{source.name}/{row['id']}"

    def prepare(self, rows: list[dict], side_inputs: dict[str, list[dict]]) -> None:
        self.check = ContaminationCheck(self.recipe, side_inputs)
        self.plan: list[RowPlan] = []
        first_with: dict[str, str] = {}  # content key -> assembled id of its first occurrence
        taken: set[str] = set()
        for index, source in enumerate(self.sources):
            kind = KINDS[source.output]
            for row in read_rows(source.path, "any").rows:  # what the runtime read, file by file
                problem = row_problem(row, kind)
                if not problem and kind == "demonstration" and "messages" not in row:
                    problem = "messages: missing (assembled demonstrations are conversations, not plain text)"
                if not problem and self.assembled_id(row, source) in taken:
                    problem = f"id: duplicate id {row['id']!r} in {source.path}"
                duplicate_of = None
                if not problem:
                    assembled = self.assembled_id(row, source)
                    taken.add(assembled)
                    duplicate_of = first_with.setdefault(content_key(row, kind), assembled)
                    duplicate_of = None if duplicate_of == assembled else duplicate_of
                self.plan.append(RowPlan(index, row.get("id") if isinstance(row, dict) else None, problem,
                                         duplicate_of))

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        start = ctx.index * self.recipe.shard_size
        plans = self.plan[start : start + len(rows)]
        if [p.row_id for p in plans] != [row.get("id") if isinstance(row, dict) else None for row in rows]:
            raise StageError(f"assemble: shard {ctx.index} does not line up with the sources read in setup")
        unique = [row for row, p in zip(rows, plans) if p.problem is None and p.duplicate_of is None]
        matches = iter(self.check.matches(unique))
        outcomes: list[Outcome] = []
        for row, plan in zip(rows, plans):
            source = self.sources[plan.source]
            if plan.problem:
                outcomes.append(Quarantined(plan.problem, row, origin=source.path))
                continue
            assembled = self.assembled_id(row, source)
            if plan.duplicate_of:
                outcomes.append({"duplicates": [{"id": assembled, "duplicate_of": plan.duplicate_of,
                                                 "source_file": source.path, "row": row}]})
                continue
            match = next(matches)
            if match:
                outcomes.append({"contaminated": [{"id": assembled, **match, "source_file": source.path, "row": row}]})
                continue
            passed_on = with_lineage(normalise(dict(row)), self.name, source_run=source.run,
                                     source_stage=source.stage, source_fingerprint=source.fingerprint)
            outcomes.append({source.output: [{**passed_on, "id": assembled}]})
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        """Per source file: rows in and where they went; duplicates; contamination per test set; and the lineage of
        the kept rows (per synthesis stage, model and seed)."""
        per_file = {s.path: Counter() for s in self.sources}
        for output in KINDS:
            for row in outputs[output]:
                lineage = row["meta"]["lineage"]
                per_file[str(Path(lineage["source_run"]) / f"{output}.jsonl")]["kept"] += 1
        for output in ("duplicates", "contaminated"):
            for record in outputs[output]:
                per_file[record["source_file"]][output] += 1
        for record in load_jsonl(Path(self.recipe.run_dir) / "quarantine.jsonl"):
            path = next((p for p in per_file if record["origin"] == p or record["origin"].startswith(f"{p}:")), None)
            if path:  # not a test set's row
                per_file[path]["quarantined"] += 1
        runs: dict[str, dict] = {}
        for source in self.sources:
            manifest = json.loads((Path(source.run) / "manifest.json").read_text())
            run = runs.setdefault(source.run, {"stage": source.stage, "fingerprint": source.fingerprint,
                                               "recipe": manifest.get("recipe", {}), "outputs": {}})
            counts = per_file[source.path]
            run["outputs"][source.output] = {"rows_in": sum(counts.values()),
                                             **{k: counts[k] for k in ("kept", "duplicates", "contaminated",
                                                                       "quarantined")}}
        return {"sources": runs, "duplicates": len(outputs["duplicates"]),
                "test_sets": contamination_counts(self.recipe, side_inputs, outputs["contaminated"]),
                "lineage": {output: lineage_summary(outputs[output]) for output in KINDS}}


def lineage_summary(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Assembled rows per synthesis stage, per model and per seed (from the lineage the stage wrote; "unknown"
    where a source row had none)."""
    origins = [row["meta"]["lineage"] for row in rows]
    count = lambda key: dict(sorted(Counter(str(key(o)) for o in origins).items()))  # noqa: E731
    return {"rows": len(rows), "by_stage": count(lambda o: o["source_stage"]),
            "by_model": count(lambda o: o.get("previous", {}).get("model", "unknown")),
            "by_seed": count(lambda o: o.get("previous", {}).get("seed", "unknown"))}
