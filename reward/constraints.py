"""Checkable instruction constraints (IFEval's kinds) and the sandbox job that checks responses against them.

Execution feedback for instruction following (the Qwen2 report, done in AutoIF's manner) needs, for every
constraint appended to an instruction, Python checkers `evaluate(response: str) -> bool`. The seed kinds here
give one trusted checker each, as SOURCE TEXT with the drawn parameters baked in as literals, so seed
checkers and model-written ones take the same path: `checker_program`, one sandbox job per instruction that
runs every checker on every text and prints a verdict matrix after an unguessable marker. Each checker runs
in a forked child with its output sent to /dev/null and its own time limit, so a checker that prints, loops
or crashes loses only its own verdicts.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .sandbox import BatchResult, Program, SandboxResult, SandboxSpec, run_many

Validator = Callable[[object], str | None]  # a problem with a parameter's value, None when it is fine
RELATIONS = ("at least", "at most")
KEYWORDS = ("river", "lantern", "garden", "silver", "morning", "window", "harbor", "journey", "pencil", "orange")
FORBIDDEN = ("very", "really", "basically", "actually", "stuff", "thing", "nice", "literally")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all for now.")
JOB_OVERHEAD_S = 5.0  # interpreter start and forks, on top of the checkers' own limits


class ConstraintError(ValueError):
    """A bad constraint spec; the message is one line naming the field."""


def _int(lo: int, hi: int) -> Validator:
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi \
        else f"expected an int from {lo} to {hi}"


def _choice(*options: str) -> Validator:
    return lambda v: None if v in options else f"expected one of {list(options)}"


def _line(v: object) -> str | None:
    return None if isinstance(v, str) and v.strip() and "\n" not in v else "expected a non-empty one-line string"


def _words(v: object) -> str | None:
    ok = isinstance(v, list) and 0 < len(v) <= 5 and all(isinstance(w, str) and re.fullmatch(r"\w+", w) for w in v)
    return None if ok else "expected a list of 1 to 5 words (letters, digits, _)"


def _letter(v: object) -> str | None:
    return None if isinstance(v, str) and re.fullmatch(r"[a-z]", v) else "expected one lowercase letter a-z"


@dataclass(frozen=True)
class ConstraintKind:
    """One seed kind: its parameters (name -> validator), how to draw them, the sentence appended to the
    instruction, the body of its `evaluate` (the parameters are local names), and its test cases."""

    id: str
    params: dict[str, Validator]
    draw: Callable[[random.Random], dict]
    describe: Callable[[dict], str]
    body: str
    cases: Callable[[dict], list[tuple[str, bool]]]


@dataclass(frozen=True)
class Constraint:
    """A constraint on one instruction. `checker` is Python source defining `evaluate`; a free-text constraint
    (kind "instruction") has none and cases none: only checkers the teacher writes can check it."""

    kind: str
    params: dict
    description: str
    checker: str | None
    cases: list[tuple[str, bool]]


def _relation_cases(unit: Callable[[int], str], p: dict, count: str) -> list[tuple[str, bool]]:
    """Texts with exactly n-1, n and n+1 units, labelled by the relation."""
    n, at_least = p[count], p["relation"] == "at least"
    return [(unit(n), True), (unit(n + 1), at_least), (unit(n - 1), not at_least)]


def _sentences(n: int) -> str:
    return " ".join(f"Pi is about 3.14 and this is sentence {i}!" if i % 2 else f"Sentence {i} ends here."
                    for i in range(n))


def _kinds() -> list[ConstraintKind]:
    return [
        ConstraintKind(
            "include_keywords", {"keywords": _words},
            lambda r: {"keywords": r.sample(KEYWORDS, r.randint(1, 3))},
            lambda p: f"Include the keywords {', '.join(repr(k) for k in p['keywords'])} in the response.",
            """
            import re
            return all(re.search(r"\\b" + re.escape(k) + r"\\b", response, re.IGNORECASE) for k in keywords)
            """,
            lambda p: [(" and ".join(k.upper() for k in p["keywords"]) + ".", True),
                       (" ".join(p["keywords"][:-1]) + f" un{p['keywords'][-1]}ly", False), ("", False)]),
        ConstraintKind(
            "forbidden_words", {"forbidden_words": _words},
            lambda r: {"forbidden_words": r.sample(FORBIDDEN, r.randint(1, 3))},
            lambda p: f"Do not include the words {', '.join(repr(w) for w in p['forbidden_words'])} in the response.",
            """
            import re
            return not any(re.search(r"\\b" + re.escape(w) + r"\\b", response, re.IGNORECASE)
                           for w in forbidden_words)
            """,
            lambda p: [("A plain answer.", True), (f"It is {p['forbidden_words'][-1].capitalize()} so.", False),
                       (f"un{p['forbidden_words'][0]}ly and {p['forbidden_words'][0]}s", True), ("", True)]),
        ConstraintKind(
            "letter_frequency", {"letter": _letter, "relation": _choice(*RELATIONS), "let_frequency": _int(1, 50)},
            lambda r: {"letter": r.choice("abdegilmnoprstu"), "relation": r.choice(RELATIONS),
                       "let_frequency": r.randint(2, 12)},
            lambda p: f'In your response, the letter "{p["letter"]}" should appear {p["relation"]} '
                      f'{p["let_frequency"]} times.',
            """
            count = response.lower().count(letter)
            return count >= let_frequency if relation == "at least" else count <= let_frequency
            """,
            lambda p: _relation_cases(lambda k: " ".join([p["letter"].upper()] * k) + " zz", p, "let_frequency")),
        ConstraintKind(
            "number_words", {"relation": _choice(*RELATIONS), "num_words": _int(1, 2000)},
            lambda r: {"relation": r.choice(RELATIONS), "num_words": r.choice([5, 10, 20, 50, 100, 200])},
            lambda p: f"Answer with {p['relation']} {p['num_words']} words.",
            """
            import re
            count = len(re.findall(r"\\w+", response))
            return count >= num_words if relation == "at least" else count <= num_words
            """,
            lambda p: _relation_cases(lambda k: " - ".join(["word"] * k) + " !!", p, "num_words")),
        ConstraintKind(
            "number_sentences", {"relation": _choice(*RELATIONS), "num_sentences": _int(1, 100)},
            lambda r: {"relation": r.choice(RELATIONS), "num_sentences": r.randint(1, 6)},
            lambda p: f"Your response should contain {p['relation']} {p['num_sentences']} sentences.",
            """
            import re
            count = len([s for s in re.split(r"[.!?]+(?=\\s|$)", response) if s.strip()])
            return count >= num_sentences if relation == "at least" else count <= num_sentences
            """,
            lambda p: _relation_cases(_sentences, p, "num_sentences")),
        ConstraintKind(
            "number_paragraphs", {"num_paragraphs": _int(1, 20)},
            lambda r: {"num_paragraphs": r.randint(1, 5)},
            lambda p: f"There should be exactly {p['num_paragraphs']} paragraphs. Paragraphs are separated from "
                      "each other by the markdown divider: ***",
            """
            parts = [part.strip() for part in response.split("***")]
            parts = parts[1:] if parts and not parts[0] else parts
            parts = parts[:-1] if parts and not parts[-1] else parts
            return len(parts) == num_paragraphs and all(parts)
            """,
            lambda p: [("\n***\n".join(f"Paragraph {i}." for i in range(p["num_paragraphs"])), True),
                       ("***\n" + " *** ".join(f"P{i}" for i in range(p["num_paragraphs"])) + "\n***", True),
                       ("\n***\n".join(f"Paragraph {i}." for i in range(p["num_paragraphs"] + 1)), False),
                       ("\n\n".join(f"Paragraph {i}." for i in range(p["num_paragraphs"])), p["num_paragraphs"] == 1),
                       ("\n***\n".join(["One."] + [""] * (p["num_paragraphs"] - 1) + ["Two."]), False)]),
        ConstraintKind(
            "number_bullets", {"num_bullets": _int(1, 20)},
            lambda r: {"num_bullets": r.randint(1, 5)},
            lambda p: f"Your answer must contain exactly {p['num_bullets']} bullet points. Use the markdown bullet "
                      "points such as:\n* This is point 1.\n* This is point 2",
            """
            import re
            return len(re.findall(r"^[ \\t]*[*-][ \\t]+\\S", response, re.MULTILINE)) == num_bullets
            """,
            lambda p: [("Intro:\n" + "\n".join(f"* point {i}" for i in range(p["num_bullets"])), True),
                       ("\n".join(f"  - point {i}" for i in range(p["num_bullets"])) + "\n***\n**bold** end", True),
                       ("\n".join(f"* point {i}" for i in range(p["num_bullets"] + 1)), False),
                       ("Points: * one * two", False)]),
        ConstraintKind(
            "number_highlighted_sections", {"num_highlights": _int(1, 20)},
            lambda r: {"num_highlights": r.randint(1, 4)},
            lambda p: f"Highlight at least {p['num_highlights']} sections in your answer with markdown, "
                      "i.e. *highlighted section*.",
            """
            import re
            return len([h for h in re.findall(r"\\*([^\\n*]+)\\*", response) if h.strip()]) >= num_highlights
            """,
            lambda p: [(" ".join(f"*part {i}*" for i in range(p["num_highlights"])), True),
                       (" ".join(f"*part {i}*" for i in range(p["num_highlights"] - 1)) + " * * *", False),
                       (" ".join(f"*part {i}*" for i in range(p["num_highlights"] - 1)) + " *\nx*", False)]),
        ConstraintKind(
            "title", {}, lambda r: {},
            lambda p: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
            """
            import re
            return any(t.strip() for t in re.findall(r"<<([^\\n]+?)>>", response))
            """,
            lambda p: [("<<A Title>>\nText.", True), ("Text <<x>> inside.", True), ("<<  >> text", False),
                       ("<A Title>", False), ("<<unclosed\n>>", False)]),
        ConstraintKind(
            "lowercase", {}, lambda r: {},
            lambda p: "Your entire response should be in English, and in all lowercase letters. "
                      "No capital letters are allowed.",
            "return response.islower()\n",
            lambda p: [("all lowercase, 42 times.", True), ("Not all lowercase.", False), ("123 !", False),
                       ("", False)]),
        ConstraintKind(
            "capitals", {}, lambda r: {},
            lambda p: "Your entire response should be in English, and in all capital letters.",
            "return response.isupper()\n",
            lambda p: [("ALL CAPITALS, 42 TIMES.", True), ("ALL BUT one", False), ("123 !", False)]),
        ConstraintKind(
            "no_commas", {}, lambda r: {},
            lambda p: "In your entire response, refrain from the use of any commas.",
            'return "," not in response and "\\uff0c" not in response\n',
            lambda p: [("No commas here.", True), ("One, two.", False), ("\u4e2d\u6587\uff0c\u9017\u53f7", False),
                       ("", True)]),
        ConstraintKind(
            "end_phrase", {"end_phrase": _line},
            lambda r: {"end_phrase": r.choice(END_PHRASES)},
            lambda p: f'Finish your response with this exact phrase "{p["end_phrase"]}". '
                      "No other words should follow this phrase.",
            "return response.rstrip().endswith(end_phrase)\n",
            lambda p: [(f"Sure. {p['end_phrase']}\n", True), (f"{p['end_phrase']} Bye.", False),
                       (f"Sure. {p['end_phrase'].lower()}", p["end_phrase"] == p["end_phrase"].lower()),
                       (p["end_phrase"][:-1], False)]),
        ConstraintKind(
            "quotation", {}, lambda r: {},
            lambda p: "Wrap your entire response with double quotation marks.",
            """
            text = response.strip()
            return len(text) > 1 and text[0] == '"' and text[-1] == '"'
            """,
            lambda p: [('"Quoted."', True), (' \n"Quoted."\n', True), ('"Half quoted.', False), ('"', False),
                       ("'Single.'", False)]),
        ConstraintKind(
            "json_format", {}, lambda r: {},
            lambda p: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
            """
            import json
            import re
            text = response.strip()
            fenced = re.fullmatch(r"```(?:json|JSON)?[ \\t]*\\n?(.*?)\\n?[ \\t]*```", text, re.DOTALL)
            try:
                value = json.loads(fenced.group(1) if fenced else text)
            except (ValueError, RecursionError):
                return False
            return isinstance(value, (dict, list))
            """,
            lambda p: [('{"a": 1}', True), ('```json\n{"a": [1, 2]}\n```', True), ("[1, 2]", True),
                       ("{'a': 1}", False), ('Here: {"a": 1}', False), ('"just a string"', False)]),
        ConstraintKind(
            "postscript", {}, lambda r: {},
            lambda p: "At the end of your response, please explicitly add a postscript starting with P.S.",
            """
            import re
            return re.search(r"^[ \\t]*P\\.[ \\t]?S\\.", response, re.MULTILINE | re.IGNORECASE) is not None
            """,
            lambda p: [("Hi.\n\nP.S. Bye.", True), ("hi.\np.s. bye.", True), ("Hi. P.S. inline", False),
                       ("Hi.\nPS bye", False)]),
        ConstraintKind(
            "number_placeholders", {"num_placeholders": _int(1, 20)},
            lambda r: {"num_placeholders": r.randint(1, 4)},
            lambda p: f"The response must contain at least {p['num_placeholders']} placeholders represented by "
                      "square brackets, such as [address].",
            """
            import re
            return len(re.findall(r"\\[[^\\[\\]\\n]+\\]", response)) >= num_placeholders
            """,
            lambda p: [(" ".join(f"[name {i}]" for i in range(p["num_placeholders"])), True),
                       (" ".join(f"[name {i}]" for i in range(p["num_placeholders"] - 1)) + " [] [\n]", False)]),
    ]


SEED_KINDS: dict[str, ConstraintKind] = {kind.id: kind for kind in _kinds()}
# pairs no response can satisfy together (or only absurdly): never drawn together, refused in specs
CONFLICTS = {frozenset(pair) for pair in [
    ("lowercase", "capitals"), ("end_phrase", "lowercase"), ("end_phrase", "capitals"), ("end_phrase", "quotation"),
    ("end_phrase", "json_format"), ("json_format", "title"), ("json_format", "number_bullets"),
    ("json_format", "number_paragraphs"), ("json_format", "number_highlighted_sections"),
    ("json_format", "postscript"), ("json_format", "quotation"),
]}


def checker_source(kind: ConstraintKind, params: dict) -> str:
    """`evaluate` for one kind with its parameters as literals: self-contained source for the sandbox."""
    header = "def evaluate(response: str) -> bool:\n" + "".join(f"    {name} = {params[name]!r}\n"
                                                                for name in kind.params)
    return header + textwrap.indent(textwrap.dedent(kind.body).strip("\n") + "\n", "    ")


def make_constraint(kind_id: str, params: dict) -> Constraint:
    kind = SEED_KINDS[kind_id]
    return Constraint(kind_id, params, kind.describe(params), checker_source(kind, params), kind.cases(params))


def compatible(kinds: tuple[str, ...] | list[str]) -> bool:
    return not any(frozenset(pair) in CONFLICTS for pair in itertools.combinations(kinds, 2))


@functools.lru_cache(maxsize=64)
def _compatible_sets(kinds: tuple[str, ...], count: int) -> list[tuple[str, ...]]:
    return [combo for combo in itertools.combinations(kinds, count) if compatible(combo)]


def draw_constraints(rng: random.Random, count: int, kinds: list[str] | None = None) -> list[Constraint]:
    """`count` constraints of distinct, non-conflicting kinds from `kinds` (None or empty: all seed kinds),
    parameters drawn from `rng`: the same rng state gives the same constraints."""
    pool = tuple(sorted(kinds or SEED_KINDS))
    choices = _compatible_sets(pool, count)
    if not choices:
        raise ValueError(f"constraints_per_prompt: no {count} kinds of {list(pool)} go together without conflicts")
    chosen = list(rng.choice(choices))
    rng.shuffle(chosen)
    return [make_constraint(k, SEED_KINDS[k].draw(rng)) for k in chosen]


def constraint_from_spec(spec: object, where: str = "constraint") -> Constraint:
    """A constraint from a row's spec: `{"kind": "no_commas"}`, `{"kind": "number_words", "relation": "at least",
    "num_words": 50}`, or free text `{"instruction": "..."}`; a bad spec raises ConstraintError naming the field."""
    if not isinstance(spec, dict):
        raise ConstraintError(f"{where}: expected a mapping with a kind (or an instruction), got {spec!r}")
    if "instruction" in spec:
        text = spec["instruction"]
        if set(spec) != {"instruction"} or not isinstance(text, str) or not text.strip():
            raise ConstraintError(f"{where}.instruction: expected a non-empty string and no other keys, got {spec!r}")
        return Constraint("instruction", {"instruction": text.strip()}, text.strip(), None, [])
    kind_id = spec.get("kind")
    if kind_id not in SEED_KINDS:
        raise ConstraintError(f"{where}.kind: unknown kind {kind_id!r} (known: {', '.join(SEED_KINDS)}; "
                              "or give {instruction: ...})")
    kind = SEED_KINDS[kind_id]
    for name in spec:
        if name != "kind" and name not in kind.params:
            raise ConstraintError(f"{where}.{name}: not a parameter of {kind_id} (it has: "
                                  f"{', '.join(kind.params) or 'none'})")
    for name, validate in kind.params.items():
        if name not in spec:
            raise ConstraintError(f"{where}.{name}: required parameter of {kind_id} is missing")
        if (problem := validate(spec[name])) is not None:
            raise ConstraintError(f"{where}.{name}: {problem}, got {spec[name]!r}")
    return make_constraint(kind_id, {name: spec[name] for name in kind.params})


def constraints_from_specs(specs: object, where: str = "meta.constraints") -> list[Constraint]:
    """A row's constraint list: non-empty, each spec valid, no kind twice, no conflicting kinds."""
    if not isinstance(specs, list) or not specs:
        raise ConstraintError(f"{where}: expected a non-empty list of constraints, got {specs!r}")
    constraints = [constraint_from_spec(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]
    kinds = [c.kind for c in constraints if c.kind != "instruction"]
    for i, kind in enumerate(kinds):
        if kind in kinds[:i]:
            raise ConstraintError(f"{where}: kind {kind!r} is listed twice")
    for a, b in itertools.combinations(kinds, 2):
        if frozenset((a, b)) in CONFLICTS:
            raise ConstraintError(f"{where}: kinds {a!r} and {b!r} conflict")
    return constraints


_CHECKING_MAIN = r'''
import json, os, select, signal, sys, time

marker = sys.stdin.readline().rstrip("\n")
os.close(0)  # the sandbox has no /proc: no checker can reach this process's stdin or stdout through it
job = json.load(open("job.json"))
inputs, limit = job["inputs"], job["checker_timeout_s"]


def judge(source):
    try:
        namespace = {"__name__": "checker"}
        exec(compile(source, "checker.py", "exec"), namespace)
        evaluate = namespace["evaluate"]
    except BaseException as e:
        return [False] * len(inputs), f"no evaluate: {type(e).__name__}: {e}"
    verdicts, error = [], None
    for text in inputs:
        try:
            result = evaluate(text)
        except BaseException as e:
            result, error = False, error or f"{type(e).__name__}: {e}"
        if not isinstance(result, bool):
            error = error or f"returned {type(result).__name__}, not bool"
        verdicts.append(result is True)
    return verdicts, error


matrix, errors = [], []
for source in job["checkers"]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            out = json.dumps(judge(source))
        except BaseException as e:
            out = json.dumps([[False] * len(inputs), f"{type(e).__name__}"])
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(out)
        os._exit(0)
    os.close(write_end)
    chunks, deadline, timed_out = [], time.monotonic() + limit, False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    try:
        verdicts, error = json.loads(b"".join(chunks))
        assert len(verdicts) == len(inputs) and all(isinstance(v, bool) for v in verdicts)
    except Exception:
        verdicts = [False] * len(inputs)
        error = f"timed out after {limit} s" if timed_out else f"the checker's process died (wait status {status})"
    matrix.append(verdicts)
    errors.append(error)
sys.stdout.write("\n" + marker + json.dumps({"verdicts": matrix, "errors": errors}) + "\n")
'''


def checker_program(checkers: list[str], inputs: list[str], marker: str, checker_timeout_s: float) -> Program:
    """One sandbox job: every checker (exec'd in a fresh namespace, in its own forked process, stdout and
    stderr discarded, `checker_timeout_s` wall each) on every input text; inputs travel as a JSON file, the
    marker on stdin (closed before any checker runs), never in the code."""
    job = {"checkers": checkers, "inputs": inputs, "checker_timeout_s": checker_timeout_s}
    return Program(_CHECKING_MAIN, stdin=marker + "\n", files={"job.json": json.dumps(job)})


@dataclass(frozen=True)
class CheckerVerdicts:
    """verdicts[checker][input]; an exception, a non-bool result or a timeout counts as False, with its
    error kept; `status` is the job's ("ok", or how it died: then every verdict is False)."""

    verdicts: list[list[bool]]
    errors: list[str | None]
    status: str


def parse_verdicts(result: SandboxResult, marker: str, checkers: int, inputs: int) -> CheckerVerdicts:
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(marker):
            try:
                parsed = json.loads(line[len(marker):])
                verdicts, errors = parsed["verdicts"], parsed["errors"]
            except (ValueError, KeyError, TypeError):
                break
            if len(verdicts) == checkers == len(errors) and all(len(row) == inputs for row in verdicts):
                return CheckerVerdicts([[v is True for v in row] for row in verdicts], errors, result.status)
            break
    status = result.status if result.status != "ok" else "no_verdict"
    return CheckerVerdicts([[False] * inputs for _ in range(checkers)], [f"job {status}"] * checkers, status)


def run_checkers(jobs: list[tuple[list[str], list[str]]], sandbox: SandboxSpec
                 ) -> tuple[list[CheckerVerdicts], BatchResult]:
    """Run (checkers, inputs) jobs in the sandbox, `sandbox.workers` at a time, each checker under
    `sandbox.timeout_s`; verdicts in job order."""
    marker = f"verdicts-{uuid.uuid4().hex}:"
    longest = max((len(checkers) for checkers, _ in jobs), default=0)
    batch = run_many([checker_program(checkers, inputs, marker, sandbox.timeout_s) for checkers, inputs in jobs],
                     workers=sandbox.workers, timeout_s=sandbox.timeout_s * longest + JOB_OVERHEAD_S,
                     memory_mb=sandbox.memory_mb, accept_weaker=sandbox.accept_weaker)
    return [parse_verdicts(result, marker, len(checkers), len(inputs))
            for result, (checkers, inputs) in zip(batch.results, jobs)], batch


def constrained_prompt(row: dict, constraints: list[Constraint]) -> list[dict]:
    """The row's messages with the constraints' descriptions appended to the last user turn."""
    last = row["messages"][-1]
    text = last["content"] + "\n\n" + " ".join(c.description for c in constraints)
    return row["messages"][:-1] + [last | {"content": text}]
