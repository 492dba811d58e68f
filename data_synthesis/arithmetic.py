"""A small verifiable data source: addition questions with correct answers (D) and correct vs
wrong answers (P). The demo and the tests use it to show each trainer doing its job."""

from __future__ import annotations

import random
import re
from pathlib import Path

from alignment.data import write_rows

ANSWER = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)\.\s*$")


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def answer(a: int, b: int, total: int) -> str:
    return f"{a} + {b} = {total}."


def is_correct(a: int, b: int, reply: str) -> bool | None:
    """True/False for a well-formed reply, None when the reply is not in the answer format."""
    m = ANSWER.match(reply)
    if not m:
        return None
    return (int(m[1]), int(m[2])) == (a, b) and int(m[3]) == a + b


def arithmetic_sets(n_demonstrations: int, n_preferences: int, seed: int = 0, max_operand: int = 9):
    """(D rows, P rows). The wrong answer in a pair is off by 1-3, so a judge must check the sum."""
    rng = random.Random(seed)
    pair = lambda: (rng.randint(0, max_operand), rng.randint(0, max_operand))  # noqa: E731
    demos = []
    for i in range(n_demonstrations):
        a, b = pair()
        demos.append({"id": f"add-d{i:05d}", "messages": question(a, b) + [{"role": "assistant", "content": answer(a, b, a + b)}],
                      "source": "arithmetic", "meta": {"a": a, "b": b}})
    prefs = []
    for i in range(n_preferences):
        a, b = pair()
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        wrong = wrong if wrong >= 0 else a + b + 1
        prefs.append({"id": f"add-p{i:05d}", "prompt": question(a, b),
                      "chosen": [{"role": "assistant", "content": answer(a, b, a + b)}],
                      "rejected": [{"role": "assistant", "content": answer(a, b, wrong)}],
                      "source": "arithmetic", "meta": {"a": a, "b": b}})
    return demos, prefs


def write_arithmetic_sets(out: str | Path, n_demonstrations: int, n_preferences: int, seed: int = 0) -> dict[str, Path]:
    demos, prefs = arithmetic_sets(n_demonstrations, n_preferences, seed)
    out = Path(out)
    paths = {"demonstrations": out / "demonstrations.jsonl", "preferences": out / "preferences.jsonl"}
    write_rows(paths["demonstrations"], demos)
    write_rows(paths["preferences"], prefs)
    return paths
