"""Runs model-written Python where it can do no harm: bubblewrap namespaces plus rlimits.

Execution feedback and code rewards run untrusted programs, thousands of them, so each runs in
its own process under `bwrap` (never in the pipeline's own process):

- no network, IPC, UTS or cgroup sharing (`--unshare-all`), and its own user and PID
  namespaces: everything it forks dies with it, and it cannot nest further user namespaces;
- a read-only system: only /usr is bound (read-only; /lib, /lib64, /bin are symlinks into it,
  as on merged-/usr Debian), a fresh /proc and /dev, the root and /dev remounted read-only;
  none of the pipeline's files, /root, /work or the host's /tmp is visible (/dev/shm is
  read-only too, so multiprocessing's locks are unavailable);
- one writable place, the working directory /sandbox (also /tmp, a symlink): a private tmpfs
  capped at WORKDIR_BYTES, so no program can fill the host's disk; `files` are copied in first;
- an empty environment (`--clearenv`, then PATH, HOME and LANG only; bwrap itself is started
  with no environment either, so no secret is in any /proc/<pid>/environ it can see);
- rlimits set inside the sandbox by `prlimit` (CPU seconds, address space, processes, file
  size, no core files): counted in the sandbox's own user namespace, so the process cap is per
  run, not shared by concurrent runs;
- when the pipeline runs as root, bwrap runs as `nobody` (uid 65534, via `setpriv`): the kernel
  never enforces RLIMIT_NPROC for real uid 0, so a fork bomb would otherwise be bounded only by
  the timeout;
- a wall-clock limit (the process group is killed; the PID namespace takes the rest along) and
  stdout/stderr each capped at OUTPUT_LIMIT_BYTES, read as they come.

The interpreter inside is Debian's /usr/bin/python3 (its standard library and whatever python3-*
packages the machine has), not the pipeline's venv: the venv's interpreter lives under /root,
which `nobody` cannot read. Without /usr/bin/python3 the running interpreter is used, with its
prefix bound read-only (which only works where the sandbox user can read that prefix).
"""

from __future__ import annotations

import functools
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]

WORKDIR = "/sandbox"
PROGRAM = "main.py"
PROCESS_LIMIT = 64
FILE_SIZE_LIMIT_BYTES = 16 << 20
WORKDIR_BYTES = 64 << 20
OUTPUT_LIMIT_BYTES = 1 << 20
NOBODY = 65534
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8"}
_MEMORY_ERROR = re.compile(r"\bMemoryError\b|std::bad_alloc|Cannot allocate memory")
_READ_CHUNK = 1 << 16


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here; model-written code is refused rather than run uncontained."""


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `returncode` is negative for a signal (-9: killed by us; bwrap reports
    signal N as exit 128 + N, so under bwrap an exit status above 128 reads as a signal)."""

    status: Status
    returncode: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "ok" and self.returncode == 0


@dataclass(frozen=True)
class Program:
    """One job for `run_many`: the code, its stdin, and files placed beside it."""

    code: str
    stdin: str = ""
    files: Mapping[str, str] | None = None


@dataclass(frozen=True)
class BatchResult:
    """`run_many`'s results in input order, and the throughput the batch achieved."""

    results: list[SandboxResult]
    wall_s: float

    @property
    def executions_per_s(self) -> float:
        return len(self.results) / self.wall_s if self.wall_s > 0 else 0.0


def run_python(code: str, *, stdin: str = "", files: Mapping[str, str] | None = None, timeout_s: float = 10.0,
               memory_mb: int = 512, unsafe_no_sandbox: bool = False) -> SandboxResult:
    """Run `code` as `main.py` in a fresh sandbox, `files` (relative path -> text) beside it.

    Raises SandboxUnavailable where bubblewrap cannot run, unless `unsafe_no_sandbox`: then the
    program runs with the rlimits alone (as `nobody` if the pipeline is root) in a host temp dir,
    with the machine's network, files and processes in reach.
    """
    sources = {PROGRAM: code, **{_checked_name(name): text for name, text in (files or {}).items()}}
    problem = sandbox_unavailable_reason()
    if problem is None:
        return _run_sandboxed(sources, stdin, timeout_s, memory_mb)
    if not unsafe_no_sandbox:
        raise SandboxUnavailable(f"{problem}; install bubblewrap (apt-get install bubblewrap) "
                                 "or pass unsafe_no_sandbox=True to run model-written code uncontained")
    _warn_unsafe_once(problem)
    return _run_unsandboxed(sources, stdin, timeout_s, memory_mb)


def run_many(programs: Sequence[Program | str], *, workers: int, timeout_s: float = 10.0, memory_mb: int = 512,
             unsafe_no_sandbox: bool = False) -> BatchResult:
    """Run programs concurrently, `workers` at a time (threads waiting on sandboxes: size it to the cores)."""
    jobs = [Program(p) if isinstance(p, str) else p for p in programs]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: run_python(job.code, stdin=job.stdin, files=job.files,
                                                         timeout_s=timeout_s, memory_mb=memory_mb,
                                                         unsafe_no_sandbox=unsafe_no_sandbox), jobs))
    return BatchResult(results, time.monotonic() - start)


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """Why the sandbox cannot run here (None: it can); checked once per process by running a program in it."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = _run_sandboxed({PROGRAM: "print('sandbox ok')"}, "", timeout_s=30.0, memory_mb=256)
    if probe.passed and probe.stdout == "sandbox ok\n":
        return None
    return f"the bubblewrap self-test failed ({probe.status}, exit {probe.returncode}): {probe.stderr.strip()[-500:]}"


def sandbox_interpreter() -> tuple[str, list[str]]:
    """(interpreter to run inside, host directories it needs bound read-only besides /usr)."""
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3", []
    prefix = os.path.realpath(sys.base_prefix)
    return os.path.realpath(sys.executable), [] if prefix.startswith("/usr/") else [prefix]


def _run_sandboxed(sources: Mapping[str, str], stdin: str, timeout_s: float, memory_mb: int) -> SandboxResult:
    interpreter, extra_binds = sandbox_interpreter()
    fds = [_memfd(text) for text in sources.values()]
    try:
        command = [
            "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            *[arg for prefix in extra_binds for arg in ("--ro-bind", prefix, prefix)],
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(WORKDIR_BYTES), "--tmpfs", WORKDIR, "--symlink", WORKDIR.lstrip("/"), "/tmp",
            *[arg for fd, name in zip(fds, sources) for arg in ("--file", str(fd), f"{WORKDIR}/{name}")],
            "--remount-ro", "/", "--remount-ro", "/dev",
            "--chdir", WORKDIR, "--clearenv",
            *[arg for key, value in SANDBOX_ENV.items() for arg in ("--setenv", key, value)],
            "--", *_limits(timeout_s, memory_mb), interpreter, "-B", PROGRAM,
        ]
        # bwrap reports a program killed by signal N as exit 128 + N.
        return _execute(command, stdin, timeout_s, cwd=None, pass_fds=fds, signal_exit_base=128)
    finally:
        for fd in fds:
            os.close(fd)


def _run_unsandboxed(sources: Mapping[str, str], stdin: str, timeout_s: float, memory_mb: int) -> SandboxResult:
    interpreter, _ = sandbox_interpreter()
    with tempfile.TemporaryDirectory(prefix="sandbox-unsafe-") as workdir:
        for name, text in sources.items():
            path = Path(workdir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if (user := _sandbox_user()) is not None:
            for path in [Path(workdir), *Path(workdir).rglob("*")]:
                os.chown(path, user, user)
        command = [*_limits(timeout_s, memory_mb), interpreter, "-B", PROGRAM]
        return _execute(command, stdin, timeout_s, cwd=workdir, pass_fds=[], signal_exit_base=None)


def _limits(timeout_s: float, memory_mb: int) -> list[str]:
    """`prlimit` prefix setting soft and hard limits alike, so the program cannot raise them."""
    return ["prlimit", f"--cpu={math.ceil(timeout_s)}", f"--as={memory_mb << 20}", f"--nproc={PROCESS_LIMIT}",
            f"--fsize={FILE_SIZE_LIMIT_BYTES}", "--core=0", "--"]


def _execute(command: list[str], stdin: str, timeout_s: float, *, cwd: str | None, pass_fds: list[int],
             signal_exit_base: int | None) -> SandboxResult:
    """Start `command` in its own process group; collect capped output until exit, the deadline or the cap."""
    if (user := _sandbox_user()) is not None:
        # setpriv rather than Popen(user=...), which rules out vfork: forking a pipeline process that
        # holds GBs costs ~50 ms per GiB (155 ms vs 4 ms per start with 3 GiB resident).
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    stdin_fd = _memfd(stdin)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            command, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
            env={**SANDBOX_ENV, "HOME": cwd or WORKDIR}, pass_fds=pass_fds, start_new_session=True,
        )
    finally:
        os.close(stdin_fd)
    with proc:
        stdout, stderr, stopped_for = _collect(proc, start + timeout_s)
        if stopped_for is None:
            try:
                proc.wait(timeout=max(start + timeout_s - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                stopped_for = "timeout"
        if stopped_for is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # before reaping, so the group id cannot have been reused
        returncode = proc.wait()
    if signal_exit_base is not None and returncode > signal_exit_base:
        returncode = signal_exit_base - returncode
    err_text = stderr.decode(errors="replace")
    return SandboxResult(stopped_for or _status(returncode, err_text), returncode,
                         stdout.decode(errors="replace"), err_text, time.monotonic() - start)


def _collect(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, Status | None]:
    """Read both pipes as data comes; stop at EOF on both, at the deadline, or once one passes the cap."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    stopped_for: Status | None = None
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and stopped_for is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped_for = "timeout"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                buffer += chunk
                if len(buffer) > OUTPUT_LIMIT_BYTES:
                    del buffer[OUTPUT_LIMIT_BYTES:]
                    stopped_for = "output_limit"
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), stopped_for


def _status(returncode: int, stderr: str) -> Status:
    if returncode == 0:
        return "ok"
    if returncode == -signal.SIGXCPU:  # the CPU-seconds rlimit
        return "timeout"
    return "memory" if _MEMORY_ERROR.search(stderr) else "error"


def _sandbox_user() -> int | None:
    """The uid to run as: `nobody` when the pipeline is root (RLIMIT_NPROC is never enforced for uid 0), else ours."""
    return NOBODY if os.geteuid() == 0 else None


def _memfd(text: str) -> int:
    """An anonymous in-memory file holding `text`, positioned at its start (never touches the disk)."""
    fd = os.memfd_create("sandbox")
    with open(fd, "wb", closefd=False) as file:
        file.write(text.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _checked_name(name: str) -> str:
    """A `files` key as a path inside the working directory; anything that would leave it is refused."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == PROGRAM:
        raise ValueError(f"files: {name!r} must be a relative path inside the working directory, not {PROGRAM}")
    return str(path)


_warned_unsafe = False


def _warn_unsafe_once(problem: str) -> None:
    global _warned_unsafe
    if not _warned_unsafe:
        _warned_unsafe = True
        warnings.warn(f"RUNNING MODEL-WRITTEN CODE WITHOUT A SANDBOX ({problem}): rlimits only, with this "
                      "machine's network, files and processes in reach", RuntimeWarning, stacklevel=3)
