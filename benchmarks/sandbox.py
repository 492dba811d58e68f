"""Sandbox throughput: executions/s of `reward.sandbox.run_many` with every protection on, side by side with the
sandbox of a baseline commit (default: the one before the hardening of issue 24) in the same run.

    python benchmarks/sandbox.py [--baseline 151ea2b] [--workers 1,2,4] [--programs 96] [--rounds 7]

- trivial: `print(1)`, so the figure is the sandbox's own cost (bwrap, cgroup, interpreter start);
  a bare `python3 -c 'print(1)'` subprocess loop is timed as well, for the overhead;
- solution: a correct `add(a, b)` with two asserts through `reward.code.run_solutions` (the baseline ran the
  tests in the solution's process; now they run in the runner, the solution in a forked process);
- sleep and cpu (ours only): `time.sleep(1)` scales with workers, a 1-CPU-second loop with the cores.
Baseline and ours alternate, `--rounds` times per row; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine, write_result  # noqa: E402
from reward import code, sandbox  # noqa: E402

SOLUTION = ("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n")
SCALING = {"sleep": "import time\ntime.sleep(1)", "cpu": "import time\nwhile time.process_time() < 1.0:\n    pass"}


def baseline_package(commit: str, into: Path) -> tuple[ModuleType, ModuleType]:
    """`reward.sandbox` and `reward.code` as they were at `commit`, imported as package `baseline_reward`."""
    package = into / "baseline_reward"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("sandbox", "code"):
        source = subprocess.run(["git", "show", f"{commit}:reward/{name}.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        (package / f"{name}.py").write_text(source)
    sys.path.insert(0, str(into))
    return importlib.import_module("baseline_reward.sandbox"), importlib.import_module("baseline_reward.code")


def bare_starts_per_s(count: int) -> float:
    """Plain interpreter starts, one after another: what the sandbox adds its cost to."""
    interpreter, _ = sandbox.sandbox_interpreter()
    start = time.monotonic()
    for _ in range(count):
        subprocess.run([interpreter, "-c", "print(1)"], check=True, capture_output=True)
    return count / (time.monotonic() - start)


def trivial(module: ModuleType, count: int, workers: int) -> tuple[float, int]:
    batch = module.run_many(["print(1)"] * count, workers=workers, timeout_s=30.0)
    return batch.executions_per_s, sum(not r.passed for r in batch.results)


def solutions(module: ModuleType, count: int, workers: int, ours: bool) -> tuple[float, int]:
    jobs = [SOLUTION] * count
    if ours:
        verdicts, batch = module.run_solutions(jobs, sandbox.SandboxSpec(timeout_s=30.0, workers=workers))
    else:
        verdicts, batch = module.run_solutions(jobs, workers=workers, timeout_s=30.0, memory_mb=512)
    return batch.executions_per_s, count - sum(verdicts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="151ea2b", help="commit whose reward/sandbox.py and code.py to compare")
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--programs", type=int, default=96, help="programs per measurement")
    ap.add_argument("--rounds", type=int, default=7, help="alternating baseline/ours measurements per row")
    ap.add_argument("--long", type=int, default=4, help="1-second programs per worker count (ours only)")
    a = ap.parse_args()
    if weak := sandbox.sandbox_weaknesses():
        sys.exit(f"every protection must be on to measure it: {'; '.join(weak)}")

    with tempfile.TemporaryDirectory() as folder:
        base_sandbox, base_code = baseline_package(a.baseline, Path(folder))
        bare = bare_starts_per_s(a.programs)
        print(f"{machine()['cpu']}, {os.cpu_count()} cores; bare interpreter, sequential: {bare:.1f} starts/s")
        rows = []
        for program in ("trivial", "solution"):
            for workers in [int(w) for w in a.workers.split(",")]:
                figures: dict[str, list[float]] = {"baseline": [], "ours": []}
                failed = 0
                for _ in range(a.rounds):
                    for name in ("baseline", "ours"):
                        if program == "trivial":
                            rate, bad = trivial(base_sandbox if name == "baseline" else sandbox, a.programs, workers)
                        else:
                            rate, bad = solutions(base_code if name == "baseline" else code, a.programs, workers,
                                                  ours=name == "ours")
                        figures[name].append(rate)
                        failed += bad
                baseline, ours = (statistics.median(figures[n]) for n in ("baseline", "ours"))
                rows.append({"program": program, "workers": workers, "programs": a.programs, "rounds": a.rounds,
                             "baseline_executions_per_s": round(baseline, 2), "executions_per_s": round(ours, 2),
                             "ratio": round(ours / baseline, 3), "failed": failed})
                print(f"{program:8s} workers={workers} baseline {baseline:6.2f}/s  ours {ours:6.2f}/s  "
                      f"ratio {ours / baseline:.3f}" + (f"  FAILED {failed}" if failed else ""))
        for program, source in SCALING.items():
            for workers in [int(w) for w in a.workers.split(",")]:
                batch = sandbox.run_many([source] * a.long, workers=workers, timeout_s=30.0)
                rows.append({"program": program, "workers": workers, "programs": a.long,
                             "executions_per_s": round(batch.executions_per_s, 2),
                             "failed": sum(not r.passed for r in batch.results)})
                print(f"{program:8s} workers={workers} ours {batch.executions_per_s:6.2f}/s")
    path = write_result("sandbox", {"baseline": a.baseline, "bare_interpreter_starts_per_s": round(bare, 1),
                                    "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
