"""Packed rows against unpacked samples: attention forward + backward time and peak memory, same tokens.

    python benchmarks/packed_attention.py [--rows 8] [--row-tokens 4096] [--samples 8] [--steps 3]
                                          [--heads 14] [--kv-heads 2] [--head-dim 64] [--dtype float32]

The tokens: `rows` packed rows of `row-tokens`, each holding `samples` samples, at the
attention shape of Qwen2-0.5B by default (14 query heads, 2 K/V heads, head dim 64).
- unpacked: the samples as one right-padded batch [rows * samples, longest], SDPA causal
  (what a run without packing does; right padding is exact under a causal mask);
- packed: our layer's path: the layout from the restarting position ids, then `attend`;
- packed-mask: the same packed rows through SDPA with the dense [rows, 1, n, n] boolean mask
  that the model built before (for reference).
Two length mixes: every sample the same length, and random lengths. Timed in alternation;
peak memory is the CUDA allocator's peak on a GPU, else the process's peak RSS above the
level before each call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment.model.attention import attend, attention_kernel, build_attention_layout  # noqa: E402
from benchmarks.common import peak_memory_mb, synced, time_steps, write_result  # noqa: E402


def sample_lengths(rows: int, row_tokens: int, samples: int, equal: bool, seed: int = 0) -> list[list[int]]:
    """Per row, `samples` lengths summing to `row_tokens` (equal, or cut at random points)."""
    if equal:
        return [[row_tokens // samples] * samples for _ in range(rows)]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        cuts = sorted(torch.randperm(row_tokens - 1, generator=g)[: samples - 1].add(1).tolist())
        out.append([b - a for a, b in zip([0] + cuts, cuts + [row_tokens])])
    return out


def compare(lengths: list[list[int]], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
            device: torch.device, steps: int, with_mask: bool = True) -> dict:
    """Time (s, median) and peak memory (MB) of forward + backward for each variant, and our kernel's name."""
    rows, n = len(lengths), sum(lengths[0])
    flat = [length for row in lengths for length in row]
    longest = max(flat)
    g = torch.Generator().manual_seed(0)

    def tensor(batch: int, tokens: int, h: int) -> torch.Tensor:
        """[batch, h, tokens, head_dim] laid out as the model's projections leave it ([batch, tokens, h, d])."""
        x = torch.randn(batch, tokens, h, head_dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
        return x.transpose(1, 2)

    position_ids = torch.stack([torch.cat([torch.arange(length) for length in row]) for row in lengths]).to(device)
    packed = [tensor(rows, n, h) for h in (heads, kv_heads, kv_heads)]
    unpacked = [tensor(len(flat), longest, h) for h in (heads, kv_heads, kv_heads)]

    def run_unpacked() -> None:
        out = F.scaled_dot_product_attention(*unpacked, is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))

    def run_packed() -> None:
        layout = build_attention_layout(None, position_ids, n, 0)
        out = attend(*packed, layout)
        out.backward(torch.ones_like(out))

    def run_packed_mask() -> None:
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        sample = starts.cumsum(-1)
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
        mask = mask & (sample[:, None, :, None] == sample[:, None, None, :])
        q, k, v = packed
        if device.type == "cuda":  # SDPA's fused kernels take no mask with GQA: expand, as transformers does
            k, v = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != heads)
        out.backward(torch.ones_like(out))

    variants = {"unpacked": run_unpacked, "packed": run_packed}
    if with_mask:
        variants["packed_mask"] = run_packed_mask
    result: dict = {}
    for name, step in variants.items():
        step()  # warm-up
        result[f"{name}_peak_mb"] = round(peak_memory_mb(step, device), 1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, step in variants.items():
            times[name].append(time_steps(synced(step, device), 1, warmup=0))
    for name, t in times.items():
        result[f"{name}_s"] = sorted(t)[len(t) // 2]
    result["time_ratio"] = result["packed_s"] / result["unpacked_s"]
    result["memory_ratio"] = result["packed_peak_mb"] / max(result["unpacked_peak_mb"], 1e-9)
    layout = build_attention_layout(None, position_ids, n, 0)
    result["kernel"] = attention_kernel(layout, packed[0].detach())
    result["padding_fraction_unpacked"] = round(1 - sum(flat) / (len(flat) * longest), 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--row-tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the dense-mask path (default: on a GPU only; on CPU it takes minutes)")
    a = ap.parse_args()
    with_mask = a.device != "cpu" if a.mask is None else a.mask
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    print(f"{a.rows} rows x {a.row_tokens} tokens, {a.samples} samples each; heads {a.heads}/{a.kv_heads} x "
          f"{a.head_dim}, {a.dtype} on {device}")
    print(f"{'lengths':>7} | {'unpacked s':>10} {'packed s':>9} {'mask s':>8} {'ratio':>6} | "
          f"{'unpacked MB':>11} {'packed MB':>9} {'mask MB':>8} {'ratio':>6} | kernel")
    rows = []
    for equal in (True, False):
        lengths = sample_lengths(a.rows, a.row_tokens, a.samples, equal)
        r = compare(lengths, a.heads, a.kv_heads, a.head_dim, dtype, device, a.steps, with_mask)
        r["lengths"] = "equal" if equal else "random"
        rows.append(r)
        mask_s, mask_mb = r.get("packed_mask_s", float("nan")), r.get("packed_mask_peak_mb", float("nan"))
        print(f"{r['lengths']:>7} | {r['unpacked_s']:>10.3f} {r['packed_s']:>9.3f} {mask_s:>8.3f} "
              f"{r['time_ratio']:>5.2f}x | {r['unpacked_peak_mb']:>11.0f} {r['packed_peak_mb']:>9.0f} "
              f"{mask_mb:>8.0f} {r['memory_ratio']:>5.2f}x | {r['kernel']}", flush=True)
    write_result(f"packed-attention-{device.type}-{a.dtype}", {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
