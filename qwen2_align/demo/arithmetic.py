"""A small verifiable data source: addition questions with correct answers (D) and correct vs
wrong answers (P). The demo and the tests use it to show each trainer doing its job.

Half of the wrong answers keep the answer format and miss the sum by 1-3; the other half are
sloppy ("I think it is 9"). A tiny model trained for minutes on a CPU learns to reject the
sloppy ones quickly; checking the sum itself takes far more training, so held-out pair
accuracy well above chance (but short of 100%) is what the demo shows."""

from __future__ import annotations

import random
import re
from pathlib import Path

from alignment.data import write_rows
from alignment.generation import GenerationSpec, make_generator

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
        sloppy = i % 2 == 1
        rejected = f"I think it is {wrong}" if sloppy else answer(a, b, wrong)
        prefs.append({"id": f"add-p{i:05d}", "prompt": question(a, b),
                      "chosen": [{"role": "assistant", "content": answer(a, b, a + b)}],
                      "rejected": [{"role": "assistant", "content": rejected}],
                      "source": "arithmetic", "meta": {"a": a, "b": b, "wrong": "sloppy" if sloppy else "sum"}})
    return demos, prefs


def math_problems(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """Prompt rows with their reference answer in `meta.answer`: the input of rejection sampling."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"id": f"add-q{i:05d}", "messages": question(a, b), "source": "arithmetic",
                     "meta": {"a": a, "b": b, "answer": str(a + b)}})
    return rows


def write_arithmetic_sets(out: str | Path, n_demonstrations: int, n_preferences: int, seed: int = 0,
                          n_problems: int = 32) -> dict[str, Path]:
    demos, prefs = arithmetic_sets(n_demonstrations, n_preferences, seed)
    out = Path(out)
    paths = {"demonstrations": out / "demonstrations.jsonl", "preferences": out / "preferences.jsonl",
             "math_problems": out / "math_problems.jsonl"}
    write_rows(paths["demonstrations"], demos)
    write_rows(paths["preferences"], prefs)
    write_rows(paths["math_problems"], math_problems(n_problems, seed + 1))
    return paths


def answer_quality(model_dir: str | Path, n: int = 20, seed: int = 1) -> dict:
    """Greedy replies of a chat model to n fresh questions: how many keep the answer format, how many are right."""
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]
    spec = GenerationSpec(model=str(model_dir), temperature=0.0, max_new_tokens=16)
    with make_generator(spec) as gen:
        replies = [c[0] for c in gen.generate([question(a, b) for a, b in pairs], spec.sampling())]
    verdicts = [is_correct(a, b, r.text) for (a, b), r in zip(pairs, replies)]
    return {
        "questions": n,
        "in_format": sum(v is not None for v in verdicts),
        "ended_turn": sum(r.finish_reason == "stop" for r in replies),
        "correct": sum(v is True for v in verdicts),
        "example": {"question": question(*pairs[0])[0]["content"], "reply": replies[0].text},
    }
