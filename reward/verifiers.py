"""Verifiers for answers that can be checked without a person: is a final math answer right?

Rejection sampling keeps a reasoning path only when its final answer equals the reference, so
the two steps are: find the final answer in free text (`extract_answer`: the last `\\boxed{...}`,
else "the answer is ...", else the last number), then compare it with the reference as
mathematics, not as strings (`math_equal`, through `math-verify`: 1/2 = \\frac{1}{2} = 0.5).
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s|\.$|$|\n)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1].strip() if depth == 0 else None


def extract_answer(text: str) -> str | None:
    """The final answer a response states: the last boxed expression, else what follows the last
    "the answer is", else the last number; None when there is none."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    stated = _ANSWER_IS.findall(text)
    if stated:
        return stated[-1].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def math_equal(reference: str, answer: str) -> bool:
    """Whether `answer` equals `reference` as mathematics (math-verify; the reference is the gold).

    math-verify's time limits use signals, which only work in the main thread: elsewhere (the
    stages' worker threads) they are switched off."""
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    if not gold or not predicted:
        return False
    return verify(gold, predicted, timeout_seconds=timeout)


def answer_is_correct(reference: str, response: str) -> bool:
    """Whether a response's final answer (`extract_answer`) equals the reference: the rejection stage's test of
    a path, and online DPO's verifiable reward."""
    answer = extract_answer(response)
    return answer is not None and math_equal(str(reference), answer)
