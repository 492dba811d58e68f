"""`eval`: held-out metrics of several chat models side by side, in one run.

Every model of `models` (a checkpoint directory with its tokenizer, or a Hub id) answers the prompt files of
`inputs` with the recipe's `generation` backend (one greedy reply per prompt), and every reply is scored:

- arithmetic: the user turn is exactly `What is {a} + {b}?` (a contract kept stable for anyone scoring a demo
  model, checked on every row) and a reply is correct when the LAST number it contains equals `meta.answer`
  (else a + b) as mathematics (`reward.verifiers.math_equal`: "7", "7.0" and "7.00" all count);
- code: pass@1. The reply's code (`reward.code.extract_code`) runs with the row's `meta.tests` in the sandbox
  (`reward.sandbox`, never in this process), exactly as the `execution` stage runs solutions;
- constraints: the row's `meta.constraints` (seed kinds of `reward.constraints`) are appended to the user
  turn as `execution` does, and their trusted checkers judge the reply in the sandbox. The rate is the share
  of replies that follow every constraint; `constraint_rate/<kind>` the share that follow that kind;
- principles: the prompt as it is (no principle in it), the reply judged by the rule of the row's `meta.principle`
  in `constitution` (`Principle.followed_by`: it contains one of the principle's `follow_markers`, a coarse check);
- reward: the mean score of every reply above under the reward model (`alignment.reward_model.RewardModel`);
- perplexity on base text (`{id, text}` rows), the alignment tax: exp(sum of token NLL / predicted tokens),
  each text's tokens truncated to `perplexity.max_length`, its first token not predicted (Qwen2 has no BOS).
  Log-probabilities come from our chunked LM head in float32 and are summed in float64; padded batches give
  one-by-one's value (tested);
- passkey: retrieval of a 5-digit pass key hidden at a random depth in filler text (the prompts of
  benchmarks/passkey.py, as a chat turn) at 1x and `multiple`x the model's trained length L0 as saved, and at
  `multiple`x with Dual Chunk Attention + YaRN switched on for the run (`enable_long_context`). A chat
  checkpoint is not trained to retrieve pass keys: the 1x row is the control, and when it is near 0 the
  long-context rows say nothing about DCA (true of the tiny demo models). So it is optional (`passkey: null`);
  L0 is `passkey.trained_length` or what config.json records (32,768 for every preset, too long for a CPU);
- lm_eval: tasks of EleutherAI's lm-evaluation-harness, only where `lm_eval` is installed (not a dependency).

A finished (model, task) is written atomically to `results/<model>/<task>.json` after its samples
(`samples/<model>/<task>.jsonl`: prompt, reply and verdict per row), so a killed run resumes without redoing
finished ones; `metrics.json`, `metrics.png` and, last, `manifest.json` end the run, and a rerun of a
finished run is a no-op. The fingerprint includes each local model's weights file, so a retrained model is
a different run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from alignment.atomic import atomic_write_text
from alignment.checkpoint import causal_lm_class, load_causal_lm
from alignment.data import DataError, DataInput, load_jsonl, read_rows, to_jsonl
from alignment.generation import GenerationSpec, TransformersGenerator, make_generator
from alignment.model.dca import trained_length_of
from alignment.reward_model import RewardModel
from alignment.stages import Run, Stage, StageError
from alignment.tokenizer import load_tokenizer
from data_synthesis.constitution import DEFAULT_CONSTITUTION, Principle, load_constitution
from reward.code import run_solutions, task_tests
from reward.constraints import ConstraintError, constrained_prompt, constraints_from_specs, run_checkers
from reward.sandbox import SandboxSpec, check_sandbox
from reward.verifiers import math_equal

# Task input name -> row kind; the first four are answered by the models, base_text is read.
TASKS = {"arithmetic": "prompt", "code": "prompt", "constraints": "prompt", "principles": "prompt",
         "base_text": "text"}
GENERATED = ("arithmetic", "code", "constraints", "principles")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The numbers of a reply: thousands separators only in groups of three, so "3,4,7" reads as 3, 4 and 7.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
# The pass-key text of benchmarks/passkey.py, the question phrased for a chat turn.
PASSKEY_INTRO = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_KEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key?"


@dataclass
class EvalModel:
    name: str  # the label in metrics.json and the plot; also a directory name
    path: str  # checkpoint directory (with its tokenizer) or Hub id

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name: letters, digits, ., - or _ (it names directories), got {self.name!r}")
        if not self.path:
            raise ValueError("path: name a checkpoint directory or Hub id")


@dataclass
class RewardSpec:
    path: str  # a reward-model checkpoint (an `rm` run)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 16


@dataclass
class PerplexitySpec:
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 8  # texts per forward pass, padded on the right
    max_length: int = 2048  # tokens kept per text

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"batch_size: must be >= 1 and max_length >= 2, got {self.batch_size}, {self.max_length}")


@dataclass
class PasskeySpec:
    """Pass-key retrieval at `multiple` x L0 with and without DCA + YaRN (see the module docstring)."""

    trained_length: int | None = None  # L0; None = the original length config.json records
    multiple: int = 4
    trials: int = 4  # prompts per length
    chunk_size: int | None = None  # DCA chunk C; None = L0
    local_size: int | None = None  # DCA local window; None = L0 // 4
    yarn_factor: float | None = None  # None = multiple
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.multiple < 2:
            raise ValueError(f"multiple: must be >= 2 (lengths beyond the trained one), got {self.multiple}")
        if self.trials < 1:
            raise ValueError(f"trials: must be >= 1, got {self.trials}")


@dataclass
class LmEvalSpec:
    """lm-evaluation-harness tasks, run with `lm_eval.simple_evaluate` on the recipe's backend."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # examples per task; None = all
    num_fewshot: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: list the lm-eval tasks (tasks: [gsm8k, ifeval])")


@dataclass
class EvalRecipe:
    """inputs.{arithmetic, code, constraints, principles} (prompt rows), inputs.base_text (text rows) -> metrics per
    model."""

    stage: str
    run_dir: str
    models: list[EvalModel] = field(default_factory=list)
    inputs: dict[str, DataInput] = field(default_factory=dict)
    seed: int = 0
    generation: GenerationSpec = field(default_factory=lambda: GenerationSpec(temperature=0.0))  # model: unused
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    reward_model: RewardSpec | None = None
    constitution: str = ""  # the principles task's rules (follow_markers); "" = recipes/constitution/default.yaml
    perplexity: PerplexitySpec = field(default_factory=PerplexitySpec)
    passkey: PasskeySpec | None = None
    lm_eval: LmEvalSpec | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: list the models to compare ({name: sft, path: runs/tiny/sft}, ...)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: a name is listed twice")
        unknown = [n for n in self.inputs if n not in TASKS]
        if unknown:
            raise ValueError(f"inputs: unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
        if not self.inputs and self.passkey is None and self.lm_eval is None:
            raise ValueError(f"inputs: nothing to evaluate; give one of {', '.join(TASKS)}, passkey or lm_eval")
        if self.generation.model:
            raise ValueError("generation: model: the models come from `models`; leave it out")
        if self.generation.temperature != 0:
            raise ValueError(f"generation: temperature: must be 0 (greedy, so scores do not depend on sampling "
                             f"luck), got {self.generation.temperature}")
        if self.generation.n != 1:
            raise ValueError(f"generation: n: must be 1 (one reply per prompt: accuracy, pass@1), "
                             f"got {self.generation.n}")
        if self.generation.backend == "openai":
            raise ValueError("generation: backend: eval loads each model itself: transformers or vllm")
        if self.reward_model is not None and not any(t in self.inputs for t in GENERATED):
            raise ValueError(f"reward_model: scores the replies to {', '.join(GENERATED)}; give one of those inputs")
        self.constitution_path = self.constitution or str(DEFAULT_CONSTITUTION)
        if "principles" in self.inputs and not any(p.follow_markers for p in load_constitution(self.constitution_path)):
            raise ValueError(f"constitution: {self.constitution_path} has no principle with follow_markers, "
                             "so no rule scores inputs.principles")


def models_override(specs: list[str]) -> str:
    """`--model PATH` / `--model NAME=PATH` (repeatable) as the `--set models=[...]` they mean; a bare PATH is
    named after its last component (runs/tiny/sft -> sft)."""
    models = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:
            name, path = Path(spec.rstrip("/")).name, spec
        models.append({"name": name, "path": path})
    return "models=" + json.dumps(models)


# ---- the tasks: rows checked before any model loads ------------------------------------------------------


@dataclass
class Task:
    """A task's rows and, for the answered ones, each row's prompt and what scores its reply."""

    name: str
    rows: list[dict]
    prompts: list[list[dict]] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)  # answer / tests / constraints / principle, per row


def _row_error(task: str, source: Any, row: dict, message: str) -> StageError:
    return StageError(f"eval: inputs.{task}: {source}: row {row['id']!r}: {message}")


def read_task(name: str, data: DataInput, constitution: str | Path = DEFAULT_CONSTITUTION) -> Task:
    """Read and check one task file; a malformed row is an error (a held-out set does not shrink silently).
    `constitution` holds the principles that the `principles` task's rows name."""

    try:
        read = read_rows(data, TASKS[name])
    except DataError as e:
        raise StageError(f"eval: inputs.{name}: {e}") from None
    if read.quarantined:
        q = read.quarantined[0]
        raise StageError(f"eval: inputs.{name}: {q.origin}: {q.reason} ({len(read.quarantined)} bad rows)")
    if not read.rows:
        raise StageError(f"eval: inputs.{name}: {data}: no rows")
    task = Task(name, read.rows)
    if name == "principles":
        try:
            principles: dict[str, Principle] = {p.id: p for p in load_constitution(constitution)}
        except ValueError as e:
            raise StageError(f"eval: constitution: {e}") from None
        scored = [p.id for p in principles.values() if p.follow_markers]
    for row in read.rows:
        meta = row["meta"]
        if name == "arithmetic":
            a, b = meta.get("a"), meta.get("b")
            if not (isinstance(a, int) and isinstance(b, int)):
                raise _row_error(name, data, row, "meta.a and meta.b: the two integer operands are required")
            if row["messages"][-1]["content"] != f"What is {a} + {b}?":
                raise _row_error(name, data, row, f"the user turn must be exactly 'What is {a} + {b}?'")
            task.prompts.append(row["messages"])
            task.references.append(str(meta.get("answer", a + b)))
        elif name == "code":
            tests = task_tests(row)
            if tests is None:
                raise _row_error(name, data, row, "meta.tests: required (Python asserts the reply's code must pass)")
            task.prompts.append(row["messages"])
            task.references.append(tests)
        elif name == "constraints":
            try:
                constraints = constraints_from_specs(meta.get("constraints"))
            except ConstraintError as e:
                raise _row_error(name, data, row, str(e)) from None
            if any(c.checker is None for c in constraints):
                raise _row_error(name, data, row, "meta.constraints: free-text constraints have no trusted checker; "
                                                  "eval scores seed kinds only")
            task.prompts.append(constrained_prompt(row, constraints))
            task.references.append(constraints)
        elif name == "principles":
            principle_id = meta.get("principle")
            if not isinstance(principle_id, str) or not principle_id:
                raise _row_error(name, data, row, f"meta.principle: required (the id of a principle of {constitution} "
                                                  f"with follow_markers: {', '.join(scored) or 'none'})")
            if principle_id not in principles:
                raise _row_error(name, data, row, f"meta.principle: {principle_id!r} is not a principle of "
                                                  f"{constitution} (it has {', '.join(principles)})")
            if not principles[principle_id].follow_markers:
                raise _row_error(name, data, row, f"meta.principle: {principle_id!r} has no follow_markers in "
                                                  f"{constitution}, so no rule scores it (these have: "
                                                  f"{', '.join(scored) or 'none'})")
            task.prompts.append(row["messages"])
            task.references.append(principles[principle_id])
    return task


# ---- scoring ---------------------------------------------------------------------------------------------


def _rate(verdicts: list[bool]) -> float:
    return sum(verdicts) / len(verdicts)


def last_number(reply: str) -> str | None:
    numbers = _NUMBER.findall(reply)
    return numbers[-1].replace(",", "") if numbers else None


def arithmetic_correct(reply: str, answer: str) -> bool:
    """The arithmetic contract: the last number of the reply equals the answer as mathematics."""

    number = last_number(reply)
    return number is not None and math_equal(answer, number)


def score_arithmetic(task: Task, replies: list[str], sandbox: SandboxSpec) -> tuple[dict, dict, list[dict]]:
    verdicts = [arithmetic_correct(reply, answer) for reply, answer in zip(replies, task.references)]
    samples = [{"id": row["id"], "prompt": prompt, "reply": reply, "answer": answer, "last_number": last_number(reply),
                "verdict": ok} for row, prompt, reply, answer, ok in
               zip(task.rows, task.prompts, replies, task.references, verdicts)]
    return {"arithmetic_accuracy": _rate(verdicts)}, {"rows": len(verdicts), "correct": sum(verdicts)}, samples


def score_code(task: Task, replies: list[str], sandbox: SandboxSpec) -> tuple[dict, dict, list[dict]]:
    """pass@1: each reply's code with its row's tests in the sandbox; passed when every test ran."""

    verdicts, batch = run_solutions(list(zip(replies, task.references)), sandbox)
    samples = [{"id": row["id"], "prompt": prompt, "reply": reply, "verdict": ok, "status": result.status}
               for row, prompt, reply, ok, result in zip(task.rows, task.prompts, replies, verdicts, batch.results)]
    statuses: dict[str, int] = {}
    for result in batch.results:
        statuses[result.status] = statuses.get(result.status, 0) + 1
    return {"code_pass@1": _rate(verdicts)}, {"rows": len(verdicts), "passed": sum(verdicts),
                                              "statuses": statuses}, samples


def score_constraints(task: Task, replies: list[str], sandbox: SandboxSpec) -> tuple[dict, dict, list[dict]]:
    """Each reply against its constraints' trusted checkers, one sandbox job per reply."""

    jobs = [([c.checker for c in constraints], [reply]) for constraints, reply in zip(task.references, replies)]
    verdicts, _ = run_checkers(jobs, sandbox)
    by_kind: dict[str, list[bool]] = {}
    samples = []
    for row, prompt, reply, constraints, judged in zip(task.rows, task.prompts, replies, task.references, verdicts):
        followed = [judged.verdicts[j][0] for j in range(len(constraints))]
        for constraint, ok in zip(constraints, followed):
            by_kind.setdefault(constraint.kind, []).append(ok)
        samples.append({"id": row["id"], "prompt": prompt, "reply": reply, "verdict": all(followed),
                        "constraints": [{"kind": c.kind, **c.params, "followed": ok}
                                        for c, ok in zip(constraints, followed)], "status": judged.status})
    metrics = {"constraint_following_rate": _rate([s["verdict"] for s in samples])}
    metrics |= {f"constraint_rate/{kind}": _rate(oks) for kind, oks in sorted(by_kind.items())}
    counts = {"rows": len(samples), "followed_all": sum(s["verdict"] for s in samples),
              "checked": {kind: len(oks) for kind, oks in sorted(by_kind.items())}}
    return metrics, counts, samples


def score_principles(task: Task, replies: list[str], sandbox: SandboxSpec) -> tuple[dict, dict, list[dict]]:
    """Each reply by its row's principle's rule (`Principle.followed_by`); no code runs, so no sandbox."""

    by_principle: dict[str, list[bool]] = {}
    samples = []
    for row, prompt, reply, principle in zip(task.rows, task.prompts, replies, task.references):
        ok = principle.followed_by(reply)
        by_principle.setdefault(principle.id, []).append(ok)
        samples.append({"id": row["id"], "prompt": prompt, "reply": reply, "principle": principle.id, "verdict": ok})
    metrics = {"principle_following_rate": _rate([s["verdict"] for s in samples])}
    metrics |= {f"principle_rate/{principle_id}": _rate(oks) for principle_id, oks in sorted(by_principle.items())}
    counts = {"rows": len(samples), "followed": sum(s["verdict"] for s in samples),
              "checked": {principle_id: len(oks) for principle_id, oks in sorted(by_principle.items())}}
    return metrics, counts, samples


SCORERS = {"arithmetic": score_arithmetic, "code": score_code, "constraints": score_constraints,
           "principles": score_principles}


@torch.inference_mode()
def text_nll(model, tokenizer, texts: list[str], batch_size: int, max_length: int,
             progress: tqdm | None = None) -> list[tuple[float, int]]:
    """Per text: (sum of its tokens' NLL, accumulated in float64; tokens predicted). Batches are padded on the
    right and the pads are not labelled, so a text's value does not depend on what it is batched with."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    out: list[tuple[float, int]] = [(0.0, 0)] * len(ids)
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(batch):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        labels = input_ids.masked_fill(mask == 0, -100).to(model.device)
        log_probs = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), labels=labels,
                          fused_lm_head=True).log_probs  # [b, width - 1], float32, 0 where unlabelled
        nll = -log_probs.double().sum(-1)
        for r, i in enumerate(batch):
            out[i] = (nll[r].item(), max(len(ids[i]) - 1, 0))
        if progress is not None:
            progress.update(len(batch))
    return out


def passkey_prompt(tokenizer, length: int, rng: random.Random) -> tuple[list[dict], str]:
    """A chat turn of about `length` tokens (the template included, within one filler sentence) with a 5-digit
    key at a random filler boundary; returns the messages and the key."""
    key = f"{rng.randrange(100_000):05d}"
    turn = lambda fillers, depth: [{"role": "user", "content": PASSKEY_INTRO + PASSKEY_FILLER * depth  # noqa: E731
                                    + PASSKEY_KEY.format(key=key) + PASSKEY_FILLER * (fillers - depth)
                                    + PASSKEY_QUESTION}]
    size = lambda messages: len(tokenizer(tokenizer.apply_chat_template(  # noqa: E731
        messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    base, filler = size(turn(0, 0)), len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    fillers = max((length - base) // filler, 0)
    return turn(fillers, rng.randint(0, fillers)), key


# ---- the run ---------------------------------------------------------------------------------------------


class ResultStore:
    """results/<model>/<task>.json (metrics and counts), written after samples/<model>/<task>.jsonl: its
    presence marks the (model, task) done."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def _result(self, model: str, task: str) -> Path:
        return self.run_dir / "results" / model / f"{task}.json"

    def _samples(self, model: str, task: str) -> Path:
        return self.run_dir / "samples" / model / f"{task}.jsonl"

    def done(self, model: str, task: str) -> bool:
        return self._result(model, task).exists()

    def save(self, model: str, task: str, metrics: dict, counts: dict, samples: list[dict]) -> None:
        atomic_write_text(self._samples(model, task), to_jsonl(samples))
        result = {"metrics": metrics, "counts": counts}
        atomic_write_text(self._result(model, task), json.dumps(result, indent=2) + "\n")

    def result(self, model: str, task: str) -> dict:
        return json.loads(self._result(model, task).read_text())

    def samples(self, model: str, task: str) -> list[dict]:
        return load_jsonl(self._samples(model, task))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _weights_file(path: str) -> Path | None:
    """The file whose hash stands for a local checkpoint's weights in the fingerprint."""
    for name in ("model.safetensors", "model.safetensors.index.json", "config.json"):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def _check_models(recipe: EvalRecipe) -> dict[str, str]:
    """Every local model (and the reward model) is a checkpoint; returns the fingerprint's files."""
    files = {}
    checked = [(f"models[{i}].path", m.path, f"models.{m.name}") for i, m in enumerate(recipe.models)]
    if recipe.reward_model is not None:
        checked.append(("reward_model.path", recipe.reward_model.path, "reward_model"))
    for key, path, label in checked:
        local = Path(path).exists() or path.startswith((".", "/")) or path.count("/") != 1
        if local and not (Path(path) / "config.json").is_file():
            raise StageError(f"eval: {key}: {path}: no checkpoint there (config.json not found)")
        if local:
            files[label] = str(_weights_file(path))
    return files


def _generate(recipe: EvalRecipe, model: EvalModel, tasks: dict[str, Task], store: ResultStore) -> None:
    """The model's replies to every answered task not done yet, scored and saved task by task."""
    todo = [name for name in GENERATED if name in tasks and not store.done(model.name, name)]
    if not todo:
        return
    spec = replace(recipe.generation, model=model.path)
    with make_generator(spec) as generator:
        for name in todo:
            task, replies = tasks[name], []
            step = spec.batch_size if spec.backend == "transformers" else len(task.prompts)  # vLLM batches itself
            with tqdm(total=len(task.prompts), desc=f"eval {model.name}: {name}", unit="prompt") as bar:
                for b, s in enumerate(range(0, len(task.prompts), step)):
                    completions = generator.generate(task.prompts[s : s + step], spec.sampling(seed=recipe.seed + b))
                    replies += [c[0].text for c in completions]
                    bar.update(len(completions))
            metrics, counts, samples = SCORERS[name](task, replies, recipe.sandbox)
            store.save(model.name, name, metrics, counts, samples)


def _perplexity(recipe: EvalRecipe, model: EvalModel, task: Task, store: ResultStore) -> None:
    spec = recipe.perplexity
    lm = load_causal_lm(model.path, spec.dtype).to(_device()).eval()
    with tqdm(total=len(task.rows), desc=f"eval {model.name}: perplexity", unit="text") as bar:
        per_text = text_nll(lm, load_tokenizer(model.path), [r["text"] for r in task.rows], spec.batch_size,
                            spec.max_length, bar)
    nll, tokens = math.fsum(n for n, _ in per_text), sum(t for _, t in per_text)
    metrics = {"nll_per_token": nll / max(tokens, 1), "perplexity": math.exp(nll / max(tokens, 1))}
    samples = [{"id": r["id"], "tokens": t, "nll": n} for r, (n, t) in zip(task.rows, per_text)]
    store.save(model.name, "perplexity", metrics, {"texts": len(per_text), "tokens": tokens}, samples)


def _passkey(recipe: EvalRecipe, model: EvalModel, store: ResultStore) -> None:
    spec = recipe.passkey
    try:
        trained = trained_length_of(causal_lm_class(model.path).config_class.from_pretrained(model.path),
                                    spec.trained_length)
    except ValueError as e:
        raise StageError(f"eval: passkey.trained_length: {model.path}: {e}") from None
    long_context = {"chunk_size": spec.chunk_size or trained, "local_size": spec.local_size or trained // 4,
                    "yarn_factor": spec.yarn_factor or spec.multiple, "trained_length": trained}
    variants = {"passkey@1x": (trained, None), f"passkey@{spec.multiple}x": (spec.multiple * trained, None),
                f"passkey@{spec.multiple}x_dca_yarn": (spec.multiple * trained, long_context)}
    tokenizer = load_tokenizer(model.path)
    generation = replace(recipe.generation, backend="transformers", model=model.path, temperature=0.0,
                         max_new_tokens=16, stop=[])
    metrics, samples, lengths = {}, [], {}
    for variant, (length, settings) in tqdm(variants.items(), desc=f"eval {model.name}: passkey"):
        rng = random.Random(f"{recipe.seed}:passkey:{length}")  # the same prompts with and without DCA
        trials = [passkey_prompt(tokenizer, length, rng) for _ in range(spec.trials)]
        lm = load_causal_lm(model.path, spec.dtype, settings).to(_device()).eval()
        with TransformersGenerator(generation, model=lm, tokenizer=tokenizer) as generator:
            replies = [c[0].text for c in generator.generate([m for m, _ in trials], generation.sampling())]
        verdicts = [key in reply for (_, key), reply in zip(trials, replies)]
        metrics[variant] = _rate(verdicts)
        lengths[variant] = length
        samples += [{"id": f"{variant}-{i}", "variant": variant, "length": length, "key": key, "reply": reply,
                     "verdict": ok} for i, ((_, key), reply, ok) in enumerate(zip(trials, replies, verdicts))]
        del lm
    store.save(model.name, "passkey", metrics, {"trials": spec.trials, "trained_length": trained,
                                                "lengths": lengths, "long_context": long_context}, samples)


def _lm_eval(recipe: EvalRecipe, model: EvalModel, store: ResultStore) -> None:
    """lm-evaluation-harness on the model; every numeric result as `lm_eval/<task>/<metric>`. Not yet run."""
    import lm_eval  # optional: not a dependency (checked at the run's start)

    spec = recipe.lm_eval
    backend = "vllm" if recipe.generation.backend == "vllm" else "hf"
    out = lm_eval.simple_evaluate(model=backend, model_args={"pretrained": model.path,
                                                             "dtype": recipe.generation.dtype},
                                  tasks=spec.tasks, limit=spec.limit, num_fewshot=spec.num_fewshot,
                                  batch_size=spec.batch_size, random_seed=recipe.seed)
    metrics = {f"lm_eval/{task}/{name}": value for task, values in out["results"].items()
               for name, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    store.save(model.name, "lm_eval", metrics, {"tasks": spec.tasks, "limit": spec.limit}, [])


def _reward(recipe: EvalRecipe, tasks: dict[str, Task], store: ResultStore) -> None:
    """One reward model scores every model's replies, read back from their samples (so a resume works too)."""
    todo = [m for m in recipe.models if not store.done(m.name, "reward")]
    if not todo:
        return
    spec = recipe.reward_model
    scorer = RewardModel(spec.path, dtype=getattr(torch, spec.dtype), batch_size=spec.batch_size, device=_device())
    for model in tqdm(todo, desc="eval: reward model"):
        samples = [s | {"task": name} for name in GENERATED if name in tasks for s in store.samples(model.name, name)]
        rewards = scorer([s["prompt"] + [{"role": "assistant", "content": s["reply"]}] for s in samples])
        metrics = {"reward_mean": mean(rewards)}
        metrics |= {f"reward_mean/{name}": mean(r for s, r in zip(samples, rewards) if s["task"] == name)
                    for name in GENERATED if name in tasks}
        store.save(model.name, "reward", metrics, {"replies": len(rewards)},
                   [{"id": s["id"], "task": s["task"], "reward": r} for s, r in zip(samples, rewards)])


def plot_metrics(metrics: dict[str, dict[str, float]], path: Path) -> None:
    """One bar chart per metric, a bar per model."""
    names = list(dict.fromkeys(k for values in metrics.values() for k in values if k != "counts"))
    if not names:
        return
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    models = list(metrics)
    for ax, name in zip(axes.flat, names):
        values = [metrics[m].get(name, float("nan")) for m in models]
        ax.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))])
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class EvalStage(Stage):
    """`eval` on the shared run lifecycle: every (model, task) result kept as it finishes."""

    name = "eval"
    recipe_class = EvalRecipe

    def run(self) -> dict[str, Any]:
        return run_eval(self.recipe)


def run_eval(recipe: EvalRecipe) -> dict[str, Any]:
    """Run, resume or skip an evaluation; returns the manifest."""
    files = _check_models(recipe)
    if any(t in recipe.inputs for t in ("code", "constraints")) and (problem := check_sandbox(recipe.sandbox)):
        raise StageError(f"eval: the code sandbox cannot run here: {problem}")
    if recipe.lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
        raise StageError("eval: lm_eval: lm-eval is not installed (pip install lm-eval), or set lm_eval: null")
    if "principles" in recipe.inputs:
        files["constitution"] = recipe.constitution_path  # its sha256 in the fingerprint: edited rules, another run
    start = Run.start("eval", recipe, list(recipe.inputs), files)
    if start.done:
        return start.done
    store = ResultStore(start.run_dir)
    tasks = {name: read_task(name, data, recipe.constitution_path) for name, data in recipe.inputs.items()}
    units = [(m.name, t) for m in recipe.models for t in
             [*(n for n in GENERATED if n in tasks), *(["reward"] if recipe.reward_model else []),
              *(["perplexity"] if "base_text" in tasks else []), *(["passkey"] if recipe.passkey else []),
              *(["lm_eval"] if recipe.lm_eval else [])]]
    resumed = [unit for unit in units if store.done(*unit)]
    if resumed and len(resumed) < len(units):
        print(f"eval: resuming, {len(resumed)} of {len(units)} (model, task) results already done")
    for model in recipe.models:
        _generate(recipe, model, tasks, store)
        if "base_text" in tasks and not store.done(model.name, "perplexity"):
            _perplexity(recipe, model, tasks["base_text"], store)
        if recipe.passkey is not None and not store.done(model.name, "passkey"):
            _passkey(recipe, model, store)
        if recipe.lm_eval is not None and not store.done(model.name, "lm_eval"):
            _lm_eval(recipe, model, store)
    if recipe.reward_model is not None:
        _reward(recipe, tasks, store)

    metrics: dict[str, dict[str, Any]] = {}
    for name, task in units:
        result = store.result(name, task)
        metrics.setdefault(name, {"counts": {}})
        metrics[name] |= result["metrics"]
        metrics[name]["counts"][task] = result["counts"]
    run_dir = start.run_dir
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    plot_metrics(metrics, run_dir / "metrics.png")
    manifest = start.finish({t: len(task.rows) for t, task in tasks.items()},
                            models={m.name: m.path for m in recipe.models},
                            metrics={name: {k: v for k, v in values.items() if k != "counts"}
                                     for name, values in metrics.items()},
                            resumed=[f"{m}/{t}" for m, t in resumed])
    print(summary_table(metrics))
    print(f"eval: metrics in {run_dir / 'metrics.json'}, plot {run_dir / 'metrics.png'}, "
          f"replies in {run_dir / 'samples'}")
    return manifest


def summary_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Models as columns, metrics as rows (per-kind and per-task breakdowns left to metrics.json)."""
    names = list(dict.fromkeys(k for values in metrics.values() for k in values if k != "counts" and "/" not in k))
    width = max([len(n) for n in names] + [6])
    lines = [" " * width + "".join(f"{m:>12}" for m in metrics)]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(f"{metrics[m].get(name, float('nan')):>12.4f}" for m in metrics))
    return "\n".join(lines)
