"""The sandbox against what model-written code might do: real bubblewrap, real processes, no mocks.

Each escape attempt is its own test and prints the status the sandbox gave it (`pytest -s`)."""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reward import sandbox
from reward.sandbox import OUTPUT_LIMIT_BYTES, SandboxResult, SandboxUnavailable, run_many, run_python

REPO = Path(__file__).resolve().parents[1]

needs_bwrap = pytest.mark.skipif(sandbox.sandbox_unavailable_reason() is not None,
                                 reason=f"sandbox unavailable: {sandbox.sandbox_unavailable_reason()}")


def run(code: str, **kwargs) -> SandboxResult:
    """run_python on dedented code, printing how it ended."""
    result = run_python(textwrap.dedent(code), **kwargs)
    print(f"status={result.status} returncode={result.returncode} {result.duration_s:.2f}s "
          f"stdout={result.stdout[:300]!r} stderr={result.stderr[-300:]!r}")
    return result


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def processes_with(marker: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


@needs_bwrap
def test_correct_code_passes_with_stdin_and_files():
    result = run("""
        import sys, helper
        total = sum(map(int, open("data/numbers.txt").read().split())) + int(sys.stdin.read())
        open("out.txt", "w").write(str(total))
        open("/tmp/scratch.txt", "w").write("the working dir is writable, /tmp with it")
        print(helper.double(int(open("out.txt").read())))
    """, stdin="4", files={"data/numbers.txt": "1 2 3\n", "helper.py": "def double(x):\n    return 2 * x\n"})
    assert result.passed and result.status == "ok" and result.stdout == "20\n"


@needs_bwrap
def test_wrong_code_fails():
    result = run("assert sum([1, 2]) == 4, 'wrong sum'")
    assert result.status == "error" and not result.passed and result.returncode == 1
    assert "AssertionError: wrong sum" in result.stderr


@needs_bwrap
def test_infinite_loop_times_out():
    result = run("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed and result.duration_s < 3


@needs_bwrap
def test_fork_bomb_is_contained_and_leaves_no_process():
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    code = f"""
        import os, subprocess
        subprocess.Popen(["sh", "-c", "sleep 300", "{marker}"], start_new_session=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run, code, timeout_s=3.0)
        saw_sleeper = wait_until(lambda: bool(processes_with(marker)), 3.0)
        result = running.result()
    assert saw_sleeper, "the detached sleeper never started, so the leftover check below proves nothing"
    assert result.status in ("error", "timeout") and not result.passed
    assert wait_until(lambda: not processes_with(marker), 5.0), f"left over: {processes_with(marker)}"


@needs_bwrap
def test_detached_process_dies_with_the_program():
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    result = run(f"""
        import subprocess
        subprocess.Popen(["sh", "-c", "sleep 300", "{marker}"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("started")
    """)
    assert result.passed and result.duration_s < 5
    assert wait_until(lambda: not processes_with(marker), 5.0), f"left over: {processes_with(marker)}"


@needs_bwrap
def test_memory_bomb_is_memory():
    result = run("""
        chunks = []
        while True:
            chunks.append(bytearray(10**7))
    """, memory_mb=256)
    assert result.status == "memory" and not result.passed


@needs_bwrap
def test_writes_outside_the_working_dir_fail():
    targets = ["/usr/sandbox-test", "/usr/lib/sandbox-test", "/root/sandbox-test", "/work/sandbox-test",
               f"{REPO}/sandbox-test", "/sandbox-test", "/dev/shm/sandbox-test", "/etc/sandbox-test"]
    result = run(f"""
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as error:
                print("refused", path, type(error).__name__)
    """)
    assert result.passed and "WROTE" not in result.stdout and result.stdout.count("refused") == len(targets)
    assert not any(Path(target).exists() for target in targets)


@needs_bwrap
def test_pipeline_files_are_not_readable(tmp_path: Path):
    host_tmp_secret = tmp_path / "secret.txt"
    host_tmp_secret.write_text("host secret")
    result = run(f"""
        import os
        for path in [{str(REPO / "README.md")!r}, {str(host_tmp_secret)!r}, "/root/.bashrc", "/etc/passwd"]:
            try:
                print("LEAKED", path, open(path).read()[:20])
            except OSError as error:
                print("refused", path, type(error).__name__)
        for folder in ["/work", "/root", {str(tmp_path)!r}]:
            print("exists" if os.path.exists(folder) else "absent", folder)
    """)
    assert result.passed and "LEAKED" not in result.stdout and "exists" not in result.stdout


@needs_bwrap
def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch):
    secret = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    result = run("""
        import os, glob
        print("HF_TOKEN:", os.environ.get("HF_TOKEN"))
        print("environment:", sorted(os.environ))
        for path in glob.glob("/proc/*/environ"):
            try:
                print(path, open(path, "rb").read())
            except OSError as error:
                print(path, type(error).__name__)
    """)
    assert result.passed and "HF_TOKEN: None" in result.stdout and secret not in result.stdout + result.stderr


@needs_bwrap
def test_network_is_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = run(f"""
            import socket
            for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
                try:
                    socket.create_connection(address, timeout=2).close()
                    print("CONNECTED", address)
                except OSError as error:
                    print("refused", address, type(error).__name__)
        """)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert result.passed and "CONNECTED" not in result.stdout


@needs_bwrap
def test_shell_is_allowed_inside_the_sandbox():
    """Programs may run subprocesses (tests harnesses do); they get the same namespaces and limits."""
    result = run("""
        import subprocess
        print(subprocess.run(["sh", "-c", "echo hi; touch /usr/from-shell || echo contained"],
                             capture_output=True, text=True).stdout, end="")
    """)
    assert result.passed and result.stdout == "hi\ncontained\n"


@needs_bwrap
def test_printing_a_gigabyte_stops_at_the_output_limit():
    result = run("""
        import sys
        chunk = "x" * 2**20
        for _ in range(1024):
            sys.stdout.write(chunk)
    """)
    assert result.status == "output_limit" and not result.passed
    assert len(result.stdout) == OUTPUT_LIMIT_BYTES and result.duration_s < 5


@needs_bwrap
def test_run_many_runs_concurrently():
    batch = run_many([f"print({i} * {i})" for i in range(8)], workers=4)
    print(f"{batch.executions_per_s:.1f} executions/s")
    assert [r.stdout for r in batch.results] == [f"{i * i}\n" for i in range(8)]
    assert all(r.passed for r in batch.results) and batch.executions_per_s > 0


def test_files_cannot_name_paths_outside_the_working_dir():
    for name in ["../escape.py", "/etc/passwd", "main.py"]:
        with pytest.raises(ValueError):
            run_python("", files={name: ""})


def test_refuses_without_bubblewrap_unless_told_unsafe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without bwrap
    monkeypatch.setattr(sandbox, "_warned_unsafe", False)
    sandbox.sandbox_unavailable_reason.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            run_python("print('hi')")
        with pytest.warns(RuntimeWarning, match="WITHOUT A SANDBOX"):
            result = run_python("import sys; print(sys.stdin.read() + open('f.txt').read())", stdin="a",
                                files={"f.txt": "b"}, unsafe_no_sandbox=True)
        assert result.passed and result.stdout == "ab\n"
    finally:
        sandbox.sandbox_unavailable_reason.cache_clear()
