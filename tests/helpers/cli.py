"""`qwen2-align` run in the test's own process: the CLI's code path without a new interpreter importing torch,
transformers and TRL again (~12 s on 2 cores). Tests of what a fresh process prints (one line, no traceback)
still start one."""

import contextlib
import io
import subprocess

from qwen2_align.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`main(args)` with its exit status and what it printed, as `subprocess.run(..., capture_output=True)` gives."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as e:  # argparse: --help, a bad argument
            status = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["qwen2-align", *args], status, out.getvalue(), err.getvalue())
