"""Reading JSON out of a model's answer: models wrap it in code fences and prose, leave trailing commas and use
single quotes, so every stage that asks for JSON reads the answer leniently here."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")


def _decode(text: str) -> Any:
    """The JSON value in `text`: as is, then with trailing commas removed, then its leading JSON value (prose
    with brackets after it), then as a Python literal (single quotes; literal_eval evaluates no code)."""
    repaired = _TRAILING_COMMA.sub(r"\1", text)
    for attempt in (lambda: json.loads(text), lambda: json.loads(repaired),
                    lambda: json.JSONDecoder().raw_decode(repaired)[0], lambda: ast.literal_eval(repaired)):
        try:
            return attempt()
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    raise ValueError("no JSON")


def _candidates(text: str) -> list[str]:
    """Code-fenced blocks first, then the whole text; each cut from its first bracket to its last closer."""
    out = []
    for block in [*_FENCE.findall(text), text]:
        starts = [i for i in (block.find("["), block.find("{")) if i >= 0]
        if not starts:
            continue
        start = min(starts)
        end = block.rfind("]" if block[start] == "[" else "}")
        if end > start:
            out.append(block[start:end + 1])
    return out


def json_values(text: str) -> Iterator[Any]:
    """Every JSON list or object that can be read from a model's answer, most likely first."""
    for candidate in _candidates(text):
        try:
            yield _decode(candidate)
        except ValueError:
            continue
