"""Math answer verification: extraction from free text, and equality as mathematics."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from reward.verifiers import extract_answer, math_equal


@pytest.mark.parametrize("text, answer", [
    ("So we get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("First \\boxed{3}, then correcting: \\boxed{x^{2} + 1}", "x^{2} + 1"),
    ("Adding them up, the answer is 1,234.", "1,234"),
    ("The answer is: $-7$", "-7"),
    ("2 + 9 = 11.", "11"),
    ("We have 3 apples and 4 pears, 7 fruit in all", "7"),
    ("No number here at all.", None),
])
def test_the_final_answer_is_found(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("reference, answer", [
    ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac{1}{2}"), ("3", "3.0"), ("1234", "1,234"), ("\\sqrt{4}", "2"),
    ("x^2 + 2x + 1", "(x+1)^2"),
])
def test_equal_answers_are_equal(reference, answer):
    assert math_equal(reference, answer)


@pytest.mark.parametrize("reference, answer", [("3", "4"), ("\\frac{1}{2}", "0.25"), ("x + 1", "x - 1"), ("7", "")])
def test_wrong_answers_are_not(reference, answer):
    assert not math_equal(reference, answer)


def test_verification_works_in_worker_threads():
    """The stages verify in a thread pool, where math-verify's signal-based time limit cannot run."""
    cases = [("\\frac{1}{2}", "0.5", True), ("3", "4", False)] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: math_equal(case[0], case[1]), cases))
    assert results == [expected for _, _, expected in cases]
