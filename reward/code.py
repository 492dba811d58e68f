"""Code in model replies and the test programs that judge it: what execution feedback (`data_synthesis.execution`)
and eval's code pass@1 share, so both judge a solution the same way, always in `reward.sandbox`."""

from __future__ import annotations

import re
import uuid

from .sandbox import BatchResult, Program, SandboxResult, run_many

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3"}


def extract_code(reply: str) -> str:
    """The code of a reply: the last fenced block tagged python (or untagged), else the last fenced block of
    any tag, else the whole reply; an unclosed last fence runs to the end. Never executed here."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(reply)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python or blocks:
        return (python or [blocks[-1][1]])[-1].strip("\n")
    return reply.strip()


def task_tests(task: dict) -> str | None:
    """The tests a task brings (`meta.tests`, or a top-level `tests`), None when it brings none."""
    tests = task.get("tests", task["meta"].get("tests"))
    return tests if isinstance(tests, str) and tests.strip() else None


def solution_program(solution: str, tests: str, marker: str) -> Program:
    """A sandbox job: `solution.py` is run, then `tests.py` in the same namespace, then `marker` is printed;
    the solution's `if __name__ == "__main__":` block does not run (its __name__ is "solution")."""
    main = ("_ns = {'__name__': 'solution', '__builtins__': __builtins__}\n"
            "exec(compile(open('solution.py').read(), 'solution.py', 'exec'), _ns)\n"
            "exec(compile(open('tests.py').read(), 'tests.py', 'exec'), _ns)\n"
            f"print({marker!r})\n")
    return Program(main, files={"solution.py": solution, "tests.py": tests})


def solution_passed(result: SandboxResult, marker: str) -> bool:
    """Exited 0 after the last test ran: the marker is the last line it printed."""
    return result.passed and result.stdout.rstrip("\n").rsplit("\n", 1)[-1].endswith(marker)


def run_solutions(jobs: list[tuple[str, str]], workers: int, timeout_s: float, memory_mb: int
                  ) -> tuple[list[bool], BatchResult]:
    """Each (reply, tests) job: the reply's code with the tests in the sandbox; whether every test ran, and the
    sandbox's results in job order."""
    marker = f"all tests ran {uuid.uuid4().hex}"  # unguessable, so printing it is not passing
    batch = run_many([solution_program(extract_code(reply), tests, marker) for reply, tests in jobs],
                     workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    return [solution_passed(result, marker) for result in batch.results], batch
