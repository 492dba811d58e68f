"""`execution`: execution feedback for code (kind `code`), the report's recipe for verifiable programs.

Every task is a prompt row; its tests (Python `assert` code) come with it in `meta.tests`, or,
when it has none, the teacher writes them in a separate generation (`TESTS_PROMPT`). The teacher
then writes `generation.n` solutions; the code of each (`extract_code`: the last fenced block,
else the whole reply) runs with the tests in `reward.sandbox` (bubblewrap), never in this process,
`sandbox.workers` at a time, each under `sandbox.timeout_s` and `sandbox.memory_mb`. A solution passes when
every test ran to the end (`reward.code`: the tests run in a process of their own, so nothing the solution
does can forge that verdict; a solution that exits early does not pass).
Passing solutions, deduplicated, become demonstrations (D); passing vs failing solutions become
preference pairs (P). When every solution fails tests the model wrote, the tests are suspect:
the task goes to `suspect_tests.jsonl` and gives no pairs (the solutions are not blamed). Every
task gets a score row (samples, passed, pass@1, pass@k, statuses); rows keep their lineage.

Kind `instruction_following` (AutoIF's manner): every prompt row gets checkable constraints, from its
`meta.constraints` or drawn from the seed kinds of `reward.constraints` (seeded by the recipe seed and the
row id), their descriptions appended to the user turn. Each seed kind brings a trusted checker and test
cases; with `teacher_checkers` > 0 the teacher also writes checkers with cases (`CHECKERS_PROMPT`), kept when
their accuracy on the pooled cases reaches `checker_min_accuracy` (a free-text constraint needs
`min_checkers` distinct ones, or the row is quarantined). One sandbox job per instruction runs every checker
on every case and every response; a response's pass rate is the share of kept checkers it passes. Pass rate
1 goes to D, chosen (>= `chosen_min_pass_rate`) vs rejected (0) to P; `suspect_tests` stays empty.
"""

from __future__ import annotations

import ast
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Literal

from alignment.data import Quarantined, load_jsonl
from alignment.generation import GenerationSpec
from alignment.recipe_loader import check_choices
from alignment.stages import Outcome, ShardContext, StageError, StageRecipe
from reward.code import extract_code, run_solutions, task_tests
from reward.constraints import (SEED_KINDS, CheckerVerdicts, Constraint, ConstraintError, constrained_prompt,
                                constraints_from_specs, draw_constraints, run_checkers)
from reward.sandbox import SandboxSpec, check_sandbox

from .generate import GeneratingStage, lineage

TESTS_PROMPT = ("Write tests for a correct solution to the programming task below: Python `assert` statements "
                "only, calling the functions the task asks for. Reply with one ```python code block.\n\n"
                "Task:\n{task}")
CHECKERS_PROMPT = ("A response to an instruction must follow this constraint:\n\n{constraint}\n\nWrite a Python "
                   "function `evaluate(response: str) -> bool` that returns True exactly when a response follows "
                   "the constraint (standard library only), in one ```python code block. Then write test cases in "
                   "one ```json block: a list of objects {{\"response\": \"...\", \"follows\": true or false}}, "
                   "some that follow the constraint and some that do not.")
TOO_FEW_CHECKERS = "too few checkers"
_JSON_BLOCK = re.compile(r"```[ \t]*json[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


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


def demonstration_row(row_id: str, prompt: list[dict], reply: str, meta: dict) -> dict:
    return {"id": row_id, "messages": prompt + [{"role": "assistant", "content": reply}], "source": "execution",
            "meta": meta}


def preference_row(row_id: str, prompt: list[dict], chosen: str, rejected: str, meta: dict) -> dict:
    return {"id": row_id, "prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": "execution", "meta": meta}


def execution_rows(task: dict, tests: str, tests_source: str, judged: JudgedSolutions, model: str, seed: int
                   ) -> dict[str, list[dict]]:
    """The D, P, score and suspect-test rows of one task. Model-written tests that every solution fails
    are suspect: the task is recorded in `suspect_tests` and gives no pairs."""
    prompt = task["messages"]
    info = {"tests": tests_source, "samples": judged.samples, "passed": judged.passed_samples}
    meta = lambda **extra: task["meta"] | lineage("execution", model, seed, task["id"], **info, **extra)  # noqa: E731
    suspect = tests_source == "model" and judged.samples > 0 and judged.passed_samples == 0
    demonstrations = [demonstration_row(f"{task['id']}-c{i}", prompt, reply, meta(verdict="passed"))
                      for i, reply in enumerate(judged.passing)]
    preferences = [] if suspect else [
        preference_row(f"{task['id']}-p{i}", prompt, chosen, rejected, meta())
        for i, (chosen, rejected) in enumerate(zip(judged.passing, judged.failing))]
    score = {"id": task["id"], "tests": tests_source, "samples": judged.samples, "passed": judged.passed_samples,
             "pass@1": judged.passed_samples / max(judged.samples, 1), "pass@k": float(judged.passed_samples > 0),
             "statuses": judged.statuses, "suspect_tests": suspect}
    suspects = [{"id": task["id"], "prompt": prompt, "tests": tests, "samples": judged.samples,
                 "statuses": judged.statuses}] if suspect else []
    return {"demonstrations": demonstrations, "preferences": preferences, "scores": [score],
            "suspect_tests": suspects}


def teacher_checker(reply: str) -> tuple[str | None, list[tuple[str, bool]]]:
    """A teacher's checker (the reply's code, None without `def evaluate`) and its test cases (the last ```json
    block: objects with a string `response` and a bool `follows`; other items are skipped). Parsed, never run."""
    code = extract_code(reply)
    items: object = []
    if blocks := _JSON_BLOCK.findall(reply):
        try:
            items = json.loads(blocks[-1])
        except (ValueError, RecursionError):
            items = []
    cases = [(item["response"], item["follows"]) for item in (items if isinstance(items, list) else [])
             if isinstance(item, dict) and isinstance(item.get("response"), str)
             and isinstance(item.get("follows"), bool)]
    return (code if "def evaluate" in code else None), cases


def normalised_source(code: str) -> str:
    """What makes two checkers the same: their syntax tree, formatting and comments aside (parsed, not run)."""
    try:
        return ast.dump(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return " ".join(code.split())


@dataclass
class ConstraintChecks:
    """One constraint's checkers as run: the trusted seed checker first (a seed kind's), then the teacher's
    distinct ones; `cases` pools the seed kind's cases and the teacher's."""

    constraint: Constraint
    teacher: list[str] = field(default_factory=list)
    cases: list[tuple[str, bool]] = field(default_factory=list)
    written: int = 0

    @property
    def checkers(self) -> list[str]:
        return ([self.constraint.checker] if self.constraint.checker else []) + self.teacher


def constraint_checks(constraint: Constraint, replies: list[str]) -> ConstraintChecks:
    """The constraint with the teacher's replies (checker + cases each) added, duplicate checkers dropped."""
    checks = ConstraintChecks(constraint, cases=list(constraint.cases), written=len(replies))
    seen = set()
    for code, cases in map(teacher_checker, replies):
        checks.cases += cases
        if code is not None and (key := normalised_source(code)) not in seen:
            seen.add(key)
            checks.teacher.append(code)
    return checks


def cross_validate(checks: ConstraintChecks, case_verdicts: list[list[bool]], errors: list[str | None],
                   min_accuracy: float) -> list[bool]:
    """Which teacher checkers are kept: they ran without error and agree with >= `min_accuracy` of the cases.
    For a seed kind, cases whose label its trusted checker contradicts are left out (the teacher's case is
    wrong, not the checkers that disagree with it)."""
    labels = [expected for _, expected in checks.cases]
    seeded = checks.constraint.checker is not None
    trusted = [k for k, label in enumerate(labels) if not seeded or case_verdicts[0][k] == label]
    kept = []
    for verdicts, error in list(zip(case_verdicts, errors))[int(seeded):]:
        accuracy = sum(verdicts[k] == labels[k] for k in trusted) / len(trusted) if trusted else 0.0
        kept.append(error is None and accuracy >= min_accuracy)
    return kept


def select_responses(replies: list[str], pass_rates: list[float], chosen_min_pass_rate: float
                     ) -> tuple[list[tuple[str, float]], list[tuple[str, float, str]]]:
    """D: replies passing every checker; P: (chosen, its pass rate, rejected) with chosen >= the minimum, best
    first, and rejected passing none. Blank and repeated replies are dropped, order kept."""
    unique: dict[str, tuple[str, float]] = {}
    for reply, rate in zip(replies, pass_rates, strict=True):
        if reply.strip() and reply.strip() not in unique:
            unique[reply.strip()] = (reply, rate)
    ordered = list(unique.values())
    demonstrations = [(reply, rate) for reply, rate in ordered if rate == 1.0]
    chosen = sorted([(reply, rate) for reply, rate in ordered if rate >= chosen_min_pass_rate], key=lambda c: -c[1])
    rejected = [reply for reply, rate in ordered if rate == 0.0]
    return demonstrations, [(c, rate, r) for (c, rate), r in zip(chosen, rejected)]


def row_constraints(row: dict, seed: int, count: int, kinds: list[str]) -> list[Constraint]:
    """The row's own `meta.constraints`, else `count` drawn from `kinds` by (seed, row id): a resumed run
    draws the same ones, whatever the shard size."""
    if "constraints" in row["meta"]:
        return constraints_from_specs(row["meta"]["constraints"])
    return draw_constraints(random.Random(f"{seed}:{row['id']}"), count, kinds)


@dataclass
class ExecutionRecipe(StageRecipe):
    """code: inputs.tasks (prompts, tests in meta.tests or written by the teacher) -> solutions run with the
    tests in the sandbox, passing to D, passing vs failing to P (data_synthesis.execution).
    instruction_following: inputs.tasks (prompts, constraints in meta.constraints or drawn from the seed
    kinds of reward.constraints) -> responses checked by constraint checkers in the sandbox, those passing
    every checker to D, chosen (pass rate >= chosen_min_pass_rate) vs rejected (pass rate 0) to P. The fields
    after `sandbox` apply to instruction_following only; set under kind code they are refused."""

    generation: GenerationSpec = field(default_factory=GenerationSpec)
    kind: Literal["code", "instruction_following"] = "code"
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)  # code: timeout_s per solution; else per checker
    constraints_per_prompt: int = 2  # drawn per prompt without meta.constraints, from the seed and the row id
    constraint_kinds: list[str] = field(default_factory=list)  # seed kinds to draw from; empty = all
    teacher_checkers: int = 0  # checkers (with test cases) the teacher writes per constraint, AutoIF's way
    checker_min_accuracy: float = 0.8  # a teacher checker's accuracy on the pooled cases to be kept
    min_checkers: int = 3  # distinct kept teacher checkers a free-text constraint ({instruction: ...}) needs
    chosen_min_pass_rate: float = 0.5  # a chosen response passes at least this share of the checkers

    def __post_init__(self) -> None:
        if self.kind == "code":
            defaults = ExecutionRecipe.__dataclass_fields__
            for name in ("constraints_per_prompt", "constraint_kinds", "teacher_checkers", "checker_min_accuracy",
                         "min_checkers", "chosen_min_pass_rate"):
                default = defaults[name].default_factory() if name == "constraint_kinds" else defaults[name].default
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: applies to kind instruction_following only, not code")
            return
        check_choices("constraint_kinds", self.constraint_kinds, SEED_KINDS, "kind", allow_empty=True)
        if self.constraints_per_prompt < 1:
            raise ValueError(f"constraints_per_prompt: must be >= 1, got {self.constraints_per_prompt}")
        draw_constraints(random.Random(0), self.constraints_per_prompt, self.constraint_kinds)  # raises if none go
        if self.teacher_checkers < 0:
            raise ValueError(f"teacher_checkers: must be >= 0, got {self.teacher_checkers}")
        if self.min_checkers < 1:
            raise ValueError(f"min_checkers: must be >= 1, got {self.min_checkers}")
        for name in ("checker_min_accuracy", "chosen_min_pass_rate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be > 0 and <= 1, got {getattr(self, name)}")


class ExecutionStage(GeneratingStage):
    name = "execution"
    recipe_class = ExecutionRecipe
    inputs = {"tasks": "prompt"}
    outputs = ("demonstrations", "preferences", "scores", "suspect_tests")

    def setup(self) -> None:
        if (problem := check_sandbox(self.recipe.sandbox)) is not None:  # refused before the model loads
            raise StageError(f"execution: the code sandbox cannot run here: {problem}")
        super().setup()

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        if self.recipe.kind == "instruction_following":
            return self._process_instructions(rows, ctx)
        return self._process_code(rows, ctx)

    @staticmethod
    def _counted(ctx: ShardContext, jobs: int, started: float) -> None:
        ctx.count("sandbox_executions", jobs)
        ctx.count("sandbox_wall_s", time.monotonic() - started)

    def _process_code(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
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
        jobs = [(i, reply) for i in runnable for reply in replies[i]]
        start = time.monotonic()
        verdicts, batch = run_solutions([(reply, tests[i]) for i, reply in jobs], recipe.sandbox)
        self._counted(ctx, len(jobs), start)
        results = iter(zip(verdicts, batch.results))
        outcomes: list[Outcome] = []
        for i, row in enumerate(rows):
            if tests[i] is None:
                outcomes.append(Quarantined("tests: the task brings none (meta.tests) and the teacher wrote no code "
                                            "block of tests", row))
                continue
            ran = [next(results) for _ in replies[i]]
            judged = judge_solutions(replies[i], [ok for ok, _ in ran], [r.status for _, r in ran])
            outcomes.append(execution_rows(row, tests[i], sources[i], judged, recipe.generation.model, ctx.seed))
        return outcomes

    def _process_instructions(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        recipe = self.recipe
        outcomes: list[Outcome | None] = [None] * len(rows)
        constraints: dict[int, list[Constraint]] = {}
        for i, row in enumerate(rows):
            try:
                constraints[i] = row_constraints(row, recipe.seed, recipe.constraints_per_prompt,
                                                 recipe.constraint_kinds)
            except ConstraintError as e:
                outcomes[i] = Quarantined(str(e), row)
        asks = [(i, j) for i in constraints for j in range(len(constraints[i]))]
        written: dict[tuple[int, int], list[str]] = {}
        if recipe.teacher_checkers and asks:
            prompts = [[{"role": "user", "content": CHECKERS_PROMPT.format(
                constraint=constraints[i][j].description)}] for i, j in asks]
            for key, completions in zip(asks, self.sample_prompts(prompts, ctx, n=recipe.teacher_checkers)):
                written[key] = [c.text for c in completions]
        checks = {i: [constraint_checks(c, written.get((i, j), [])) for j, c in enumerate(cs)]
                  for i, cs in constraints.items()}
        prompts = {i: constrained_prompt(rows[i], constraints[i]) for i in constraints}
        sampled = self.sample_prompts(list(prompts.values()), ctx) if prompts else []
        replies = {i: [c.text for c in completions] for i, completions in zip(prompts, sampled)}
        jobs = [([code for check in checks[i] for code in check.checkers],
                 replies[i] + [text for check in checks[i] for text, _ in check.cases]) for i in constraints]
        start = time.monotonic()
        verdicts, _ = run_checkers(jobs, recipe.sandbox)
        self._counted(ctx, len(jobs), start)
        for i, judged in zip(constraints, verdicts):
            outcomes[i] = self._instruction_rows(rows[i], prompts[i], checks[i], replies[i], judged, ctx.seed)
        return outcomes

    def _instruction_rows(self, row: dict, prompt: list[dict], checks: list[ConstraintChecks], replies: list[str],
                          judged: CheckerVerdicts, seed: int) -> Outcome:
        """Cross-validate the teacher's checkers on the cases, then score the replies with the kept checkers."""
        recipe, n = self.recipe, len(replies)
        kept_rows: list[list[list[bool]]] = []  # per constraint, per kept checker: its verdicts on the replies
        summaries = []
        checker_row, case_column = 0, n
        for j, check in enumerate(checks):
            rows_of = range(checker_row, checker_row + len(check.checkers))
            cases = slice(case_column, case_column + len(check.cases))
            keep = cross_validate(check, [judged.verdicts[r][cases] for r in rows_of],
                                  [judged.errors[r] for r in rows_of], recipe.checker_min_accuracy)
            keep = [True] * (len(check.checkers) - len(check.teacher)) + keep
            kept_rows.append([judged.verdicts[r][:n] for r, k in zip(rows_of, keep) if k])
            teacher_kept = sum(keep) - (check.constraint.checker is not None)
            if check.constraint.checker is None and teacher_kept < recipe.min_checkers:
                return Quarantined(f"meta.constraints[{j}]: {TOO_FEW_CHECKERS}: {teacher_kept} distinct teacher "
                                   f"checkers passed cross-validation, min_checkers is {recipe.min_checkers} "
                                   f"({check.written} written, teacher_checkers {recipe.teacher_checkers})", row)
            summaries.append({"kind": check.constraint.kind, "params": check.constraint.params,
                              "checkers": sum(keep), "teacher_written": check.written,
                              "teacher_distinct": len(check.teacher), "teacher_kept": teacher_kept,
                              "cases": len(check.cases)})
            checker_row, case_column = rows_of.stop, cases.stop
        all_kept = [verdicts for per_constraint in kept_rows for verdicts in per_constraint]
        pass_rates = [sum(v[r] for v in all_kept) / len(all_kept) for r in range(n)]
        for summary, per_constraint in zip(summaries, kept_rows):
            summary["followed"] = sum(all(v[r] for v in per_constraint) for r in range(n))
        listed = [{"kind": c.constraint.kind, **c.constraint.params} for c in checks]
        model = recipe.generation.model
        meta = lambda **extra: row["meta"] | lineage("execution", model, seed, row["id"],  # noqa: E731
                                                     kind="instruction_following", constraints=listed, **extra)
        demonstrations, pairs = select_responses(replies, pass_rates, recipe.chosen_min_pass_rate)
        score = {"id": row["id"], "constraints": summaries, "samples": n, "pass_rates": pass_rates,
                 "followed_all": sum(rate == 1.0 for rate in pass_rates), "status": judged.status}
        return {"demonstrations": [demonstration_row(f"{row['id']}-c{k}", prompt, reply, meta(pass_rate=rate))
                                   for k, (reply, rate) in enumerate(demonstrations)],
                "preferences": [preference_row(f"{row['id']}-p{k}", prompt, chosen, rejected,
                                               meta(chosen_pass_rate=rate, rejected_pass_rate=0.0))
                                for k, (chosen, rate, rejected) in enumerate(pairs)],
                "scores": [score], "suspect_tests": []}

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        scores = outputs["scores"]
        samples = sum(s["samples"] for s in scores)
        # this invocation only (a resumed run counts the shards it ran), summed over the workers
        executions, wall = self.counts["sandbox_executions"], self.counts["sandbox_wall_s"]
        sandbox = {"sandbox_executions": executions, "sandbox_executions_per_s": executions / wall if wall > 0 else 0.0}
        if self.recipe.kind == "instruction_following":
            return {"execution": self._instruction_summary(scores, samples) | sandbox}
        return {"execution": {"kind": self.recipe.kind, "tasks": len(scores), "solutions_run": samples,
                              "pass_rate": sum(s["passed"] for s in scores) / samples if samples else 0.0,
                              "mean_pass@1": mean(s["pass@1"] for s in scores) if scores else 0.0,
                              "pass@k": mean(s["pass@k"] for s in scores) if scores else 0.0,
                              "k": self.recipe.generation.n,
                              "tests_from_model": sum(s["tests"] == "model" for s in scores),
                              "suspect_tests": len(outputs["suspect_tests"])} | sandbox}

    def _instruction_summary(self, scores: list[dict], samples: int) -> dict[str, Any]:
        """Counts and rates from the score rows and the quarantine file, so a resumed run reports the whole run."""
        by_kind: dict[str, list[int]] = {}
        for score in scores:
            for c in score["constraints"]:
                followed_checked = by_kind.setdefault(c["kind"], [0, 0])
                followed_checked[0] += c["followed"]
                followed_checked[1] += score["samples"]
        constraints = [c for s in scores for c in s["constraints"]]
        quarantine = load_jsonl(Path(self.recipe.run_dir) / "quarantine.jsonl")
        return {"kind": self.recipe.kind, "instructions": len(scores), "responses_checked": samples,
                "k": self.recipe.generation.n,
                "following_all_rate": sum(s["followed_all"] for s in scores) / samples if samples else 0.0,
                "mean_pass_rate": sum(sum(s["pass_rates"]) for s in scores) / samples if samples else 0.0,
                "pass_rate_by_kind": {kind: followed / checked if checked else 0.0
                                      for kind, (followed, checked) in sorted(by_kind.items())},
                "constraints": len(constraints),
                "teacher_checkers_written": sum(c["teacher_written"] for c in constraints),
                "teacher_checkers_kept": sum(c["teacher_kept"] for c in constraints),
                "dropped_too_few_checkers": sum(q["stage"] == self.name and TOO_FEW_CHECKERS in q["reason"]
                                                for q in quarantine)}
