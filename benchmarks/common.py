"""Shared helpers for the benchmark scripts: timing, peak memory, result files."""

from __future__ import annotations

import ctypes
import json
import platform
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def time_steps(step: Callable[[], None], steps: int, warmup: int = 1) -> float:
    """Median seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Start a new peak-RSS window (Linux): trim freed heap pages, reset VmHWM to VmRSS; returns VmRSS in MB.

    Peak memory of one call in this process is then `peak_rss_since_reset_mb()` minus the returned value.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_mb("VmRSS")


def peak_rss_since_reset_mb() -> float:
    return _proc_status_mb("VmHWM")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer or a memory reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def synced(step: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`step` followed by `synchronize`: what `time_steps` should time on a GPU."""
    def run() -> None:
        step()
        synchronize(device)
    return run


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call of `step` adds: the CUDA allocator's peak on a GPU, else the process's peak RSS,
    each above its level just before the call."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        synced(step, device)()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = reset_peak_rss()
    step()
    return peak_rss_since_reset_mb() - base


def _proc_status_mb(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


def machine() -> dict:
    """What a result depends on: the CPU model (bf16 is 4.6x fp32 on one, 0.55x on another), threads, torch, commit."""
    from alignment.precision import cpu_model
    from alignment.stages import git_commit

    return {"cpu": cpu_model(), "arch": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": git_commit()}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
