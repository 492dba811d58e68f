"""Code in model replies and the test programs that judge it: what execution feedback (`data_synthesis.execution`)
and eval's code pass@1 share, so both judge a solution the same way, always in `reward.sandbox`."""

from __future__ import annotations

import functools
import re
import subprocess
import uuid
from pathlib import Path

from .sandbox import BatchResult, Program, SandboxResult, SandboxSpec, run_many, sandbox_interpreter

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
    """A sandbox job: `reward/solution_runner.py` runs `tests.py` against `solution.py` (in a process of its own,
    so the solution's `if __name__ == "__main__":` block does not run: its __name__ is "solution") and prints
    `marker`, which it reads from stdin after the solution's process started without it, when every test ran."""
    loader, bytecode = runner_files()
    return Program(loader, stdin=marker + "\n", files={"runner.marshal": bytecode, "solution.py": solution,
                                                       "tests.py": tests}, site=False)


@functools.cache
def runner_files() -> tuple[str, bytes]:
    """(main.py, runner.marshal): the runner compiled once by the sandbox's own interpreter (compiling it cost 6 ms
    a run), and a loader giving it that interpreter's sys.path without the working directory (nothing the
    solution writes is imported), so it starts without the site module (3 ms a run)."""
    interpreter, _ = sandbox_interpreter()
    probe = ("import marshal, sys; out = sys.stdout.buffer; out.write(repr([p for p in sys.path if p]).encode());"
             "out.write(b'\\n' + marshal.dumps(compile(sys.stdin.read(), 'runner', 'exec')))")
    source = Path(__file__).with_name("solution_runner.py").read_bytes()
    output = subprocess.run([interpreter, "-I", "-c", probe], input=source, capture_output=True, check=True).stdout
    paths, _, bytecode = output.partition(b"\n")
    loader = (f"import marshal, sys\nsys.path[:] = {paths.decode()}\n"
              "exec(marshal.loads(open('runner.marshal', 'rb').read()))\n")
    return loader, bytecode


def solution_passed(result: SandboxResult, marker: str) -> bool:
    """Exited 0 after the last test ran: the marker is the last line it printed."""
    return result.passed and result.stdout.rstrip("\n").rsplit("\n", 1)[-1] == marker


def run_solutions(jobs: list[tuple[str, str]], sandbox: SandboxSpec) -> tuple[list[bool], BatchResult]:
    """Each (reply, tests) job: the reply's code with the tests in the sandbox; whether every test ran, and the
    sandbox's results in job order."""
    marker = f"all tests ran {uuid.uuid4().hex}"  # unguessable, and never where the solution can read it
    batch = run_many([solution_program(extract_code(reply), tests, marker) for reply, tests in jobs],
                     workers=sandbox.workers, timeout_s=sandbox.timeout_s, memory_mb=sandbox.memory_mb,
                     accept_weaker=sandbox.accept_weaker)
    return [solution_passed(result, marker) for result in batch.results], batch
