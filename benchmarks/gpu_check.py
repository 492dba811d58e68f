"""The prepared GPU check: what the CPU tests cannot show, in one run (under 8 minutes on one H100).

    python benchmarks/gpu_check.py [--out DIR] [--steps 6]   # on a GPU machine
    python benchmarks/gpu_check.py --dry-run                 # tiny shapes on CPU: the script itself works

Needs torch and transformers only (no network); the online-DPO section also needs trl and vllm. Sections, each recorded even if another fails:
1. matmul_peak: measured bf16 matmul TFLOP/s (the MFU denominator).
2. parity: our backbone against stock transformers on the device (dense and MoE; padded batch,
   fp32 and bf16), and our kernels on the device against float64 on the CPU: packed and padded
   attention (`attend`: flash varlen in bf16, fused segments in fp32) and Dual Chunk Attention
   (values and gradients).
3. sft: bf16 training steps (fp32 master weights, autocast, AdamW) on the qwen2-0.5b shape with
   packed 8K rows: tokens/s, MFU, peak memory next to `plan`'s estimate, the attention kernel used.
4. packed_attention: `benchmarks/packed_attention.py` on the device (8 x 4,096 tokens, 8 samples).
5. online_dpo: one online-DPO episode on the qwen2-0.5b shape with a colocated vLLM engine (asleep while
   DPO steps, then the new weights loaded in place): sleep and sync seconds, tokens/s, peak memory beside
   `plan`'s phases. Needs trl and vllm; recorded as skipped without them.
6. dca_memory: DCA against SDPA causal at 32K tokens, peak memory and time (forward, bf16).
Results: printed, and written to OUT/gpu_check-<device>.json (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment.model import Qwen2ForCausalLM, enable_long_context, preset_config  # noqa: E402
from alignment.model.attention import attend, attention_kernel, build_attention_layout  # noqa: E402
from alignment.model.dca import DualChunkRotary, dual_chunk_attention  # noqa: E402
from alignment.model.modeling import CAUSAL_LM_CLASSES  # noqa: E402
from alignment.model.rope import apply_rotary  # noqa: E402
from benchmarks.common import machine, peak_memory_mb, synced, synchronize, time_steps  # noqa: E402
from benchmarks.packed_attention import compare, sample_lengths  # noqa: E402
from qwen2_align.plan import count_parameters, memory_plan  # noqa: E402


def matmul_peak(device: torch.device, size: int) -> dict:
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"size": size, "bf16_tflops": 2 * size**3 / seconds / 1e12}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def backbone_parity(device: torch.device, preset: str, seq_len: int, folder: Path) -> dict:
    """Logits of ours and of stock transformers (loaded from our saved checkpoint) on a left-padded batch,
    in fp32 and bf16."""
    import transformers

    config = preset_config(preset, num_hidden_layers=2, initializer_range=0.1)
    torch.manual_seed(0)
    ours = CAUSAL_LM_CLASSES[config.model_type](config).eval()
    ours.save_pretrained(folder / preset)
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder / preset, dtype=torch.float32).eval()
    ids = torch.randint(0, 151_000, (3, seq_len))
    mask = torch.ones_like(ids)
    mask[1, : seq_len // 3], mask[2, :5] = 0, 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = []
        for model in (ours, stock):
            model.to(device=device, dtype=dtype)
            with torch.no_grad():
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=position_ids.to(device))
            logits.append(out.logits.float().cpu()[real])
        result[f"{str(dtype).removeprefix('torch.')}_max_rel_diff"] = _max_rel(*logits)
    return result


def _packed_batch(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """2 rows of 96 tokens: packed samples with right padding, and a left-padded row."""
    n = 96
    position_ids = torch.cat([torch.arange(30), torch.arange(50), torch.arange(16)]).repeat(2, 1)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[0, 80:] = 0
    mask[1] = 0
    mask[1, 20:] = 1
    position_ids[1] = (mask[1].cumsum(-1) - 1).clamp(min=0)
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2, n, h, head_dim, generator=g).transpose(1, 2) for h in (heads, kv_heads, kv_heads)]
    return qkv, mask, position_ids


def _segment_reference(q, k, v, mask, position_ids) -> torch.Tensor:
    """Float64 attention, each sample alone (causal, real tokens only); zeros at padding."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row in range(q.shape[0]):
        starts = [i for i in range(q.shape[2]) if mask[row, i] and (
            i == 0 or not mask[row, i - 1] or position_ids[row, i] != position_ids[row, i - 1] + 1)]
        for first in starts:
            end = first + 1
            while end < q.shape[2] and mask[row, end] and position_ids[row, end] == position_ids[row, end - 1] + 1:
                end += 1
            span = (slice(row, row + 1), slice(None), slice(first, end))
            out[span] = F.scaled_dot_product_attention(q[span].double(), k[span].double(), v[span].double(),
                                                       is_causal=True, enable_gqa=True)
    return out


def attention_parity(device: torch.device) -> dict:
    """`attend` on packed and padded rows on the device against float64 per-sample attention, values and grads."""
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        (q, k, v), mask, position_ids = _packed_batch(device, 8, 2, 64, dtype)
        inputs = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (q, k, v)]
        layout = build_attention_layout(mask.to(device), position_ids.to(device), q.shape[2], 0)
        out = attend(*inputs, layout)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(upstream.to(device=device, dtype=dtype))
        reference_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        reference = _segment_reference(*reference_inputs, mask, position_ids)
        reference.backward(upstream.double())
        name = str(dtype).removeprefix("torch.")
        result[f"{name}_kernel"] = attention_kernel(layout, inputs[0])
        real = mask.bool()[:, None, :, None].expand_as(reference)
        result[f"{name}_out_max_rel_diff"] = _max_rel(out.detach().float().cpu()[real], reference.detach()[real])
        for label, ours, ref in zip("qkv", inputs, reference_inputs):
            result[f"{name}_grad_{label}_max_rel_diff"] = _max_rel(ours.grad.float().cpu(), ref.grad)
    return result


def dca_parity(device: torch.device) -> dict:
    """DCA on the device against DCA in float64 on the CPU (which the tests check against brute force)."""
    config = enable_long_context(preset_config("tiny", num_attention_heads=8, num_key_value_heads=2, hidden_size=512),
                                 chunk_size=64, local_size=16, trained_length=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 200, 64, generator=g) for h in (8, 2, 2))
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, :37] = 0
    upstream = torch.randn(q.shape, generator=g)
    results = {}
    for dtype, run_device in ((torch.float64, torch.device("cpu")), (torch.float32, device), (torch.bfloat16, device)):
        inputs = [t.to(device=run_device, dtype=dtype, copy=True).requires_grad_() for t in (q, k, v)]
        rotary = DualChunkRotary(config).to(run_device)
        positions = rotary(inputs[0].new_empty(2, 200, 1), mask.to(run_device), None, 0)
        out = dual_chunk_attention(inputs[0], apply_rotary(inputs[1], *positions.key), inputs[2], positions)
        out.backward(upstream.to(device=run_device, dtype=dtype))
        results[str(dtype)] = [out.detach(), *(t.grad for t in inputs)]
    reference = results.pop("torch.float64")
    real = (mask.bool()[:, None, :, None]).expand(q.shape)
    out = {}
    for name, values in results.items():
        name = name.removeprefix("torch.")
        out[f"{name}_out_max_rel_diff"] = _max_rel(values[0].float().cpu()[real], reference[0][real])
        for label, ours, ref in zip("qkv", values[1:], reference[1:]):
            out[f"{name}_grad_{label}_max_rel_diff"] = _max_rel(ours.float().cpu(), ref)
    return out


def sft_steps(device: torch.device, preset: str, row_tokens: int, steps: int, peak_tflops: float) -> dict:
    """bf16 SFT steps as the trainer runs them: fp32 master weights, autocast, AdamW, packed rows
    (float32 on CPU, whose bf16 can be 100x slower)."""
    config = preset_config(preset)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=7e-6, weight_decay=0.1)
    lengths = sample_lengths(1, row_tokens, max(row_tokens // 1024, 4), equal=False)[0]
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None].to(device)
    ids = torch.randint(0, 151_000, (1, row_tokens), device=device)
    layout = build_attention_layout(None, position_ids, row_tokens, 0)
    probe = torch.empty(1, config.num_attention_heads, 1, 1, device=device, dtype=torch.bfloat16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step()]  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    params = count_parameters(config)
    matmul_params = params.total - params.embedding + config.vocab_size * config.hidden_size  # the head's matmul
    mean_context = sum(length * (length + 1) / 2 for length in lengths) / row_tokens  # keys per query, causal
    head_dim = config.hidden_size // config.num_attention_heads
    attention_flops = 6 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * mean_context
    flops_per_token = 6 * matmul_params + attention_flops
    tokens_per_s = row_tokens / seconds
    plan = memory_plan(config, gpus=1, micro_batch=1, seq_len=row_tokens, checkpointing=True)
    result = {"preset": preset, "row_tokens": row_tokens, "samples_per_row": len(lengths), "steps": steps,
              "step_s": seconds, "tokens_per_s": tokens_per_s, "losses": losses,
              "attention_kernel": attention_kernel(layout, probe.to(device)),
              "plan_estimate_gib": sum(plan.values()) / 2**30}
    if peak_tflops and device.type == "cuda":
        result["mfu"] = flops_per_token * tokens_per_s / (peak_tflops * 1e12)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def dca_memory(device: torch.device, tokens: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Forward peak memory and time of DCA vs SDPA causal at `tokens` (bf16 on a GPU, float32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = enable_long_context(preset_config("tiny", num_attention_heads=heads, num_key_value_heads=kv_heads,
                                               hidden_size=heads * head_dim, max_position_embeddings=tokens),
                                 chunk_size=max(tokens // 4, 64), local_size=max(tokens // 32, 8),
                                 trained_length=max(tokens // 4, 64))
    q, k, v = (torch.randn(1, h, tokens, head_dim, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    positions = DualChunkRotary(config).to(device)(q.new_empty(1, tokens, 1), None, None, 0)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "dca": lambda: dual_chunk_attention(q, k, v, positions),
    }
    result = {"tokens": tokens}
    with torch.no_grad():
        for name, run in runs.items():
            run()  # warm-up
            result[f"{name}_peak_mb"] = peak_memory_mb(run, device)
            result[f"{name}_s"] = time_steps(synced(run, device), 1, warmup=0)
    result["memory_ratio"] = result["dca_peak_mb"] / max(result["sdpa_peak_mb"], 1e-9)
    return result


def online_dpo_episode(device: torch.device, preset: str, scratch: Path) -> dict:
    """One online-DPO episode as a recipe runs it, on `preset`'s shape (random weights): on a GPU the policy
    samples from a vLLM engine in this process that sleeps while DPO steps and then loads the new weights in
    place; the sleep and sync times, tokens/s and peak memory beside `plan`'s phases. Needs trl, and vllm on a
    GPU; skipped without them."""
    try:
        import trl  # noqa: F401
        if device.type == "cuda":
            import vllm  # noqa: F401
    except ImportError as e:
        return {"skipped": f"needs trl and, on a GPU, vllm ({e.name} is missing)"}
    import os

    from alignment.checkpoint import init_checkpoint, reward_model_class
    from alignment.data import write_rows
    from alignment.tokenizer import load_tokenizer
    from qwen2_align.demo.arithmetic import math_problems
    from qwen2_align.plan import model_config, online_dpo_phases
    from qwen2_align.stage_table import load_recipe, run

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's memory counted with this process's
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    policy = init_checkpoint(preset, scratch / "policy", seed=0, dtype=dtype, initializer_range=0.02)
    tokenizer = load_tokenizer(str(policy))
    reward = reward_model_class(policy).from_pretrained(policy, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    reward.save_pretrained(scratch / "rm")
    tokenizer.save_pretrained(scratch / "rm")
    write_rows(scratch / "prompts.jsonl", math_problems(40, seed=1))
    gpu = device.type == "cuda"
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/tiny/online-dpo.yaml", overrides=[
        f"run_dir={scratch / 'online-dpo'}", f"model={policy}", f"reference={policy}", f"reward_model={scratch / 'rm'}",
        f"inputs.prompts={scratch / 'prompts.jsonl'}", "merging.method=none", "verifier=none", "episodes=1",
        f"prompts_per_episode={32 if gpu else 4}", "samples_per_prompt=4", "eval_prompts=4", "min_reward_margin=0.0",
        f"dtype={dtype}", f"generation.backend={'vllm' if gpu else 'transformers'}", "generation.temperature=1.0",
        f"generation.max_new_tokens={128 if gpu else 8}", "generation.gpu_memory_utilization=0.3",
        "generation.max_model_len=1024", "training.per_device_train_batch_size=4", "training.max_length=512",
        "training.gradient_checkpointing=true"])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run("online-dpo", recipe)
    seconds = time.perf_counter() - start
    metrics = json.loads((scratch / "online-dpo/episode-001/metrics.json").read_text())
    phases = online_dpo_phases(recipe, model_config(str(policy)), None,
                               torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else 80.0)
    keep = ("samples", "pairs_kept", "generation_tokens_per_s", "train_tokens_per_s", "engine_sleep_s",
            "weight_sync_s", "dpo_loss_first", "dpo_loss_last", "kl_to_reference")
    result = {"preset": preset, "backend": recipe.generation.backend, "episode_s": seconds,
              **{k: metrics[k] for k in keep if k in metrics},
              "plan_beside_trainer_gib": {name: sum(phase.values()) / 2**30 for name, phase in phases.items()}}
    if gpu:  # torch's allocator only: vLLM's sleep-mode pool is outside it
        result["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device there is (CPU here)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.dry_run:
        sys.exit("gpu_check: no CUDA device; use --dry-run to check the script on CPU")
    dry = a.dry_run
    scratch_dir = tempfile.TemporaryDirectory(prefix="gpu_check-")
    scratch = Path(scratch_dir.name)
    report: dict = {"machine": machine(), "dry_run": dry,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    sections: dict[str, Callable[[], dict]] = {
        "matmul_peak": lambda: matmul_peak(device, 256 if dry else 8192),
        "parity_dense": lambda: backbone_parity(device, "tiny", 48, scratch),
        "parity_moe": lambda: backbone_parity(device, "tiny-moe", 48, scratch),
        "parity_attention": lambda: attention_parity(device),
        "parity_dca": lambda: dca_parity(device),
        "sft": lambda: sft_steps(device, "tiny" if dry else "qwen2-0.5b", 512 if dry else 8192, 1 if dry else a.steps,
                                 report.get("matmul_peak", {}).get("bf16_tflops", 0.0)),
        "packed_attention": lambda: compare(sample_lengths(2 if dry else 8, 512 if dry else 4096, 8, equal=False),
                                            14, 2, 64, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                            device, 1 if dry else 3, with_mask=not dry),
        "online_dpo": lambda: online_dpo_episode(device, "tiny" if dry else "qwen2-0.5b", scratch),
        "dca_memory": lambda: dca_memory(device, 1024 if dry else 32768, 4 if dry else 28, 2 if dry else 4,
                                         32 if dry else 128),
    }
    for name, section in sections.items():
        start = time.perf_counter()
        try:
            report[name] = section()
        except Exception as e:  # one failing section must not hide the others' results
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["seconds"] = round(time.perf_counter() - start, 2)
        shown = {k: v for k, v in report[name].items() if k != "traceback"}
        print(f"{name}: {json.dumps(shown, default=str)}", flush=True)
    scratch_dir.cleanup()
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "dry-run" if dry else report["device"].replace(" ", "-")
    path = a.out / f"gpu_check-{tag}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"gpu_check: wrote {path}")
    failed = [name for name in sections if "error" in report[name]]
    if failed:
        sys.exit(f"gpu_check: failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
