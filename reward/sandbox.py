"""Runs model-written Python where it can do no harm: bubblewrap namespaces, a seccomp filter, a cgroup, rlimits.

Execution feedback and code rewards run untrusted programs, thousands of them, so each runs in
its own process under `bwrap` (never in the pipeline's own process):

- no network, IPC, UTS or cgroup sharing (`--unshare-all`), and its own user and PID
  namespaces; the program is the namespace's PID 1 (`--as-pid-1`), so when it exits, everything it
  forked dies with it, and it cannot nest further user namespaces;
- every run ends whatever the program does: bwrap's `--info-fd` names the program's host PID, a pidfd
  to it is kept, and SIGKILL goes to it on every exit path, which ends its PID namespace with every
  process in it (a program that clears its own parent-death signal does not outlive its run); until it
  is in the run's cgroup it waits on `--block-fd`, so none of the program runs outside the cgroup;
- a seccomp filter (`--seccomp`) answers EPERM to ptrace, process_vm_readv/writev and the other calls
  that reach into other processes or the kernel's shared state (`SECCOMP_REFUSED`), and kills a process
  that calls through another architecture's table (32-bit or x32 syscalls on x86_64);
- memory counted as the kernel counts it: each run gets its own cgroup (v1 `memory` and `pids`
  hierarchies, or v2 with both controllers delegated) holding RAM, page cache, tmpfs and memfd pages
  under `memory_mb` and processes under PROCESS_LIMIT; a run the kernel's OOM killer ended reports
  status `memory`. Without a usable cgroup the address-space rlimit stands in (it does not count memfds
  or tmpfs), and the sandbox refuses to run unless told to accept the weaker sandbox (`sandbox_weaknesses`);
- a read-only system: only /usr is bound (read-only; /lib, /lib64, /bin are symlinks into it,
  as on merged-/usr Debian), and of /dev only the data devices (DEVICES); no /proc, so nothing of
  another process (its memory, descriptors, environment) is reachable by path; the root is remounted
  read-only; none of the pipeline's files, /root, /work or the host's /tmp is visible (and no /dev/shm,
  so multiprocessing's locks are unavailable);
- one writable place, the working directory /sandbox (also /tmp, a symlink): a private tmpfs
  capped at WORKDIR_BYTES, so no program can fill the host's disk; `files` are copied in first;
- an empty environment (`--clearenv`, then PATH, HOME and LANG only; bwrap itself is started
  with no environment either, so no secret is in any /proc/<pid>/environ it can see);
- rlimits set inside the sandbox by `prlimit` (CPU seconds, processes, open files, file size, no
  core files): counted in the sandbox's own user namespace, so the process cap is per run;
- when the pipeline runs as root, bwrap runs as `nobody` (uid 65534, via `setpriv`): the kernel
  never enforces RLIMIT_NPROC for real uid 0, so a fork bomb would otherwise be bounded only by
  the timeout;
- a wall-clock limit and stdout/stderr each capped at OUTPUT_LIMIT_BYTES, read as they come.

The interpreter inside is Debian's /usr/bin/python3 (its standard library and whatever python3-*
packages the machine has), not the pipeline's venv: the venv's interpreter lives under /root,
which `nobody` cannot read. Without /usr/bin/python3 the running interpreter is used, with its
prefix bound read-only (which only works where the sandbox user can read that prefix).
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import platform
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "output_limit"]

WORKDIR = "/sandbox"
PROGRAM = "main.py"
PROCESS_LIMIT = 64
OPEN_FILE_LIMIT = 256
FILE_SIZE_LIMIT_BYTES = 16 << 20
WORKDIR_BYTES = 64 << 20
OUTPUT_LIMIT_BYTES = 1 << 20
NOBODY = 65534
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")  # bwrap's --dev costs 1 ms a run
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8"}
_MEMORY_ERROR = re.compile(r"\bMemoryError\b|std::bad_alloc|Cannot allocate memory")
_READ_CHUNK = 1 << 16

# Calls that reach into other processes (ptrace, their memory, their descriptors) or into kernel state
# shared beyond the sandbox (keyrings, BPF, perf, userfaultfd, io_uring): refused with EPERM.
SECCOMP_REFUSED = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "perf_event_open",
                   "bpf", "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
                   "io_uring_register")
# machine -> (AUDIT_ARCH_*, the refused calls' numbers in that architecture's table)
_SYSCALL_TABLES = {
    "x86_64": (0xC000003E, {"ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
                            "kcmp": 312, "perf_event_open": 298, "bpf": 321, "userfaultfd": 323, "keyctl": 250,
                            "add_key": 248, "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
                            "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {"ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438,
                             "kcmp": 272, "perf_event_open": 241, "bpf": 280, "userfaultfd": 282, "keyctl": 219,
                             "add_key": 217, "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427}),
}
_X32_SYSCALL_BIT = 0x40000000


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (or only weaker than required); model-written code is refused."""


@dataclass(frozen=True)
class SandboxSpec:
    """How model-written code runs (the `sandbox:` block of the recipes that run it)."""

    timeout_s: float = 10.0  # wall clock per program (constraint checkers: per checker)
    memory_mb: int = 512  # per program, counted by its cgroup (address space where no cgroup is usable)
    workers: int = 2  # sandboxes at once (size it to the cores)
    accept_weaker: bool = False  # run where cgroups or seccomp are missing (sandbox_weaknesses), said once

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `returncode` is negative for a signal (-9: killed by us or the OOM killer; bwrap
    reports signal N as exit 128 + N, so under bwrap an exit status above 128 reads as a signal)."""

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
    """One job for `run_many`: the code, its stdin, and files (text or bytes) placed beside it."""

    code: str
    stdin: str = ""
    files: Mapping[str, str | bytes] | None = None
    site: bool = True  # False: the interpreter starts without the site module (-S), for runners that set sys.path


@dataclass(frozen=True)
class BatchResult:
    """`run_many`'s results in input order, and the throughput the batch achieved."""

    results: list[SandboxResult]
    wall_s: float

    @property
    def executions_per_s(self) -> float:
        return len(self.results) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class CgroupParents:
    """Where each run's cgroup is made: the directory under which `memory` and `pids` children go (the same
    directory for cgroup v2 or co-mounted v1 controllers)."""

    version: Literal[1, 2]
    memory: Path
    pids: Path


@dataclass(frozen=True)
class Protections:
    """What the sandbox enforces on this machine beyond bubblewrap, found once per process."""

    cgroups: CgroupParents | None
    seccomp: bytes | None  # the compiled filter, for bwrap --seccomp
    weaknesses: tuple[str, ...]  # one line per protection this machine lacks


def run_python(code: str, *, stdin: str = "", files: Mapping[str, str | bytes] | None = None, site: bool = True,
               timeout_s: float = 10.0, memory_mb: int = 512, accept_weaker: bool = False,
               unsafe_no_sandbox: bool = False) -> SandboxResult:
    """Run `code` as `main.py` in a fresh sandbox, `files` (relative path -> text or bytes) beside it.

    Raises SandboxUnavailable where bubblewrap cannot run, unless `unsafe_no_sandbox`: then the
    program runs with the rlimits alone (as `nobody` if the pipeline is root) in a host temp dir,
    with the machine's network, files and processes in reach. Where bubblewrap runs but a protection is
    missing (`sandbox_weaknesses`), raises SandboxUnavailable unless `accept_weaker`.
    """
    sources = {PROGRAM: code, **{_checked_name(name): text for name, text in (files or {}).items()}}
    problem = sandbox_unavailable_reason()
    if problem is None:
        weaknesses = sandbox_weaknesses()
        if weaknesses and not accept_weaker:
            raise SandboxUnavailable(weaker_sandbox_refusal(weaknesses))
        if weaknesses:
            _warn_once(f"running model-written code in a weaker sandbox: {'; '.join(weaknesses)}")
        return _run_sandboxed(sources, stdin, site, timeout_s, memory_mb)
    if not unsafe_no_sandbox:
        raise SandboxUnavailable(f"{problem}; install bubblewrap (apt-get install bubblewrap) "
                                 "or pass unsafe_no_sandbox=True to run model-written code uncontained")
    _warn_once(f"RUNNING MODEL-WRITTEN CODE WITHOUT A SANDBOX ({problem}): rlimits only, with this "
               "machine's network, files and processes in reach")
    return _run_unsandboxed(sources, stdin, site, timeout_s, memory_mb)


def run_many(programs: Sequence[Program | str], *, workers: int, timeout_s: float = 10.0, memory_mb: int = 512,
             accept_weaker: bool = False, unsafe_no_sandbox: bool = False) -> BatchResult:
    """Run programs concurrently, `workers` at a time (threads waiting on sandboxes: size it to the cores)."""
    jobs = [Program(p) if isinstance(p, str) else p for p in programs]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: run_python(job.code, stdin=job.stdin, files=job.files, site=job.site,
                                                         timeout_s=timeout_s, memory_mb=memory_mb,
                                                         accept_weaker=accept_weaker,
                                                         unsafe_no_sandbox=unsafe_no_sandbox), jobs))
    return BatchResult(results, time.monotonic() - start)


def check_sandbox(spec: SandboxSpec) -> str | None:
    """Why model-written code cannot run under `spec` here (None: it can); stages ask before loading a model."""
    if (problem := sandbox_unavailable_reason()) is not None:
        return f"{problem}; install bubblewrap (apt-get install bubblewrap)"
    if (weaknesses := sandbox_weaknesses()) and not spec.accept_weaker:
        return weaker_sandbox_refusal(weaknesses)
    return None


def weaker_sandbox_refusal(weaknesses: Sequence[str]) -> str:
    return (f"the sandbox here is weaker than required ({'; '.join(weaknesses)}); set `sandbox: {{accept_weaker: "
            "true}` in the recipe to run model-written code anyway")


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """Why the sandbox cannot run here (None: it can); checked once per process by running a program in it."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = _run_sandboxed({PROGRAM: "print('sandbox ok')"}, "", True, timeout_s=30.0, memory_mb=256)
    if probe.passed and probe.stdout == "sandbox ok\n":
        return None
    return f"the bubblewrap self-test failed ({probe.status}, exit {probe.returncode}): {probe.stderr.strip()[-500:]}"


def sandbox_weaknesses() -> tuple[str, ...]:
    """The protections this machine cannot give (empty: all of them), one line each."""
    return protections().weaknesses


@functools.cache
def protections() -> Protections:
    cgroups, cgroup_problem = _cgroup_parents()
    seccomp, seccomp_problem = _seccomp_filter(platform.machine())
    weaknesses = tuple(problem for problem in (cgroup_problem, seccomp_problem) if problem)
    return Protections(cgroups, seccomp, weaknesses)


def sandbox_interpreter() -> tuple[str, list[str]]:
    """(interpreter to run inside, host directories it needs bound read-only besides /usr)."""
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3", []
    prefix = os.path.realpath(sys.base_prefix)
    return os.path.realpath(sys.executable), [] if prefix.startswith("/usr/") else [prefix]


def _seccomp_filter(machine: str) -> tuple[bytes | None, str | None]:
    """A classic-BPF seccomp program refusing SECCOMP_REFUSED with EPERM, or why there is none for `machine`."""
    if machine not in _SYSCALL_TABLES:
        return None, f"no seccomp filter for {machine} (ptrace and process_vm_* are not refused)"
    audit_arch, numbers = _SYSCALL_TABLES[machine]
    load_arch, load_nr = (0x20, 0, 0, 4), (0x20, 0, 0, 0)  # BPF_LD|BPF_W|BPF_ABS: seccomp_data.arch / .nr
    allow, refuse, kill = (0x06, 0, 0, 0x7FFF0000), (0x06, 0, 0, 0x00050000 | errno.EPERM), (0x06, 0, 0, 0x80000000)
    refused = [numbers[name] for name in SECCOMP_REFUSED]
    program = [load_arch, (0x15, 1, 0, audit_arch), kill, load_nr]  # BPF_JEQ: another ABI's table is killed
    if machine == "x86_64":  # x32 calls carry this bit: refuse them all (BPF_JGE)
        program.append((0x35, len(refused) + 1, 0, _X32_SYSCALL_BIT))
    # each BPF_JEQ jumps over the rest of the list and the allow to land on refuse
    program += [(0x15, len(refused) - i, 0, number) for i, number in enumerate(refused)]
    program += [allow, refuse]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program), None


def _cgroup_parents() -> tuple[CgroupParents | None, str | None]:
    """The cgroup directories this process may make children in, with `memory` and `pids` control; else why not."""
    try:
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
        mounts: dict[str, tuple[str, str]] = {}  # controller ("" for v2) -> (mount point, root in the hierarchy)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields, _, tail = line.partition(" - ")
            fstype, _, options = tail.split(" ")[:3]
            root, mount_point = fields.split(" ")[3:5]
            if fstype == "cgroup":
                for controller in ("memory", "pids"):
                    if controller in options.split(","):
                        mounts.setdefault(controller, (mount_point, root))
            elif fstype == "cgroup2":
                mounts.setdefault("", (mount_point, root))
    except (OSError, ValueError) as e:
        return None, f"no cgroup information ({e}): memory is capped by address space only"

    def directory(controller: str) -> Path:
        mount_point, root = mounts[controller]
        return Path(mount_point, os.path.relpath(own[controller], root).removeprefix("."))

    reasons = []
    if all(c in mounts and c in own for c in ("memory", "pids")):
        parents = CgroupParents(1, directory("memory"), directory("pids"))
        if (problem := _probe_cgroup(parents)) is None:
            return parents, None
        reasons.append(f"cgroup v1: {problem}")
    if "" in mounts and "" in own:
        parent = directory("")
        enabled = _read(parent / "cgroup.subtree_control").split()
        if {"memory", "pids"} <= set(enabled):
            parents = CgroupParents(2, parent, parent)
            if (problem := _probe_cgroup(parents)) is None:
                return parents, None
            reasons.append(f"cgroup v2: {problem}")
        else:
            reasons.append(f"cgroup v2: memory and pids are not delegated to {parent} (cgroup.subtree_control: "
                           f"{' '.join(enabled) or 'empty'})")
    reasons = reasons or ["no cgroup memory and pids hierarchies are mounted"]
    return None, (f"no cgroup for each run ({'; '.join(reasons)}): memory is capped by address space only, which "
                  "memfds and tmpfs escape, and processes by RLIMIT_NPROC only")


def _probe_cgroup(parents: CgroupParents) -> str | None:
    try:
        _RunCgroup(parents, 64).remove()
    except OSError as e:
        return f"{e.filename}: {e.strerror}"
    return None


class _RunCgroup:
    """One run's cgroup: made with its limits before the run, joined by the sandbox's PID 1 before it runs the
    program, read for OOM kills after it, then removed."""

    def __init__(self, parents: CgroupParents, memory_mb: int) -> None:
        self.version = parents.version
        name = f"qwen2-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.memory, self.pids = parents.memory / name, parents.pids / name
        self.directories = list(dict.fromkeys([self.memory, self.pids]))
        made = []
        try:
            for path in self.directories:
                path.mkdir()
                made.append(path)
            limit = str(memory_mb << 20)
            if self.version == 1:
                _write(self.memory / "memory.limit_in_bytes", limit)
                if (self.memory / "memory.memsw.limit_in_bytes").exists():  # swap counted too, where accounted
                    _write(self.memory / "memory.memsw.limit_in_bytes", limit)
            else:
                _write(self.memory / "memory.max", limit)
                if (self.memory / "memory.swap.max").exists():
                    _write(self.memory / "memory.swap.max", "0")
            _write(self.pids / "pids.max", str(PROCESS_LIMIT))
        except OSError:
            for path in reversed(made):
                path.rmdir()
            raise

    def join(self, pid: int) -> bool:
        """Move `pid` (the sandbox's PID 1, still waiting on its gate) into every hierarchy of this cgroup."""
        try:
            for path in self.directories:
                _write(path / "cgroup.procs", str(pid))
        except OSError:
            return False
        return True

    def oom_killed(self) -> bool:
        if self.version == 2:
            return _counter(_read(self.memory / "memory.events"), "oom_kill") > 0
        control = _read(self.memory / "memory.oom_control")
        if "oom_kill " in control:
            return _counter(control, "oom_kill") > 0
        return int(_read(self.memory / "memory.failcnt") or 0) > 0  # kernels before 4.13

    def remove(self) -> None:
        """Remove the directories; the run's processes are gone by now, though the kernel may take a moment."""
        for path in self.directories:
            for attempt in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or attempt == 49:
                        raise
                    time.sleep(0.01)


class _FastMigrations:
    """Moving a process into a cgroup takes the kernel's cgroup_threadgroup_rwsem for writing, which first waits for
    an RCU grace period unless another migration came within one (a lone `cgroup.procs` write took 5-20 ms here).
    While runs start, a thread writes this process's pid into its own cgroup (a migration that moves nothing)
    whenever no run has migrated for INTERVAL_S, so each run's migration takes the fast path (a `print(1)` run:
    34-36 ms with it, 37-40 ms without, medians of 40); it stops LINGER_S after the last run."""

    INTERVAL_S = 0.003
    LINGER_S = 0.2

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_use = self.last_migration = 0.0
        self.thread: threading.Thread | None = None

    def touch(self, own_procs: Path) -> None:
        with self.lock:
            self.last_use = time.monotonic()
            if self.thread is None:
                self.thread = threading.Thread(target=self._keep_warm, args=(own_procs,), daemon=True)
                self.thread.start()

    def migrated(self) -> None:
        """A run's process was moved: the path is warm for another INTERVAL_S without the thread's help."""
        self.last_migration = time.monotonic()

    def _keep_warm(self, own_procs: Path) -> None:
        pid = str(os.getpid()).encode()
        try:
            with open(own_procs, "wb", buffering=0) as procs:
                while True:
                    with self.lock:
                        if time.monotonic() - self.last_use > self.LINGER_S:
                            self.thread = None
                            return
                    if (idle := time.monotonic() - self.last_migration) >= self.INTERVAL_S:
                        procs.write(pid)
                        self.migrated()
                        idle = 0.0
                    time.sleep(self.INTERVAL_S - idle)
        except OSError:
            with self.lock:  # the thread is an optimisation: where the write is refused, runs pay the wait
                self.thread = None


_fast_migrations = _FastMigrations()


def _run_sandboxed(sources: Mapping[str, str | bytes], stdin: str, site: bool, timeout_s: float, memory_mb: int
                   ) -> SandboxResult:
    interpreter, extra_binds = sandbox_interpreter()
    guard = protections()
    fds = [_memfd(text.encode() if isinstance(text, str) else text) for text in sources.values()]
    seccomp = [_memfd(guard.seccomp)] if guard.seccomp is not None else []
    info_read, info_write = os.pipe()
    gate_read, gate_write = os.pipe()
    cgroup = _RunCgroup(guard.cgroups, memory_mb) if guard.cgroups is not None else None
    if guard.cgroups is not None:
        _fast_migrations.touch(guard.cgroups.pids / "cgroup.procs")
    try:
        command = [
            "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--as-pid-1", "--info-fd", str(info_write), "--block-fd", str(gate_read),
            *[arg for fd in seccomp for arg in ("--seccomp", str(fd))],
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            *[arg for prefix in extra_binds for arg in ("--ro-bind", prefix, prefix)],
            *[arg for device in DEVICES for arg in ("--dev-bind", device, device)],
            "--size", str(WORKDIR_BYTES), "--tmpfs", WORKDIR, "--symlink", WORKDIR.lstrip("/"), "/tmp",
            *[arg for fd, name in zip(fds, sources) for arg in ("--file", str(fd), f"{WORKDIR}/{name}")],
            "--remount-ro", "/",
            "--chdir", WORKDIR, "--clearenv",
            *[arg for key, value in SANDBOX_ENV.items() for arg in ("--setenv", key, value)],
            "--", *_limits(timeout_s, None if cgroup else memory_mb), *_python(interpreter, site),
        ]
        # bwrap reports a program killed by signal N as exit 128 + N.
        result = _execute(command, stdin, timeout_s, cwd=None, pass_fds=[*fds, *seccomp, info_write, gate_read],
                          signal_exit_base=128, launch=_Launch(info_read, info_write, gate_read, gate_write, cgroup))
        if cgroup is not None and not result.passed and result.status != "timeout" and cgroup.oom_killed():
            result = replace(result, status="memory")
        return result
    finally:
        for fd in [*fds, *seccomp, info_read]:
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()


def _run_unsandboxed(sources: Mapping[str, str | bytes], stdin: str, site: bool, timeout_s: float, memory_mb: int
                     ) -> SandboxResult:
    interpreter, _ = sandbox_interpreter()
    with tempfile.TemporaryDirectory(prefix="sandbox-unsafe-") as workdir:
        for name, text in sources.items():
            path = Path(workdir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode() if isinstance(text, str) else text)
        if (user := _sandbox_user()) is not None:
            for path in [Path(workdir), *Path(workdir).rglob("*")]:
                os.chown(path, user, user)
        command = [*_limits(timeout_s, memory_mb), *_python(interpreter, site)]
        return _execute(command, stdin, timeout_s, cwd=workdir, pass_fds=[], signal_exit_base=None)


def _python(interpreter: str, site: bool) -> list[str]:
    return [interpreter, "-B", *([] if site else ["-S"]), PROGRAM]


def _limits(timeout_s: float, address_space_mb: int | None) -> list[str]:
    """`prlimit` prefix setting soft and hard limits alike, so the program cannot raise them; the address space
    is limited only where no cgroup counts the memory."""
    address_space = [f"--as={address_space_mb << 20}"] if address_space_mb is not None else []
    return ["prlimit", f"--cpu={math.ceil(timeout_s)}", *address_space, f"--nproc={PROCESS_LIMIT}",
            f"--nofile={OPEN_FILE_LIMIT}", f"--fsize={FILE_SIZE_LIMIT_BYTES}", "--core=0", "--"]


@dataclass(frozen=True)
class _Launch:
    """How one bwrap start is watched: bwrap names its PID 1 on the info pipe; that process waits on the gate
    (`--block-fd`) until it is in the run's cgroup, so nothing of the program runs outside it."""

    info_read: int
    info_write: int
    gate_read: int
    gate_write: int
    cgroup: _RunCgroup | None


def _execute(command: list[str], stdin: str, timeout_s: float, *, cwd: str | None, pass_fds: list[int],
             signal_exit_base: int | None, launch: _Launch | None = None) -> SandboxResult:
    """Start `command` in its own process group; collect capped output until exit, the deadline or the cap.
    Under bwrap (`launch`), the sandbox's PID 1 is killed on every way out, which ends its namespace."""
    if (user := _sandbox_user()) is not None:
        # setpriv rather than Popen(user=...), which rules out vfork: forking a pipeline process that
        # holds GBs costs ~50 ms per GiB (155 ms vs 4 ms per start with 3 GiB resident).
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    stdin_fd = _memfd(stdin.encode())
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            command, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
            env={**SANDBOX_ENV, "HOME": cwd or WORKDIR}, pass_fds=pass_fds, start_new_session=True,
        )
    finally:
        os.close(stdin_fd)
        if launch is not None:
            os.close(launch.info_write)
            os.close(launch.gate_read)
    with proc:
        sandbox_init: int | None = None
        stopped_for: Status | None = None
        try:
            if launch is not None:
                sandbox_init, admitted = _admit(proc, launch, start + timeout_s)
                if not admitted:  # bwrap's PID 1 still waits on the gate: it dies with bwrap, having run nothing
                    os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr, stopped_for = _collect(proc, start + timeout_s)
            if stopped_for is None:
                try:
                    proc.wait(timeout=max(start + timeout_s - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    stopped_for = "timeout"
        finally:
            if launch is not None:
                os.close(launch.gate_write)
            if sandbox_init is not None:
                _kill_pidfd(sandbox_init)
            if stopped_for is not None or proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # before reaping, so the group id cannot have been reused
            returncode = proc.wait()
    if signal_exit_base is not None and returncode > signal_exit_base:
        returncode = signal_exit_base - returncode
    err_text = stderr.decode(errors="replace")
    return SandboxResult(stopped_for or _status(returncode, err_text), returncode,
                         stdout.decode(errors="replace"), err_text, time.monotonic() - start)


def _admit(proc: subprocess.Popen, launch: _Launch, deadline: float) -> tuple[int | None, bool]:
    """(a pidfd to the sandbox's PID 1, whether it was let through the gate): let through only once it is known
    and in the run's cgroup."""
    found = _sandbox_init(proc, launch.info_read, deadline)
    if found is None:
        return None, False
    pidfd, pid = found
    if launch.cgroup is not None:
        if not launch.cgroup.join(pid):
            return pidfd, False
        _fast_migrations.migrated()
    os.write(launch.gate_write, b"go")
    return pidfd, True


def _sandbox_init(proc: subprocess.Popen, info_fd: int, deadline: float) -> tuple[int, int] | None:
    """(a pidfd to, the pid of) the sandbox's PID 1, from the JSON bwrap writes to `--info-fd` (None: bwrap failed
    before starting it). The pid is trusted only while its parent is our bwrap, which we have not reaped,
    so a pid reused after the sandbox ended is never signalled."""
    info = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(info_fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            chunk = os.read(info_fd, _READ_CHUNK)
            if not chunk:
                break
            info += chunk
    try:
        pid = int(json.loads(info)["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, ProcessLookupError):
        return None
    if _parent_pid(pid) != proc.pid:
        os.close(pidfd)
        return None
    return pidfd, pid


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces and ")"


def _kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


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


def _memfd(data: bytes) -> int:
    """An anonymous in-memory file holding `data`, positioned at its start (never touches the disk)."""
    fd = os.memfd_create("sandbox")
    with open(fd, "wb", closefd=False) as file:
        file.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _counter(text: str, key: str) -> int:
    """A `key value` line's value in a cgroup file (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _checked_name(name: str) -> str:
    """A `files` key as a path inside the working directory; anything that would leave it is refused."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == PROGRAM:
        raise ValueError(f"files: {name!r} must be a relative path inside the working directory, not {PROGRAM}")
    return str(path)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
