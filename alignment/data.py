"""The two data sets every stage speaks, in TRL's conversational format.

- demonstrations (D): {id, messages, source, meta}; messages = [{role, content}, ...], ending
  with the assistant's reply (an optional system message first, user/assistant alternating).
  A data set of plain text has {id, text, source, meta} rows instead (TRL's "text" type).
- texts: {id, text, source, meta} rows a stage reads as raw material (passages, character profiles).
- preferences (P): {id, prompt, chosen, rejected, source, meta}; prompt = messages ending with
  a user turn; chosen / rejected = [one assistant message].

An input is a `DataSource` (a JSONL or parquet file, a local folder laid out like a Hub dataset
repo, or a Hub dataset id; with split, config, revision, column mapping and a fraction), a
plain path string, or a list of them (a mixture). Rows of TRL's dataset types (messages,
prompt + completion, text, prompt + chosen + rejected, implicit-prompt chosen + rejected,
unpaired prompt + completion + label) are converted to the schema above; other columns go
under `meta`, and a data set without an `id` column gets content-hash ids. Reading never stops
at a bad row and never drops one silently: each bad row goes to the quarantine with the file,
row number and reason, and `rows read = rows kept + rows quarantined + rows merged into pairs`
is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .atomic import atomic_write_text

if TYPE_CHECKING:  # imported where data sets are read: the GPU check runs this package without it
    import datasets

RowKind = Literal["demonstration", "preference", "prompt", "text", "any"]
ROLES = ("system", "user", "assistant")
SCHEMA_FIELDS = ("id", "source", "meta")  # every row's fields besides its content


class DataError(ValueError):
    """A data problem naming the file, the row and the field."""


@dataclass
class DataSource:
    """One data set as users have it, so Hub data sets need no conversion step of their own.

    `path`: a .jsonl / .parquet file, a local folder laid out like a Hub dataset repo, or a Hub
    dataset id. `columns` maps our field names to the source's column names. `fraction` keeps
    round(fraction * rows) rows, always the same ones (ranked by a hash of the row number), in
    source order; a smaller fraction keeps a subset of a larger one."""

    path: str
    split: str = "train"
    name: str | None = None  # the dataset config
    revision: str | None = None  # a Hub branch, tag or commit
    columns: dict[str, str] = field(default_factory=dict)
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction: must be > 0 and <= 1, got {self.fraction}")

    def __str__(self) -> str:
        """What error messages and quarantine origins call this source: a file, or `path[split]`."""
        if Path(self.path).is_file():
            return self.path
        return f"{self.path}[{self.name}:{self.split}]" if self.name else f"{self.path}[{self.split}]"


DataInput = str | DataSource | list[str | DataSource]  # a recipe's `inputs.<name>`


def as_sources(data: DataInput | os.PathLike) -> list[DataSource]:
    """Every input form as the list of sources it reads, in order."""
    items = data if isinstance(data, list) else [data]
    return [item if isinstance(item, DataSource) else DataSource(path=str(item)) for item in items]


def _messages_problem(messages: Any, name: str, ends_with: str, assistant_only: bool = False) -> str | None:
    """Why `messages` is not a valid message list, or None."""
    if not isinstance(messages, list) or not messages:
        return f"{name}: must be a non-empty list of messages"
    for i, m in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            return f"{where}: must be a mapping with role and content"
        if m.get("role") not in ROLES:
            return f"{where}.role: must be one of {list(ROLES)}, got {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"{where}.content: must be a string"
        if m["role"] == "system" and (i != 0 or assistant_only):
            return f"{where}.role: a system message may only come first in a prompt"
        if assistant_only and m["role"] != "assistant":
            return f"{where}.role: must be 'assistant'"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not assistant_only:
        for i, role in enumerate(turns):
            if role != ("user" if i % 2 == 0 else "assistant"):
                return f"{name}: roles must alternate user/assistant, turn {i} is {role!r}"
    if not turns or turns[-1] != ends_with:
        return f"{name}: the last message must be from the {ends_with}"
    if any(not m["content"].strip() for m in messages if m["role"] != "system"):
        return f"{name}: a user or assistant message is empty"
    return None


def row_problem(row: Any, kind: RowKind) -> str | None:
    """None if `row` is a valid row of `kind`, else `field: reason`."""
    if not isinstance(row, dict):
        return f"row: must be a JSON object, got {type(row).__name__}"
    if kind == "any":
        return None
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "id: must be a non-empty string"
    if "source" in row and not isinstance(row["source"], str):
        return "source: must be a string"
    if "meta" in row and not isinstance(row["meta"], dict):
        return "meta: must be a mapping"
    if kind == "text" or (kind == "demonstration" and "messages" not in row and "text" in row):
        return None if isinstance(row.get("text"), str) and row["text"].strip() else "text: must be a non-empty string"
    if kind == "demonstration":
        return _messages_problem(row.get("messages"), "messages", "assistant")
    if kind == "prompt":
        return _messages_problem(row.get("messages"), "messages", "user")
    problem = _messages_problem(row.get("prompt"), "prompt", "user")
    for name in ("chosen", "rejected"):
        problem = problem or _messages_problem(row.get(name), name, "assistant", assistant_only=True)
        if not problem and len(row[name]) != 1:
            problem = f"{name}: must hold exactly one assistant message"
    if not problem and row["chosen"][0]["content"] == row["rejected"][0]["content"]:
        problem = "chosen: identical to rejected"
    return problem


def normalise(row: dict) -> dict:
    """Fill the optional fields so every stored row has the same keys."""
    row.setdefault("source", "")
    row.setdefault("meta", {})
    return row


@dataclass
class Quarantined:
    """A row set aside, with why and where it came from."""

    reason: str
    row: Any
    origin: str = ""

    def record(self) -> dict:
        return {"reason": self.reason, "origin": self.origin, "row": self.row}


@dataclass
class ReadResult:
    rows: list[dict] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    read: int = 0
    merged: int = 0  # input rows that became the second half of a kept preference pair

    def check(self, source: str) -> None:
        if self.read != len(self.rows) + len(self.quarantined) + self.merged:
            raise DataError(f"{source}: read {self.read} rows but kept {len(self.rows)}, "
                            f"quarantined {len(self.quarantined)} and merged {self.merged} into pairs")


class _BadRow(ValueError):
    """A row that cannot be converted to our schema; the message is `field: reason`."""


_RawRow = tuple[int, Any, str | None]  # (row number, parsed row or raw text, JSON error or None)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fraction_indices(count: int, fraction: float) -> list[int]:
    """The row numbers (0-based, ascending) a fraction keeps: ranked by a hash of the row number,
    so the choice is the same on every read and machine, and nested across fractions."""
    if fraction == 1:
        return list(range(count))
    ranked = sorted(range(count), key=lambda i: hashlib.sha256(str(i).encode()).digest())
    return sorted(ranked[: round(count * fraction)])


def _jsonl_rows(source: DataSource) -> tuple[list[_RawRow], bool]:
    """A JSONL file's kept rows, and whether the file has an id column at all."""
    parsed: list[_RawRow] = []
    with open(source.path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                parsed.append((n, json.loads(line), None))
            except json.JSONDecodeError as e:
                parsed.append((n, line.rstrip("\n"), f"malformed JSON ({e.msg} at column {e.colno})"))
    id_column = source.columns.get("id", "id")
    has_ids = any(isinstance(row, dict) and id_column in row for _, row, _ in parsed)
    return [parsed[i] for i in _fraction_indices(len(parsed), source.fraction)], has_ids


def _load_dataset(source: DataSource) -> datasets.Dataset:
    """A parquet file, a local folder or a Hub dataset through `datasets`, as one split.

    A folder with a subfolder named like the split (`train_sft/*.parquet`) reads that subfolder:
    `datasets` only infers split folders with standard names (train, test, validation)."""
    import datasets

    path = Path(source.path)
    try:
        if path.is_file():
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        data_files = {source.split: f"{source.split}/**"} if (path / source.split).is_dir() else None
        return datasets.load_dataset(source.path, name=source.name, split=source.split, revision=source.revision,
                                     data_files=data_files)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one clear line
        what = "cannot load this split" if path.is_dir() else "not a local file and not loadable as a Hub dataset"
        raise DataError(f"{source}: {what} ({_first_line(e)})") from None


def _dataset_rows(source: DataSource) -> tuple[Iterator[_RawRow], bool]:
    """A data set's kept rows, and whether it has an id column."""
    ds = _load_dataset(source)
    for ours, theirs in source.columns.items():
        if theirs not in ds.column_names:
            raise DataError(f"{source}: columns.{ours}: no column {theirs!r} (the columns are {ds.column_names})")
    indices = _fraction_indices(len(ds), source.fraction)
    rows = ((i + 1, dict(row), None) for i, row in zip(indices, ds.select(indices)))
    return rows, source.columns.get("id", "id") in ds.column_names


def _raw_rows(source: DataSource) -> tuple[Iterable[_RawRow], bool]:
    """The rows `fraction` keeps from a JSONL file, parquet file, local folder or Hub id, and
    whether the data set has an id column."""
    path = Path(source.path)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        return _jsonl_rows(source)
    if path.is_file() and path.suffix != ".parquet":
        raise DataError(f"{source}: unsupported file type (use .jsonl or .parquet)")
    return _dataset_rows(source)


def _as_messages(value: Any, role: str, name: str) -> list:
    """TRL's string form of a turn (`"prompt": "Hi"`) as a message list; lists pass as they are."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise _BadRow(f"{name}: must be a string or a list of messages, got {type(value).__name__}")


def _turn(message: Any) -> Any:
    return (message.get("role"), message.get("content")) if isinstance(message, dict) else message


def _split_conversations(prompt_column: Any, chosen: list, rejected: list) -> dict:
    """Implicit-prompt preference: the turns chosen and rejected share are the prompt, the rest the
    replies. A prompt column given as well (ultrafeedback_binarized) must match those turns, or
    be the last of them as a string."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and _turn(chosen[shared]) == _turn(rejected[shared]):
        shared += 1
    prompt = chosen[:shared]
    if prompt_column is not None:
        if isinstance(prompt_column, str):
            matches = bool(prompt) and _turn(prompt[-1]) == ("user", prompt_column)
        else:
            matches = [_turn(m) for m in _as_messages(prompt_column, "user", "prompt")] == [_turn(m) for m in prompt]
        if not matches:
            raise _BadRow("prompt: differs from the turns that chosen and rejected share")
    return {"prompt": prompt, "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _preference_content(row: dict) -> dict:
    """prompt / chosen / rejected from explicit-prompt or implicit-prompt preference columns."""
    chosen = _as_messages(row["chosen"], "assistant", "chosen")
    rejected = _as_messages(row["rejected"], "assistant", "rejected")
    if len(chosen) > 1 and isinstance(chosen[0], dict) and chosen[0].get("role") != "assistant":  # a whole conversation
        return _split_conversations(row.get("prompt"), chosen, rejected)
    if "prompt" not in row:
        raise _BadRow("prompt: missing, and chosen holds only the reply")
    return {"prompt": _as_messages(row["prompt"], "user", "prompt"), "chosen": chosen, "rejected": rejected}


def _content(row: dict, kind: RowKind) -> tuple[dict, set[str]]:
    """The row's content in our schema, from whichever TRL dataset type it is, and the columns used."""
    if kind == "demonstration":
        if "messages" in row:
            return {"messages": row["messages"]}, {"messages"}
        if "prompt" in row and "completion" in row:
            messages = (_as_messages(row["prompt"], "user", "prompt")
                        + _as_messages(row["completion"], "assistant", "completion"))
            return {"messages": messages}, {"prompt", "completion"}
        if "text" in row:
            return {"text": row["text"]}, {"text"}
        raise _BadRow("messages: missing (expected a messages, prompt + completion, or text column)")
    if kind == "text":
        if "text" in row:
            return {"text": row["text"]}, {"text"}
        raise _BadRow("text: missing (expected a text column)")
    if kind == "prompt":
        if "prompt" in row:
            return {"messages": _as_messages(row["prompt"], "user", "prompt")}, {"prompt"}
        if "messages" in row:
            return {"messages": row["messages"]}, {"messages"}
        raise _BadRow("messages: missing (expected a messages or prompt column)")
    if "chosen" in row and "rejected" in row:
        return _preference_content(row), {"prompt", "chosen", "rejected"}
    raise _BadRow("chosen: missing (expected prompt + chosen + rejected, chosen + rejected, "
                  "or prompt + completion + label columns)")


def content_id(content: dict) -> str:
    """A stable id for a row without one: sha256 of its content's canonical JSON, 16 hex digits."""
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _schema_row(row: dict, kind: RowKind, has_ids: bool) -> dict:
    """A row of any TRL dataset type in our schema; columns it does not use go under `meta`."""
    content, used = _content(row, kind)
    converted = {"id": row["id"]} if "id" in row else {}
    if not has_ids:
        converted["id"] = content_id(content)
    converted.update(content)
    if "source" in row:
        converted["source"] = row["source"]
    extra = {k: v for k, v in row.items() if k not in used and k not in SCHEMA_FIELDS}
    meta = row.get("meta", {})
    converted["meta"] = {**extra, **meta} if isinstance(meta, dict) else meta
    return converted


@dataclass
class _Half:
    """One row of an unpaired preference data set (prompt, completion, label)."""

    origin: str
    raw: Any  # as the source has it, for the quarantine
    others: dict  # the columns besides prompt, completion and label, kept under meta
    prompt: list
    completion: list
    label: bool


def _half(row: dict, raw: Any, origin: str) -> _Half:
    if not isinstance(row["label"], bool):
        raise _BadRow(f"label: must be true or false, got {row['label']!r}")
    others = {k: v for k, v in row.items() if k not in ("prompt", "completion", "label")}
    return _Half(origin, raw, others, _as_messages(row.get("prompt"), "user", "prompt"),
                 _as_messages(row["completion"], "assistant", "completion"), row["label"])


_Candidate = tuple[list[tuple[str, Any]], dict | None, str | None]  # ([(origin, raw row)], row, problem)


def _pairs(halves: list[_Half]) -> Iterator[_Candidate]:
    """Unpaired preference rows as pairs: the i-th True and the i-th False completion of the same
    prompt form a pair (first appearance order); a completion left without a partner is a problem."""
    groups: dict[str, dict[bool, list[_Half]]] = {}
    for half in halves:
        key = json.dumps([_turn(m) for m in half.prompt], default=str)
        groups.setdefault(key, {True: [], False: []})[half.label].append(half)
    for group in groups.values():
        for good, bad in zip(group[True], group[False]):
            content = {"prompt": good.prompt, "chosen": good.completion, "rejected": bad.completion}
            row = {"id": content_id(content), **content, "meta": {"chosen": good.others, "rejected": bad.others}}
            yield [(good.origin, good.raw), (bad.origin, bad.raw)], row, None
        for label, partner in ((True, False), (False, True)):
            for left in group[label][len(group[partner]):]:
                yield [(left.origin, left.raw)], None, f"label: no {partner} completion of the same prompt to pair with"


def _renamed(row: Any, columns: dict[str, str]) -> Any:
    """The row with the source's columns under our field names (a mapped name replaces a column of that name)."""
    if not columns or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    renamed.update({ours: row[theirs] for ours, theirs in columns.items() if theirs in row})
    return renamed


def _candidates(source: DataSource, kind: RowKind) -> Iterator[_Candidate]:
    """Each output row of `source` with the input rows it came from, converted but not yet validated."""
    rows, has_ids = _raw_rows(source)
    label = str(source)
    halves: list[_Half] = []
    for n, raw, error in rows:
        origin = f"{label}:{n}"
        row = _renamed(raw, source.columns)
        if error or kind == "any" or not isinstance(row, dict):
            yield [(origin, raw)], row, error
            continue
        try:
            if kind == "preference" and "completion" in row and "label" in row and "chosen" not in row:
                halves.append(_half(row, raw, origin))
                continue
            yield [(origin, raw)], _schema_row(row, kind, has_ids), None
        except _BadRow as e:
            yield [(origin, raw)], None, str(e)
    yield from _pairs(halves)


def missing_local_file(source: str) -> bool:
    """True for a path that looks local (not a Hub id) and does not exist."""
    return not Path(source).exists() and (source.startswith((".", "/")) or source.endswith((".jsonl", ".parquet")))


def read_rows(data: DataInput | os.PathLike, kind: RowKind) -> ReadResult:
    """Read, convert and validate every row of every source, in order; bad rows are quarantined
    with `file:row: field: reason`. Plain text rows and conversations do not mix in one input."""
    sources = as_sources(data)
    result = ReadResult()
    seen: set[str] = set()
    first_origin: dict[str, str] = {}  # "text" / "messages" -> where the first such row is
    for source in sources:
        if missing_local_file(source.path):
            raise DataError(f"{source.path}: file not found")
        for inputs, row, problem in _candidates(source, kind):
            result.read += len(inputs)
            problem = problem or row_problem(row, kind)
            if not problem and kind != "any":
                if row["id"] in seen:
                    problem = f"id: duplicate id {row['id']!r}"
                seen.add(row["id"])
            if problem:
                result.quarantined += [Quarantined(problem, raw, origin) for origin, raw in inputs]
                continue
            result.rows.append(normalise(row) if kind != "any" else row)
            result.merged += len(inputs) - 1
            if kind == "demonstration":
                first_origin.setdefault("text" if "messages" not in row else "messages", inputs[0][0])
    if len(first_origin) == 2:
        raise DataError(f"{first_origin['text']}: a plain text row, but {first_origin['messages']} is a "
                        "conversation; an input must be all text or all messages")
    result.check(" + ".join(map(str, sources)))
    return result


def trl_dataset(rows: list[dict], kind: RowKind) -> datasets.Dataset:
    """Valid rows as the dataset TRL's trainers take: conversational language modelling
    (`messages`) or plain text (`text`) for D, `prompt/chosen/rejected` for P, prompt-only
    (`prompt`) for prompts; ids, sources and meta are left out."""
    import datasets

    if kind == "preference":
        return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    if kind == "prompt":
        return datasets.Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    if kind == "demonstration":
        text = bool(rows) and "messages" not in rows[0]
        return datasets.Dataset.from_list([{"text": r["text"]} if text else {"messages": r["messages"]} for r in rows])
    raise ValueError(f"trl_dataset: rows of kind {kind!r} have no TRL dataset type")


def to_jsonl(rows: list[Any]) -> str:
    """Deterministic JSONL text (same rows -> same bytes)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_rows(path: str | os.PathLike, rows: list[Any]) -> None:
    """Atomically write rows as JSONL."""
    atomic_write_text(path, to_jsonl(rows))


def load_jsonl(path: str | os.PathLike) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
