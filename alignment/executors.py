"""Where a data stage's shards run: in this process (the default), or on the workers of a Ray cluster.

Both executors hand a shard's rows and seed to `stage.process` and give each finished shard back to the
runner (`on_done`), which writes it; the shard's output depends only on its rows, its seed and the stage,
so every executor writes the same bytes. On Ray each worker is an actor that holds one copy of the stage
(pickled once into the object store after the driver's `prepare`, so an index built there is shared) and
its engine (`setup`, once per worker) for the whole run, and has two shards queued at a time. A worker that
dies loses only its shards: the driver starts a replacement and runs them again, up to `max_retries` times
each, and the manifest records each retry. A stage with several engines (`responses`' models) has each
worker hold one of them and run its part of every shard; the driver combines the parts.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch


@dataclass
class ExecutorSpec:
    """The recipe's `executor:` section. It decides where shards run, never what they contain: it is left out
    of the run's fingerprint, so a run started in one executor can be resumed in another."""

    kind: Literal["local", "ray"] = "local"
    # ray: None starts Ray on this machine (or joins $RAY_ADDRESS); "auto" joins the cluster `ray start` runs here
    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # a vLLM engine with tensor_parallel_size N wants N
    max_retries: int = 3  # times one shard is run again after its worker died

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker, gpus_per_worker: must be >= 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {self.max_retries}")


@dataclass
class ShardContext:
    """What `process` knows of its shard; it counts generated tokens and the stage's own figures
    (summed over all shards and workers into `stage.counts` for `finish`)."""

    index: int
    seed: int
    tokens: int = 0
    counts: Counter = field(default_factory=Counter)

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def count(self, name: str, value: float) -> None:
        self.counts[name] += value


@dataclass
class ShardDone:
    """A finished shard as it comes back to the driver."""

    index: int
    outcomes: list
    tokens: int
    counts: Counter
    worker: str
    node: str
    pid: int
    seconds: float
    setup_s: float = 0.0  # the worker's setup (loading its engine), on its first shard


class ShardStage(Protocol):
    name: str

    def setup(self) -> None: ...
    def process(self, rows: list[dict], ctx: ShardContext) -> list: ...
    def teardown(self) -> None: ...
    def engines(self) -> int: ...
    def process_part(self, engine: int, rows: list[dict], ctx: ShardContext) -> Any: ...
    def combine(self, rows: list[dict], parts: list[Any], ctx: ShardContext) -> list: ...


QUEUED_PER_WORKER = 2


class ExecutorError(RuntimeError):
    """A shard could not be run; the message is one line."""


def timed_setup(stage: ShardStage) -> float:
    """`stage.setup()`, and the seconds it took (loading the engine), for the manifest."""
    started = time.perf_counter()
    stage.setup()
    return time.perf_counter() - started


def run_one_shard(stage: ShardStage, index: int, seed: int, rows: list[dict], worker: str,
                  engine: int | None = None) -> ShardDone:
    """The shard's outcomes; with `engine`, only that engine's part of them (`stage.process_part`)."""
    ctx = ShardContext(index, seed)
    started = time.perf_counter()
    outcomes = stage.process(rows, ctx) if engine is None else stage.process_part(engine, rows, ctx)
    return ShardDone(index, outcomes, ctx.tokens, ctx.counts, worker, socket.gethostname(), os.getpid(),
                     time.perf_counter() - started)


@dataclass
class WorkerTally:
    """One worker's share of the run, for the manifest."""

    node: str = ""
    pid: int = 0
    shards: int = 0
    rows: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    setup_s: float = 0.0

    def add(self, done: ShardDone, rows: int) -> None:
        self.node, self.pid = done.node, done.pid
        self.setup_s += done.setup_s
        self.shards += 1
        self.rows += rows
        self.tokens += done.tokens
        self.busy_s += done.seconds

    def report(self) -> dict[str, Any]:
        busy = max(self.busy_s, 1e-9)
        return {"node": self.node, "pid": self.pid, "shards": self.shards, "rows": self.rows, "tokens": self.tokens,
                "setup_s": round(self.setup_s, 3), "busy_s": round(self.busy_s, 3),
                "rows_per_s": round(self.rows / busy, 3), "tokens_per_s": round(self.tokens / busy, 1)}


def run_shards(stage: ShardStage, shards: dict[int, list[dict]], seed: int, spec: ExecutorSpec,
               on_done: Callable[[ShardDone], None]) -> dict[str, Any]:
    """Run `shards` (index -> rows; shard i is seeded `seed + i`) where `spec` says; `on_done` gets each
    finished shard on the driver, in the order they finish. Returns the executor's part of the manifest."""
    if spec.kind == "ray":
        return RayExecutor(spec).run(stage, shards, seed, on_done)
    return run_local(stage, shards, seed, on_done)


def run_local(stage: ShardStage, shards: dict[int, list[dict]], seed: int,
              on_done: Callable[[ShardDone], None]) -> dict[str, Any]:
    tally = WorkerTally(setup_s=timed_setup(stage))
    try:
        for index, rows in shards.items():
            done = run_one_shard(stage, index, seed + index, rows, "local")
            on_done(done)
            tally.add(done, len(rows))
    finally:
        stage.teardown()
    return {"kind": "local", "workers": {"local": tally.report()}}


class ShardWorker:
    """A Ray actor: one copy of the stage and its engine, set up at the first shard, kept to the end. A stage
    with several engines (`responses`' models) gives each worker one of them: it runs only that engine's part
    of each shard, so the model it loaded stays loaded.

    It computes with the driver's number of torch threads: a CPU matmul's rounding depends on how many threads
    split it (a decoding step's logits differ by ~1e-5 between 1 and 2 threads, enough to change a sampled
    token), so only the same count writes the same bytes as the in-process run."""

    def __init__(self, stage: ShardStage, name: str, threads: int):
        torch.set_num_threads(threads)
        self.stage, self.name, self.ready = stage, name, False

    def process(self, index: int, seed: int, rows: list[dict], engine: int | None) -> ShardDone:
        setup_s = 0.0 if self.ready else timed_setup(self.stage)
        self.ready = True
        done = run_one_shard(self.stage, index, seed, rows, self.name, engine)
        done.setup_s = setup_s
        return done

    def close(self) -> None:
        if self.ready:
            self.stage.teardown()


@dataclass
class Worker:
    """A Ray actor as the driver sees it; `engine` is the stage's engine it holds (None: the only one)."""

    name: str
    actor: Any
    engine: int | None


def combined(stage: ShardStage, rows: list[dict], seed: int, parts: dict[int | None, ShardDone],
             parts_of: list[int | None]) -> ShardDone:
    """A shard's outcomes from its engines' parts (`stage.combine`, on the driver); one part is the outcomes."""
    if parts_of == [None]:
        return parts[None]
    first = parts[parts_of[0]]
    ctx = ShardContext(first.index, seed)
    outcomes = stage.combine(rows, [parts[engine].outcomes for engine in parts_of], ctx)
    counts: Counter = Counter()
    for part in parts.values():
        counts.update(part.counts)
    return ShardDone(first.index, outcomes, sum(p.tokens for p in parts.values()), counts, first.worker,
                     first.node, first.pid, sum(p.seconds for p in parts.values()))


class RayExecutor:
    """The driver's side: start the workers, keep two shards queued on each, replace the ones that die."""

    def __init__(self, spec: ExecutorSpec):
        try:
            import ray
        except ImportError:
            raise ExecutorError("executor.kind is ray but Ray is not installed: pip install 'qwen2-align[ray]'") \
                from None
        self.ray, self.spec = ray, spec
        self.actor_class = ray.remote(ShardWorker)
        self.started_ray = False
        self.tallies: dict[str, WorkerTally] = {}
        self.retries: list[dict[str, Any]] = []
        self.lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)

    def connect(self) -> None:
        if not self.ray.is_initialized():
            self.ray.init(address=self.spec.address, include_dashboard=False, logging_level="WARNING")
            self.started_ray = True

    def start_worker(self, stage_ref: Any, number: int, engine: int | None) -> Worker:
        name = f"worker-{number}" if engine is None else f"worker-{number}-engine-{engine}"
        actor = self.actor_class.options(num_cpus=self.spec.cpus_per_worker,
                                         num_gpus=self.spec.gpus_per_worker).remote(stage_ref, name,
                                                                                    torch.get_num_threads())
        return Worker(name, actor, engine)

    def run(self, stage: ShardStage, shards: dict[int, list[dict]], seed: int,
            on_done: Callable[[ShardDone], None]) -> dict[str, Any]:
        ray = self.ray
        engines = stage.engines()
        if engines > 1 and self.spec.workers < engines:
            raise ExecutorError(f"executor.workers: {stage.name} samples from {engines} models, one per worker: "
                                f"give at least {engines} workers, got {self.spec.workers}")
        parts_of = [None] if engines == 1 else list(range(engines))  # engine None: the whole shard at once
        self.connect()
        stage_ref = ray.put(stage)  # once: every worker reads the same copy from the object store
        rows_ref = {index: ray.put(rows) for index, rows in shards.items()}
        pending = {engine: deque(shards) for engine in parts_of}
        parts: dict[int, dict[int | None, ShardDone]] = {index: {} for index in shards}
        attempts: Counter = Counter()
        count = min(self.spec.workers, len(shards)) if engines == 1 else self.spec.workers
        workers = [self.start_worker(stage_ref, number, parts_of[number % len(parts_of)]) for number in range(count)]
        started = len(workers)
        running: dict[Any, tuple[Worker, int]] = {}
        try:
            while running or any(pending.values()):
                # two shards queued per worker: the next one is there when a shard ends, no round trip between
                busy = Counter(w.name for w, _ in running.values())
                for worker in workers:
                    while busy[worker.name] < QUEUED_PER_WORKER and pending[worker.engine]:
                        index = pending[worker.engine].popleft()
                        ref = worker.actor.process.remote(index, seed + index, rows_ref[index], worker.engine)
                        running[ref] = (worker, index)
                        busy[worker.name] += 1
                (ref,), _ = ray.wait(list(running), num_returns=1)
                worker, index = running.pop(ref)
                try:
                    done = ray.get(ref)
                except self.lost as e:
                    task = (index, worker.engine)
                    attempts[task] += 1
                    reason = str(e).strip().splitlines()[0][:300]
                    self.retries.append({"shard": index, "engine": worker.engine, "worker": worker.name,
                                         "attempt": attempts[task], "reason": reason})
                    print(f"{stage.name}: {worker.name} died on shard {index} ({reason}); running it again")
                    if attempts[task] > self.spec.max_retries:
                        raise ExecutorError(f"{stage.name}: shard {index}: its worker died {attempts[task]} times; "
                                            f"last: {reason}") from None
                    pending[worker.engine].appendleft(index)
                    if worker in workers:  # its first lost shard: replace it (the others come back lost too)
                        workers.remove(worker)
                        workers.append(self.start_worker(stage_ref, started, worker.engine))
                        started += 1
                    continue
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, Exception):
                        raise e.cause from None  # the stage's own error, as in-process
                    raise ExecutorError(f"{stage.name}: shard {index} on {worker.name}: {e}") from None
                self.tallies.setdefault(worker.name, WorkerTally()).add(done, len(shards[index]))
                parts[index][worker.engine] = done
                if len(parts[index]) == len(parts_of):
                    on_done(combined(stage, shards[index], seed + index, parts.pop(index), parts_of))
        finally:
            self.stop([w.actor for w in workers])
        return {"kind": "ray", "address": self.spec.address, "workers_asked": self.spec.workers,
                "workers_started": started, "cpus_per_worker": self.spec.cpus_per_worker,
                "gpus_per_worker": self.spec.gpus_per_worker, "engines": engines,
                "workers": {name: tally.report() for name, tally in sorted(self.tallies.items())},
                "retries": self.retries}

    def stop(self, actors: list[Any]) -> None:
        ray = self.ray
        closing = [actor.close.remote() for actor in actors]
        try:
            ray.get(closing, timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # a worker that died or hangs has nothing left to release
        for actor in actors:
            ray.kill(actor)
        if self.started_ray:
            ray.shutdown()
