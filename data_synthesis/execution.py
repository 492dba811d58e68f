"""`execution`: execution feedback for code (kind `code`), the report's recipe for verifiable programs.

Every task is a prompt row; its tests (Python `assert` code) come with it in `meta.tests`, or,
when it has none, the teacher writes them in a separate generation (`TESTS_PROMPT`). The teacher
then writes `generation.n` solutions; the code of each (`extract_code`: the last fenced block,
else the whole reply) runs with the tests in `reward.sandbox` (bubblewrap), never in this process,
`workers` at a time, each under the recipe's `timeout_s` and `memory_mb`. A solution passes when
the program exits 0 and reaches the end of the tests (a solution that exits early does not pass).
Passing solutions, deduplicated, become demonstrations (D); passing vs failing solutions become
preference pairs (P). When every solution fails tests the model wrote, the tests are suspect:
the task goes to `suspect_tests.jsonl` and gives no pairs (the solutions are not blamed). Every
task gets a score row (samples, passed, pass@1, pass@k, statuses); rows keep their lineage.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from alignment.data import Quarantined
from alignment.stages import Outcome, ShardContext, StageError
from reward.sandbox import Program, SandboxResult, run_many, sandbox_unavailable_reason

from .generate import GeneratingStage, lineage
from .recipes import ExecutionRecipe

TESTS_PROMPT = ("Write tests for a correct solution to the programming task below: Python `assert` statements "
                "only, calling the functions the task asks for. Reply with one ```python code block.\n\n"
                "Task:\n{task}")
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


@dataclass
class JudgedSolutions:
    """A task's replies split by whether their code passed its tests, duplicates dropped, order kept."""

    passing: list[str]
    failing: list[str]
    samples: int
    passed_samples: int
    statuses: dict[str, int] = field(default_factory=dict)


def judge_solutions(replies: list[str], verdicts: list[bool], statuses: list[str]) -> JudgedSolutions:
    passing: list[str] = []
    failing: list[str] = []
    for reply, ok in zip(replies, verdicts, strict=True):
        kept = passing if ok else failing
        if reply.strip() and reply.strip() not in (r.strip() for r in kept):
            kept.append(reply)
    return JudgedSolutions(passing, failing, len(replies), sum(verdicts), dict(sorted(Counter(statuses).items())))


def execution_rows(task: dict, tests: str, tests_source: str, judged: JudgedSolutions, model: str, seed: int
                   ) -> dict[str, list[dict]]:
    """The D, P, score and suspect-test rows of one task. Model-written tests that every solution fails
    are suspect: the task is recorded in `suspect_tests` and gives no pairs."""
    prompt, source = task["messages"], "execution"
    info = {"tests": tests_source, "samples": judged.samples, "passed": judged.passed_samples}
    meta = lambda **extra: task["meta"] | lineage("execution", model, seed, task["id"], **info, **extra)  # noqa: E731
    suspect = tests_source == "model" and judged.samples > 0 and judged.passed_samples == 0
    demonstrations = [{"id": f"{task['id']}-c{i}", "messages": prompt + [{"role": "assistant", "content": reply}],
                       "source": source, "meta": meta(verdict="passed")} for i, reply in enumerate(judged.passing)]
    preferences = [] if suspect else [
        {"id": f"{task['id']}-p{i}", "prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
         "rejected": [{"role": "assistant", "content": rejected}], "source": source, "meta": meta()}
        for i, (chosen, rejected) in enumerate(zip(judged.passing, judged.failing))]
    score = {"id": task["id"], "tests": tests_source, "samples": judged.samples, "passed": judged.passed_samples,
             "pass@1": judged.passed_samples / max(judged.samples, 1), "pass@k": float(judged.passed_samples > 0),
             "statuses": judged.statuses, "suspect_tests": suspect}
    suspects = [{"id": task["id"], "prompt": prompt, "tests": tests, "samples": judged.samples,
                 "statuses": judged.statuses}] if suspect else []
    return {"demonstrations": demonstrations, "preferences": preferences, "scores": [score],
            "suspect_tests": suspects}


def task_tests(task: dict) -> str | None:
    """The tests a task brings (`meta.tests`, or a top-level `tests`), None when it brings none."""
    tests = task.get("tests", task["meta"].get("tests"))
    return tests if isinstance(tests, str) and tests.strip() else None


class ExecutionStage(GeneratingStage):
    name = "execution"
    recipe_class = ExecutionRecipe
    inputs = {"tasks": "prompt"}
    outputs = ("demonstrations", "preferences", "scores", "suspect_tests")

    def setup(self, side_inputs: dict[str, list[dict]]) -> None:
        problem = sandbox_unavailable_reason()
        if problem is not None:  # refuse before loading the model: model-written code never runs uncontained
            raise StageError(f"execution: the code sandbox cannot run here ({problem}); "
                             "install bubblewrap (apt-get install bubblewrap)")
        self.executions, self.sandbox_wall_s = 0, 0.0
        super().setup(side_inputs)

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        recipe = self.recipe
        tests: list[str | None] = [task_tests(row) for row in rows]
        asked = [i for i, t in enumerate(tests) if t is None]
        sources = ["task" if t is not None else "model" for t in tests]
        if asked:
            prompts = [[{"role": "user", "content": TESTS_PROMPT.format(task=rows[i]["messages"][-1]["content"])}]
                       for i in asked]
            for i, completions in zip(asked, self.sample_prompts(prompts, ctx, n=1)):
                tests[i] = extract_code(completions[0].text) or None
        runnable = [i for i, t in enumerate(tests) if t is not None]
        sampled = self.sample([rows[i] for i in runnable], ctx) if runnable else []
        replies = {i: [c.text for c in completions] for i, completions in zip(runnable, sampled)}
        marker = f"all tests ran {uuid.uuid4().hex}"  # unguessable, so printing it is not passing
        jobs = [(i, reply) for i in runnable for reply in replies[i]]
        start = time.monotonic()
        batch = run_many([solution_program(extract_code(reply), tests[i], marker) for i, reply in jobs],
                         workers=recipe.workers, timeout_s=recipe.timeout_s, memory_mb=recipe.memory_mb)
        self.executions += len(jobs)
        self.sandbox_wall_s += time.monotonic() - start
        results = iter(batch.results)
        outcomes: list[Outcome] = []
        for i, row in enumerate(rows):
            if tests[i] is None:
                outcomes.append(Quarantined("tests: the task brings none (meta.tests) and the teacher wrote no code "
                                            "block of tests", row))
                continue
            ran = [next(results) for _ in replies[i]]
            judged = judge_solutions(replies[i], [solution_passed(r, marker) for r in ran], [r.status for r in ran])
            outcomes.append(execution_rows(row, tests[i], sources[i], judged, recipe.generation.model, ctx.seed))
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        scores = outputs["scores"]
        samples = sum(s["samples"] for s in scores)
        executions, wall = getattr(self, "executions", 0), getattr(self, "sandbox_wall_s", 0.0)
        return {"execution": {"kind": self.recipe.kind, "tasks": len(scores), "solutions_run": samples,
                              "pass_rate": sum(s["passed"] for s in scores) / samples if samples else 0.0,
                              "mean_pass@1": mean(s["pass@1"] for s in scores) if scores else 0.0,
                              "pass@k": mean(s["pass@k"] for s in scores) if scores else 0.0,
                              "k": self.recipe.generation.n,
                              "tests_from_model": sum(s["tests"] == "model" for s in scores),
                              "suspect_tests": len(outputs["suspect_tests"]),
                              # this invocation only (a resumed run counts the shards it ran)
                              "sandbox_executions": executions,
                              "sandbox_executions_per_s": executions / wall if wall > 0 else 0.0}}
