"""Execution feedback (kind code): code found in replies, solutions run with their tests in the real
sandbox, passing to D, passing vs failing to P, model-written tests that nothing passes set aside."""

import json
import time

import pytest
import yaml

from alignment.checkpoint import init_checkpoint
from alignment.data import read_rows
from alignment.generation import Completion
from alignment.recipe_loader import RecipeError
from alignment.stages import ShardContext
from data_synthesis.execution import TESTS_PROMPT, ExecutionStage, execution_rows, judge_solutions
from qwen2_align.stage_table import load_recipe, run
from reward import sandbox
from reward.code import extract_code, run_solutions
from reward.sandbox import SandboxSpec

needs_bwrap = pytest.mark.skipif(sandbox.sandbox_unavailable_reason() is not None,
                                 reason=f"sandbox unavailable: {sandbox.sandbox_unavailable_reason()}")

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
TASK = {"id": "t1", "messages": [{"role": "user", "content": "Write `add(a, b)`."}], "source": "t",
        "meta": {"tests": TESTS}}
RIGHT = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
RIGHT_TOO = "```py\ndef add(a, b):\n    return sum((a, b))\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
EXITS = "```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```"  # exits before the tests run
FAKES = "```python\ndef add(a, b):\n    return 0\nprint('all tests ran')\n```"
MAIN = "```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n    raise SystemExit(add(1, 1))\n```"


def test_extract_code_takes_the_last_python_block_else_any_block_else_the_reply():
    assert extract_code(RIGHT) == "def add(a, b):\n    return a + b"
    assert extract_code("```python\nx = 1\n```\ntext\n```python\nx = 2\n```\n```text\nout\n```") == "x = 2"
    assert extract_code("```\nx = 3\n```") == "x = 3"
    assert extract_code("```js\nlet x = 4\n```") == "let x = 4"
    assert extract_code("intro\n```python\nx = 5\n") == "x = 5"  # cut off before the closing fence
    assert extract_code("  x = 6\n") == "x = 6"
    assert extract_code("") == ""


def _run(replies, tests=TESTS, timeout_s=5.0):
    start = time.monotonic()
    verdicts, batch = run_solutions([(reply, tests) for reply in replies],
                                    SandboxSpec(timeout_s=timeout_s, memory_mb=256, workers=2))
    for reply, result in zip(replies, batch.results):
        print(f"{reply[:40]!r}: {result.status} {result.stdout[-60:]!r} {result.stderr[-300:]!r}")
    return verdicts, [r.status for r in batch.results], time.monotonic() - start


@needs_bwrap
def test_solutions_run_with_their_tests_in_the_sandbox():
    verdicts, statuses, wall = _run([RIGHT, RIGHT_TOO, WRONG, LOOP, EXITS, FAKES, MAIN], timeout_s=2.0)
    assert verdicts == [True, True, False, False, False, False, True]
    assert statuses[2] == "error" and statuses[3] == "timeout"
    assert wall < 20  # the infinite loop cost its timeout, not the batch
    # the tests really run: tests that a correct solution fails make it fail
    assert _run([RIGHT], tests="assert add(2, 2) == 5\n")[0] == [False]
    # the code runs in the sandbox, not here: the pipeline's files are out of its reach
    assert _run(["```python\nopen('/work/main/README.md').read()\ndef add(a, b):\n    return a + b\n```"])[0] == [False]


# Each forges a pass on a runner that executes the tests in the solution's own process with the marker in a file
# beside it (the runner before issue 24): reading the marker, replacing a builtin, an object equal to everything.
READS_THE_MARKER = """```python
import glob, os, re
def add(a, b):
    return 0
seen = " ".join(open(path, errors="replace").read() for path in glob.glob("/sandbox/*") + ["/proc/1/cmdline"])
for path in ("/proc/1/fd/0", "/proc/1/mem", "/proc/1/environ"):
    try:
        seen += open(path, "rb").read(4096).decode(errors="replace")
    except OSError as error:
        print("refused", path, error)
found = re.findall(r"all tests ran [0-9a-f]{32}", seen)
print("found", found)
if found:
    print(found[0], flush=True)
    os._exit(0)
```"""
REPLACES_EXEC = """```python
import builtins
builtins.exec = lambda *args, **kwargs: None
builtins.AssertionError = type("Unraised", (BaseException,), {})
def add(a, b):
    return 0
```"""
EQUALS_EVERYTHING = """```python
class Anything(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Anything(0)
```"""
# What honest solutions do beyond returning numbers: objects with methods, generators, the exceptions tests expect.
OBJECTS = """```python
class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop()
    def __len__(self):
        return len(self.items)
def add(a, b):
    return a + b
def evens(n):
    yield from (i for i in range(n) if i % 2 == 0)
def parse(text):
    return {"words": tuple(text.split()), "chars": set(text), "raw": text.encode(), "ratio": len(text) / 4}
```"""
OBJECT_TESTS = TESTS + """stack = Stack()
stack.push(4)
stack.push(5)
assert len(stack) == 2 and stack.pop() == 5 and stack.items == [4]
assert list(evens(5)) == [0, 2, 4]
assert parse("a b") == {"words": ("a", "b"), "chars": {"a", " ", "b"}, "raw": b"a b", "ratio": 0.75}
try:
    Stack().pop()
except IndexError:
    pass
else:
    raise AssertionError("no IndexError")
"""


@needs_bwrap
def test_a_solution_cannot_forge_its_verdict():
    verdicts, statuses, _ = _run([READS_THE_MARKER, REPLACES_EXEC, EQUALS_EVERYTHING, RIGHT])
    assert verdicts == [False, False, False, True], statuses
    assert _run([OBJECTS], tests=OBJECT_TESTS)[0] == [True]  # the tests still reach what honest code returns
    assert _run([OBJECTS], tests=OBJECT_TESTS.replace("[0, 2, 4]", "[0, 2]"))[0] == [False]


def test_d_and_p_rows_from_judged_solutions(tmp_path):
    replies = [RIGHT, WRONG, RIGHT, LOOP, RIGHT_TOO]
    judged = judge_solutions(replies, [True, False, True, False, True], ["ok", "error", "ok", "timeout", "ok"])
    assert judged.passing == [RIGHT, RIGHT_TOO] and judged.failing == [WRONG, LOOP]  # duplicates dropped
    assert (judged.samples, judged.passed_samples) == (5, 3)
    assert judged.statuses == {"error": 1, "ok": 3, "timeout": 1}
    rows = execution_rows(TASK, TESTS, "task", judged, "teacher", 5)
    assert [r["messages"] for r in rows["demonstrations"]] == [
        TASK["messages"] + [{"role": "assistant", "content": r}] for r in (RIGHT, RIGHT_TOO)]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in rows["preferences"]] == \
        [(RIGHT, WRONG), (RIGHT_TOO, LOOP)]
    assert rows["demonstrations"][0]["meta"] == {"tests": TESTS, "lineage": {
        "stage": "execution", "model": "teacher", "seed": 5, "parent_id": "t1", "tests": "task", "samples": 5,
        "passed": 3, "verdict": "passed"}}
    assert rows["scores"] == [{"id": "t1", "tests": "task", "samples": 5, "passed": 3, "pass@1": 0.6, "pass@k": 1.0,
                               "statuses": {"error": 1, "ok": 3, "timeout": 1}, "suspect_tests": False}]
    assert rows["suspect_tests"] == []
    for kind, name in (("demonstration", "demonstrations"), ("preference", "preferences")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        assert not read_rows(path, kind).quarantined  # the trainers take them as they are


def test_model_tests_that_every_solution_fails_are_suspect_not_the_solutions():
    all_fail = judge_solutions([WRONG, LOOP], [False, False], ["error", "timeout"])
    rows = execution_rows(TASK, "assert add(1, 1) == 3\n", "model", all_fail, "teacher", 0)
    assert rows["suspect_tests"] == [{"id": "t1", "prompt": TASK["messages"], "tests": "assert add(1, 1) == 3\n",
                                      "samples": 2, "statuses": {"error": 1, "timeout": 1}}]
    assert rows["scores"][0]["suspect_tests"] and not rows["preferences"] and not rows["demonstrations"]
    # the task's own tests are trusted: every solution failing them is the solutions' fault, and not suspect
    assert not execution_rows(TASK, TESTS, "task", all_fail, "teacher", 0)["suspect_tests"]
    # model tests that some solution passes are not suspect, and give pairs
    mixed = execution_rows(TASK, TESTS, "model", judge_solutions([RIGHT, WRONG], [True, False], ["ok", "error"]),
                           "teacher", 0)
    assert not mixed["suspect_tests"] and len(mixed["preferences"]) == 1


def test_bad_code_recipes_are_refused(tmp_path):
    data = yaml.safe_load(open("recipes/tiny/execution.yaml"))
    for preset in ("tiny", "qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"):
        assert load_recipe(f"recipes/{preset}/execution.yaml").kind == "code"
    path = tmp_path / "execution.yaml"
    for change, expected in (({"teacher_checkers": 2}, "teacher_checkers: applies to kind instruction_following only"),
                             ({"sandbox": {"workers": 0}}, "workers: must be > 0")):
        path.write_text(yaml.safe_dump(data | change))
        with pytest.raises(RecipeError, match=expected) as e:
            load_recipe(path)
        assert "\n" not in str(e.value)


class _Scripted:
    """A backend with scripted replies: tests when asked for tests, else the solutions listed per task."""

    def __init__(self, tests: str, solutions: dict[str, list[str]]):
        self.tests, self.solutions, self.prompts = tests, solutions, []

    def generate(self, prompts, params):
        self.prompts += prompts
        out = []
        for p in prompts:
            if p[-1]["content"].startswith(TESTS_PROMPT.split("{")[0]):
                assert params.n == 1
                out.append([Completion(self.tests, 1, "stop")])
            else:
                out.append([Completion(r, 1, "stop") for r in self.solutions[p[-1]["content"]]])
        return out


def _recipe(tmp_path, model, n, **extra) -> dict:
    return {"stage": "execution", "run_dir": str(tmp_path / "run"), "seed": 0, "shard_size": 3,
            "inputs": {"tasks": str(tmp_path / "tasks.jsonl")}, "kind": "code",
            "sandbox": {"timeout_s": 2.0, "memory_mb": 256, "workers": 2},
            "generation": {"backend": "transformers", "model": str(model), "dtype": "float32", "n": n,
                           "temperature": 1.0, "max_new_tokens": 8}, **extra}


@needs_bwrap
def test_process_asks_for_tests_only_where_a_task_has_none(tmp_path):
    path = tmp_path / "execution.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, tmp_path / "init", 3)))
    stage = ExecutionStage(load_recipe(path))
    brings = dict(TASK, id="brings")
    asks = {"id": "asks", "messages": [{"role": "user", "content": "Write `add(a, b)` please."}], "source": "t",
            "meta": {}}
    stage.generator = _Scripted("Tests:\n```python\nassert add(1, 1) == 3\n```",  # wrong tests: nothing passes
                                {brings["messages"][-1]["content"]: [RIGHT, WRONG, LOOP],
                                 asks["messages"][-1]["content"]: [RIGHT, WRONG, RIGHT_TOO]})
    ctx = ShardContext(0, 7)
    out = stage.process([brings, asks], ctx)
    assert len([p for p in stage.generator.prompts if "Write tests" in p[-1]["content"]]) == 1
    assert out[0]["scores"][0] | {"statuses": None} == {"id": "brings", "tests": "task", "samples": 3, "passed": 1,
                                                         "pass@1": 1 / 3, "pass@k": 1.0, "statuses": None,
                                                         "suspect_tests": False}
    assert out[0]["scores"][0]["statuses"]["timeout"] == 1
    assert [p["rejected"][0]["content"] for p in out[0]["preferences"]] == [WRONG]
    assert out[1]["suspect_tests"][0]["tests"] == "assert add(1, 1) == 3" and not out[1]["preferences"]
    assert ctx.counts["sandbox_executions"] == 6


def test_the_stage_runs_on_the_tiny_model(tmp_path):
    if sandbox.sandbox_unavailable_reason() is not None:
        pytest.skip(f"sandbox unavailable: {sandbox.sandbox_unavailable_reason()}")
    model = init_checkpoint("tiny", tmp_path / "init", seed=0, num_hidden_layers=1)
    tasks = [json.loads(line) for line in open("recipes/tiny/data/code_tasks.jsonl")]
    assert any("tests" not in t["meta"] for t in tasks) and any("tests" in t["meta"] for t in tasks)
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    path = tmp_path / "execution.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, model, 2)))
    manifest = run("execution", load_recipe(path))
    counts, info = manifest["counts"], manifest["execution"]
    # an 8-token random reply with no code block runs as-is and is a syntax error; a teacher-written test
    # set that random code fails is suspect, or the task is quarantined when the reply is blank
    assert counts["processed"] + counts["quarantined_by_stage"] == len(tasks)
    assert info["tasks"] == counts["processed"] and info["k"] == 2
    assert info["solutions_run"] == 2 * counts["processed"] == info["sandbox_executions"]
    assert info["sandbox_executions_per_s"] > 0
    scores = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert info["pass_rate"] == sum(s["passed"] for s in scores) / info["solutions_run"]
    assert info["suspect_tests"] == sum(s["suspect_tests"] for s in scores)
    assert all(sum(s["statuses"].values()) == 2 for s in scores)
    assert (tmp_path / "run" / "suspect_tests.jsonl").exists()
