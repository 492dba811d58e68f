"""The sandbox against what model-written code might do: real bubblewrap, real processes, no mocks.

Each escape attempt is its own test and prints the status the sandbox gave it (`pytest -s`)."""

from __future__ import annotations

import platform
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
from reward.sandbox import (OPEN_FILE_LIMIT, OUTPUT_LIMIT_BYTES, Protections, SandboxResult, SandboxSpec,
                            SandboxUnavailable, check_sandbox, run_many, run_python)

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
    monkeypatch.setattr(sandbox, "_warned", set())
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


# Attaches to the sandbox's PID 1 with ptrace and makes it clear its own parent-death signal (prctl run by
# single-stepping its syscall instruction with our registers), so that killing bwrap no longer ends the
# namespace; when the program itself is PID 1, it clears its own. Then it leaves a sleeper and sleeps.
ESCAPE = r"""
import ctypes, os, subprocess, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PEEKTEXT, SINGLESTEP, GETREGS, SETREGS, ATTACH, DETACH, ALL_CHILDREN = 1, 9, 12, 13, 16, 17, 0x40000000
PR_SET_PDEATHSIG, SYS_PRCTL = 1, 157

class Registers(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss fs_base "
        "gs_base ds es fs gs").split()]

def clear_parent_death_signal_of(pid):
    if libc.ptrace(ATTACH, pid, None, None) != 0:
        return f"ptrace refused, errno {ctypes.get_errno()}"
    os.waitpid(pid, ALL_CHILDREN)
    saved = Registers()
    libc.ptrace(GETREGS, pid, None, ctypes.byref(saved))
    if libc.ptrace(PEEKTEXT, pid, ctypes.c_void_p(saved.rip - 2), None) & 0xFFFF != 0x050F:
        libc.ptrace(DETACH, pid, None, None)
        return "not stopped after a syscall instruction"
    regs = Registers.from_buffer_copy(saved)
    regs.rip, regs.rax, regs.orig_rax, regs.rdi, regs.rsi = saved.rip - 2, SYS_PRCTL, 2**64 - 1, PR_SET_PDEATHSIG, 0
    libc.ptrace(SETREGS, pid, None, ctypes.byref(regs))
    libc.ptrace(SINGLESTEP, pid, None, None)
    os.waitpid(pid, ALL_CHILDREN)
    libc.ptrace(SETREGS, pid, None, ctypes.byref(saved))
    libc.ptrace(DETACH, pid, None, None)
    return "cleared by ptrace"

if os.getpid() == 1:
    print("PID 1 clears its own:", libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0), flush=True)
    with subprocess.Popen(["python3", "-c", "import os; os.kill(os.getpid(), 19)"]) as child:
        pass
else:
    print(clear_parent_death_signal_of(1), flush=True)
subprocess.Popen(["sh", "-c", "sleep 300", "MARKER"])
time.sleep(300)
"""


def sandbox_processes() -> list[str]:
    """Processes of any sandbox still running: bwrap and everything run as the sandbox user."""
    users = ["-u", str(sandbox.NOBODY)] if sandbox._sandbox_user() is not None else []
    return subprocess.run(["pgrep", *users, "-f", "bwrap|sandbox-test"], capture_output=True, text=True).stdout.split()


@needs_bwrap
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the escape's ptrace registers are x86_64's")
def test_a_program_that_detaches_the_sandbox_init_leaves_no_process():
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    result = run(ESCAPE.replace("MARKER", marker), timeout_s=3.0)
    assert result.status == "timeout" and ("ptrace refused, errno 1" in result.stdout or "PID 1" in result.stdout)
    assert wait_until(lambda: not processes_with(marker), 2.0), f"left over: {processes_with(marker)}"
    assert wait_until(lambda: not sandbox_processes(), 2.0), f"left over: {sandbox_processes()}"


@needs_bwrap
def test_seccomp_refuses_reaching_into_other_processes():
    result = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print("ptrace", libc.ptrace(0, 0, None, None), ctypes.get_errno())  # PTRACE_TRACEME
        print("process_vm_readv", libc.process_vm_readv(1, None, 0, None, 0, 0), ctypes.get_errno())
        print("seccomp mode", libc.prctl(21, 0, 0, 0, 0))  # PR_GET_SECCOMP: 2 is a filter
        print("proc", os.path.exists("/proc/1"), os.path.exists("/proc/self/mem"))
    """)
    assert result.passed and result.stdout == "ptrace -1 1\nprocess_vm_readv -1 1\nseccomp mode 2\nproc False False\n"


@needs_bwrap
def test_memfd_bomb_is_memory_and_host_shared_memory_comes_back():
    def shared_kib() -> int:
        return int(next(line for line in open("/proc/meminfo") if line.startswith("Shmem:")).split()[1])

    before = shared_kib()
    result = run("""
        import os
        held = []
        for _ in range(24):
            fd = os.memfd_create("bomb")
            os.write(fd, b"x" * (16 << 20))
            held.append(fd)
        print("wrote", len(held) * 16, "MiB")
    """, memory_mb=128)
    assert result.status == "memory" and "wrote" not in result.stdout
    assert shared_kib() - before < 16 << 10  # KiB: what other processes did meanwhile, not the bomb's 384 MiB


@needs_bwrap
def test_open_files_are_limited():
    result = run("""
        import os
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as error:
            print(len(fds) + 3, error.strerror)
    """)
    assert result.passed and result.stdout == f"{OPEN_FILE_LIMIT} Too many open files\n"


@needs_bwrap
def test_each_run_has_its_own_cgroup_removed_after_it():
    parents = sandbox.protections().cgroups
    if parents is None:
        pytest.skip(f"no cgroup here: {sandbox.sandbox_weaknesses()}")

    def run_cgroups() -> set[Path]:
        return {path for parent in {parents.memory, parents.pids} for path in parent.glob("qwen2-sandbox-*")}

    before = run_cgroups()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run, "import time; time.sleep(2)")
        assert wait_until(lambda: any((path / "cgroup.procs").read_text().strip() for path in run_cgroups() - before),
                          2.0), "no cgroup of the run held its processes"
        assert running.result().passed
    assert run_cgroups() == before


def test_a_machine_without_cgroups_is_refused_unless_the_recipe_accepts_it(monkeypatch: pytest.MonkeyPatch):
    weak = Protections(None, sandbox.protections().seccomp, ("no cgroup for each run (test)",))
    monkeypatch.setattr(sandbox, "protections", lambda: weak)
    monkeypatch.setattr(sandbox, "_warned", set())
    refusal = check_sandbox(SandboxSpec())
    assert refusal and "no cgroup for each run (test)" in refusal and "accept_weaker: true" in refusal
    assert "\n" not in refusal
    if sandbox.sandbox_unavailable_reason() is not None:
        return
    with pytest.raises(SandboxUnavailable, match="weaker than required"):
        run_python("print('hi')")
    assert check_sandbox(SandboxSpec(accept_weaker=True)) is None
    with pytest.warns(RuntimeWarning, match="weaker sandbox: no cgroup"):
        result = run_python("print('hi')", accept_weaker=True)
    assert result.passed and result.stdout == "hi\n"
    # the address-space limit stands in for the cgroup
    assert run("bytearray(300 << 20)", memory_mb=256, accept_weaker=True).status == "memory"
