"""Prefill time and peak memory of Dual Chunk Attention vs plain causal SDPA, same weights, same process.

    python benchmarks/dca_prefill.py [--preset tiny] [--lengths 4096 16384 32768] [--chunk-size 2048]
                                     [--local-size 256] [--steps 3] [--threads 2]

Both run our backbone's prefill as `generate` does (KV cache on, logits of the last token only)
under inference mode, batch 1, float32. The baseline is the model without DCA: SDPA's causal
path. Peak memory is the process's peak RSS above the RSS just before the call (VmHWM reset
through /proc/self/clear_refs), so it counts every allocation the prefill makes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment.model import Qwen2ForCausalLM, enable_long_context, preset_config  # noqa: E402
from benchmarks.common import peak_rss_since_reset_mb, reset_peak_rss, time_steps, write_result  # noqa: E402


def _prefill(model: Qwen2ForCausalLM, ids: torch.Tensor):
    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--local-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed prefills per length and model (median)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    config = preset_config(a.preset, max_position_embeddings=max(a.lengths))
    torch.manual_seed(0)
    models = {"sdpa": Qwen2ForCausalLM(config).eval()}
    models["dca"] = Qwen2ForCausalLM(enable_long_context(config, a.chunk_size, a.local_size)).eval()
    models["dca"].load_state_dict(models["sdpa"].state_dict())
    print(f"{a.preset}, DCA chunk {a.chunk_size} / local {a.local_size}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} | {'SDPA s':>7} {'DCA s':>7} {'ratio':>6} | {'SDPA MB':>8} {'DCA MB':>8} {'ratio':>6}")

    rows = []
    for n in a.lengths:
        ids = torch.randint(0, 151_000, (1, n))
        row = {"tokens": n}
        prefills = {name: _prefill(model, ids) for name, model in models.items()}
        for name, prefill in prefills.items():
            base = reset_peak_rss()
            prefill()  # warm-up, and the peak-memory measurement
            row[f"{name}_peak_mb"] = peak_rss_since_reset_mb() - base
        # Timed in alternation, so load from other processes on the machine hits both alike.
        times = {name: [] for name in models}
        for _ in range(a.steps):
            for name in models:
                times[name].append(time_steps(prefills[name], 1, warmup=0))
        for name, t in times.items():
            row[f"{name}_s"] = sorted(t)[len(t) // 2]
        row["time_ratio"] = row["dca_s"] / row["sdpa_s"]
        row["memory_ratio"] = row["dca_peak_mb"] / row["sdpa_peak_mb"]
        rows.append(row)
        print(f"{n:>7} | {row['sdpa_s']:>7.2f} {row['dca_s']:>7.2f} {row['time_ratio']:>5.2f}x | "
              f"{row['sdpa_peak_mb']:>8.0f} {row['dca_peak_mb']:>8.0f} {row['memory_ratio']:>5.2f}x", flush=True)
    write_result(f"dca-prefill-{a.preset}", {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
