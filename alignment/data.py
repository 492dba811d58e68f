"""The two data sets every stage speaks, in TRL's conversational format.

- demonstrations (D): {id, messages, source, meta}; messages = [{role, content}, ...], ending
  with the assistant's reply (an optional system message first, user/assistant alternating).
- preferences (P): {id, prompt, chosen, rejected, source, meta}; prompt = messages ending with
  a user turn; chosen / rejected = [one assistant message].

Rows are read from JSONL, parquet or a Hub dataset id. Reading never stops at a bad row and
never drops one silently: each bad row goes to the quarantine with the file, row number and
reason, and `rows read = rows kept + rows quarantined` is checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .atomic import atomic_write_text

RowKind = Literal["demonstration", "preference", "prompt", "any"]
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data problem naming the file, the row and the field."""


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

    def check(self, source: str) -> None:
        if self.read != len(self.rows) + len(self.quarantined):
            raise DataError(f"{source}: read {self.read} rows but kept {len(self.rows)} "
                            f"and quarantined {len(self.quarantined)}")


def _raw_rows(source: str) -> Iterator[tuple[int, Any, str | None]]:
    """(row number, parsed row or raw text, JSON error or None) for a JSONL file, parquet file or Hub id."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield n, line.rstrip("\n"), f"malformed JSON ({e.msg} at column {e.colno})"
        return
    import datasets

    if path.suffix == ".parquet" and path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.exists():
        raise DataError(f"{source}: unsupported file type (use .jsonl or .parquet)")
    else:
        try:
            ds = datasets.load_dataset(source, split="train")
        except Exception as e:  # noqa: BLE001 - any hub/load failure becomes one clear line
            raise DataError(f"{source}: not a local file and not loadable as a Hub dataset ({e})") from None
    for n, row in enumerate(ds, 1):
        yield n, dict(row), None


def missing_local_file(source: str) -> bool:
    """True for a path that looks local (not a Hub id) and does not exist."""
    return not Path(source).exists() and (source.startswith((".", "/")) or source.endswith((".jsonl", ".parquet")))


def read_rows(source: str | os.PathLike, kind: RowKind) -> ReadResult:
    """Read and validate every row; bad rows are quarantined with `file:row: field: reason`."""
    source = str(source)
    if missing_local_file(source):
        raise DataError(f"{source}: file not found")
    result = ReadResult()
    seen: set[str] = set()
    for n, row, error in _raw_rows(source):
        result.read += 1
        problem = error or row_problem(row, kind)
        if not problem and kind != "any":
            if row["id"] in seen:
                problem = f"id: duplicate id {row['id']!r}"
            seen.add(row["id"])
        if problem:
            result.quarantined.append(Quarantined(problem, row, f"{source}:{n}"))
        else:
            result.rows.append(normalise(row) if kind != "any" else row)
    result.check(source)
    return result


def to_jsonl(rows: list[Any]) -> str:
    """Deterministic JSONL text (same rows -> same bytes)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_rows(path: str | os.PathLike, rows: list[Any]) -> None:
    """Atomically write rows as JSONL."""
    atomic_write_text(path, to_jsonl(rows))


def load_jsonl(path: str | os.PathLike) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
