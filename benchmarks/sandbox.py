"""Sandbox throughput: executions/s of `reward.sandbox.run_many` for a trivial program and 1-second ones.

    python benchmarks/sandbox.py [--workers 1,2,4,8] [--trivial 64] [--long 8]

- trivial: `print(1)`, so the figure is the sandbox's own cost (bwrap + interpreter start);
  a bare `python3 -c 'print(1)'` subprocess loop is timed as well, for the overhead;
- sleep: `time.sleep(1)`, bound by the wall clock: scales with workers past the core count;
- cpu: spins until the process has used 1 CPU second: bound by the cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_result  # noqa: E402
from reward.sandbox import run_many, sandbox_interpreter  # noqa: E402

PROGRAMS = {
    "trivial": "print(1)",
    "sleep": "import time\ntime.sleep(1)",
    "cpu": "import time\nwhile time.process_time() < 1.0:\n    pass",
}


def bare_starts_per_s(count: int) -> float:
    """Plain interpreter starts, one after another: what the sandbox adds its cost to."""
    interpreter, _ = sandbox_interpreter()
    start = time.monotonic()
    for _ in range(count):
        subprocess.run([interpreter, "-c", "print(1)"], check=True, capture_output=True)
    return count / (time.monotonic() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    ap.add_argument("--trivial", type=int, default=64, help="trivial programs per worker count")
    ap.add_argument("--long", type=int, default=8, help="1-second programs per worker count")
    a = ap.parse_args()

    rows = []
    bare = bare_starts_per_s(a.trivial)
    print(f"bare interpreter, sequential: {bare:.1f} starts/s ({os.cpu_count()} cores)")
    for workers in [int(w) for w in a.workers.split(",")]:
        for name, code in PROGRAMS.items():
            count = a.trivial if name == "trivial" else a.long
            batch = run_many([code] * count, workers=workers, timeout_s=30.0)
            failed = sum(not r.passed for r in batch.results)
            rows.append({"program": name, "workers": workers, "programs": count, "wall_s": round(batch.wall_s, 2),
                         "executions_per_s": round(batch.executions_per_s, 2), "failed": failed})
            print(f"{name:8s} workers={workers:2d} programs={count:3d} {batch.wall_s:6.2f}s "
                  f"{batch.executions_per_s:7.2f} executions/s" + (f"  FAILED {failed}" if failed else ""))
    path = write_result("sandbox", {"bare_interpreter_starts_per_s": round(bare, 1), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
