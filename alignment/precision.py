"""Which precision computes, chosen per machine.

On CPU the answer depends on the chip: bf16 matmul is several times faster than fp32 on some CPUs
and slower on others (the figures: docs/training.md, Precision). So `dtype: auto` measures: a short
matmul probe, fp32 against bf16, interleaved, cached per CPU model, thread count and torch version.
On CUDA, `auto` is bf16 where the GPU supports it. A recipe that names a dtype pins it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import atomic_write_text

# bf16 is chosen on CPU only when its matmul is clearly faster: the rest of a training step
# (elementwise work, optimizer) gains little from it, so a small matmul edge does not pay.
BF16_MIN_SPEEDUP = 1.3
PROBE_SIZE = 512


def cache_path() -> Path:
    root = os.environ.get("QWEN2_ALIGN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "qwen2-align"
    return Path(root).expanduser() / "cpu-precision.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which is what decides the bf16 question."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class MatmulProbe:
    """Measured matmul throughput of one CPU, fp32 and bf16."""

    cpu: str
    threads: int
    torch: str
    fp32_gflops: float
    bf16_gflops: float

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.bf16_speedup >= BF16_MIN_SPEEDUP else "float32"

    def describe(self) -> str:
        return (f"{self.dtype} on CPU ({self.cpu}, {self.threads} threads: bf16 matmul {self.bf16_gflops:.0f} "
                f"vs fp32 {self.fp32_gflops:.0f} GFLOP/s, {self.bf16_speedup:.2f}x)")


def measure_matmul(size: int = PROBE_SIZE, rounds: int = 3, min_seconds: float = 0.05) -> MatmulProbe:
    """Best-of-`rounds` GFLOP/s of a [size, size] matmul in fp32 and bf16, the two interleaved.

    Each timing repeats the matmul for at least `min_seconds`; a CPU without bf16 support
    (seen here: 1 GFLOP/s) costs a second or two, not minutes."""
    a = torch.randn(size, size)
    operands = {torch.float32: (a, a.T.contiguous()), torch.bfloat16: (a.bfloat16(), a.T.contiguous().bfloat16())}
    best = {dtype: float("inf") for dtype in operands}
    for _ in range(rounds):
        for dtype, (x, y) in operands.items():
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < min_seconds:
                torch.mm(x, y)
                calls += 1
            best[dtype] = min(best[dtype], (time.perf_counter() - start) / calls)
    gflops = {dtype: 2 * size**3 / seconds / 1e9 for dtype, seconds in best.items()}
    return MatmulProbe(cpu_model(), torch.get_num_threads(), torch.__version__,
                       round(gflops[torch.float32], 1), round(gflops[torch.bfloat16], 1))


def cpu_probe() -> MatmulProbe:
    """This machine's probe, measured once and cached (a new CPU, thread count or torch measures again)."""
    path = cache_path()
    key = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        cached = MatmulProbe(**json.loads(path.read_text()))
        if {k: getattr(cached, k) for k in key} == key:
            return cached
    except (OSError, ValueError, TypeError):
        pass
    probe = measure_matmul()
    try:
        atomic_write_text(path, json.dumps(asdict(probe), indent=2) + "\n")
    except OSError:
        pass  # a read-only home: measure again next time
    return probe


def resolve_dtype(name: str, device: str | None = None) -> tuple[str, str]:
    """(dtype name, why) for a recipe's `dtype` on `device` ('cpu' or 'cuda'; default: what is there)."""
    if name != "auto":
        return name, f"{name} (set in the recipe)"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        chosen = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return chosen, f"{chosen} on {torch.cuda.get_device_name()} (auto)"
    probe = cpu_probe()
    return probe.dtype, probe.describe() + " (auto)"
