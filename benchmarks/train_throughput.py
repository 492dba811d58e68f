"""SFT and DPO training throughput: stock TRL vs ours, same model shape and data, one process.

    python benchmarks/train_throughput.py [--steps 6] [--rounds 2] [--batch 8] [--rows 512] [--no-packing]
    python benchmarks/train_throughput.py --quick               # make bench: ours vs stock's fastest, one round
    python benchmarks/train_throughput.py --shape qwen2-0.5b    # the smallest real model's shape (896 x 24)

`--quick` runs only stock's fastest setting for this CPU (no gradient checkpointing, the precision the probe
picks) against ours, one round of 4 steps on 128 rows, and prints the same ratios. `--shape qwen2-0.5b` trains a
randomly initialised model of Qwen2-0.5B's shape: SFT on packed 2,048-token rows (batch 1), DPO (batch 4), a few
steps each, stock's fastest vs ours; it also prints the share of the CPU's measured matmul rate that the model's
matmul FLOPs reach (6 per parameter per trained token, 8 for DPO's policy plus reference; attention, short in
these rows, not counted) and `plan`'s memory estimate for one GPU beside the measured peak (plan counts bf16
activations; a CPU run in fp32 holds them in fp32).

Stock: TRL's SFTTrainer / DPOTrainer on stock transformers' Qwen2, at TRL's defaults (bf16
autocast, gradient checkpointing, TRL's own chunked LM head) and at its fastest settings
(no gradient checkpointing, fp32 and bf16). Ours: the same TRL trainers through our
subclasses, on our backbone, no gradient checkpointing, at the precision `dtype: auto` picks on
this machine (alignment.precision), as recipes/tiny runs. Variants run interleaved, `--rounds`
times each, and the median counts. bf16 variants are skipped, and recorded as such, on a CPU
whose bf16 matmul is under a fifth of its fp32 rate (one step would take many minutes).

SFT packs the short arithmetic conversations into 512-token rows for every variant, as
recipes/tiny does (`--no-packing`: one conversation per row, ~40 tokens). Tokens/s counts the
tokens the trainer saw (TRL's `num_tokens`) over the steps after the first two; peak memory is
the largest resident-set growth during the run, sampled every 10 ms. The result file records
the CPU model, the probe and the commit.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakMemory:
    """Largest RSS growth over the block, sampled in a thread (torch's CPU allocator keeps no stats)."""

    def __enter__(self):
        gc.collect()
        self.start, self.peak, self.running = _rss_mb(), 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss_mb() - self.start)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _timed_train(trainer) -> float:
    """Tokens/s over the steps after the first two."""
    from transformers import TrainerCallback

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    return (tokens[-1] - tokens[1]) / (marks[-1] - marks[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--no-packing", action="store_true", help="SFT: one conversation per row")
    ap.add_argument("--quick", action="store_true", help="stock's fastest vs ours, one round of 4 steps, 128 rows")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen2-0.5b"])
    a = ap.parse_args()
    real_shape = a.shape != "tiny"
    if a.quick or real_shape:
        a.rounds, a.steps = 1, 4
        a.rows = min(a.rows, 128 if a.quick else 256)
    sft_length, sft_batch, dpo_batch = (2048, 1, 4) if real_shape else (512, a.batch, a.batch)

    import statistics

    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignment.checkpoint import init_checkpoint
    from alignment.model import Qwen2ForCausalLM
    from alignment.precision import cpu_probe
    from alignment.tokenizer import load_tokenizer
    from alignment.train.dpo import Qwen2DPOTrainer
    from alignment.train.sft import Qwen2SFTTrainer
    from benchmarks.common import write_result
    from qwen2_align.demo.arithmetic import arithmetic_sets

    probe = cpu_probe()
    ours_bf16 = probe.dtype == "bfloat16"
    print(f"precision probe: {probe.describe()}")
    demos, prefs = arithmetic_sets(a.rows, a.rows, seed=0)
    sft_data = datasets.Dataset.from_list([{"messages": r["messages"]} for r in demos])
    dpo_data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in prefs])
    common = dict(max_steps=a.steps, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                  use_cpu=True)
    sizes = {"sft": dict(per_device_train_batch_size=sft_batch, max_length=sft_length),
             "dpo": dict(per_device_train_batch_size=dpo_batch, max_length=512)}
    no_ckpt = {"gradient_checkpointing": False}
    variants = {  # name -> (ours, config)
        "stock defaults (bf16, grad ckpt)": (False, {}),
        "stock fastest fp32 (no grad ckpt)": (False, {"bf16": False, **no_ckpt}),
        "stock bf16 (no grad ckpt)": (False, {"bf16": True, **no_ckpt}),
        f"ours (auto: {probe.dtype}, no grad ckpt)": (True, {"bf16": ours_bf16, **no_ckpt}),
    }
    if a.quick or real_shape:  # stock's fastest for this CPU only
        stock_fastest = "stock bf16 (no grad ckpt)" if ours_bf16 else "stock fastest fp32 (no grad ckpt)"
        variants = {name: v for name, v in variants.items() if v[0] or name == stock_fastest}
    bf16_usable = probe.bf16_speedup >= 0.2
    skipped = {name: f"bf16 matmul {probe.bf16_speedup:.2f}x fp32 on this CPU" for name, (_, extra) in variants.items()
               if extra.get("bf16", True) and not bf16_usable}
    speeds: dict[str, dict[str, list]] = {stage: {name: [] for name in variants if name not in skipped}
                                          for stage in ("sft", "dpo")}
    peaks: dict[str, dict[str, list]] = {stage: {name: [] for name in speeds[stage]} for stage in speeds}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(init_checkpoint(a.shape, Path(tmp) / a.shape, seed=0))
        tok = load_tokenizer(model_dir)
        for round_index in range(a.rounds):
            for name, (ours, extra) in variants.items():
                if name in skipped:
                    continue
                for stage in ("sft", "dpo"):
                    torch.manual_seed(0)
                    cls = Qwen2ForCausalLM if ours else transformers.Qwen2ForCausalLM
                    with PeakMemory() as mem:
                        if stage == "sft":
                            trainer = (Qwen2SFTTrainer if ours else SFTTrainer)(
                                model=cls.from_pretrained(model_dir), processing_class=tok, train_dataset=sft_data,
                                args=SFTConfig(output_dir=f"{tmp}/out", packing=not a.no_packing, **common,
                                               **sizes["sft"], **extra))
                        else:
                            trainer = (Qwen2DPOTrainer if ours else DPOTrainer)(
                                model=cls.from_pretrained(model_dir), ref_model=cls.from_pretrained(model_dir),
                                processing_class=tok, train_dataset=dpo_data,
                                args=DPOConfig(output_dir=f"{tmp}/out", **common, **sizes["dpo"], **extra))
                        speed = _timed_train(trainer)
                    speeds[stage][name].append(speed)
                    peaks[stage][name].append(mem.peak)
                    print(f"round {round_index + 1} {stage} {name:>36}: {speed:8.0f} tokens/s, peak +{mem.peak:6.0f} MB",
                          flush=True)
                    del trainer
                    gc.collect()
    results = {stage: {name: {"tokens_per_s": statistics.median(v), "runs": v, "peak_mb": max(peaks[stage][name])}
                       for name, v in by.items()} for stage, by in speeds.items()}
    print()
    ours_name = next(n for n, (ours, _) in variants.items() if ours)
    for stage, by in results.items():
        ours = by[ours_name]
        stock = {n: r for n, r in by.items() if n != ours_name}
        fastest = max(stock, key=lambda n: stock[n]["tokens_per_s"])
        print(f"{stage.upper()}: ours {ours['tokens_per_s']:.0f} tok/s, peak +{ours['peak_mb']:.0f} MB; stock fastest "
              f"[{fastest}] {stock[fastest]['tokens_per_s']:.0f} tok/s, +{stock[fastest]['peak_mb']:.0f} MB; "
              f"speed-up {ours['tokens_per_s'] / stock[fastest]['tokens_per_s']:.1f}x"
              + "".join(f"; vs {n} {ours['tokens_per_s'] / r['tokens_per_s']:.1f}x" for n, r in stock.items()
                        if n != fastest))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    extra = real_shape_figures(a, model_config_of(a.shape), probe, results, ours_name, sft_length, sft_batch,
                               dpo_batch) if real_shape else {}
    write_result(f"train_throughput-{a.shape}{'-quick' if a.quick else ''}",
                 {"args": vars(a), "probe": vars(probe), "results": results, "skipped": skipped, **extra})


def model_config_of(preset: str):
    from alignment.model import preset_config

    return preset_config(preset)


def real_shape_figures(a, config, probe, results: dict, ours_name: str, sft_length: int, sft_batch: int,
                       dpo_batch: int) -> dict:
    """Matmul share and plan's memory estimate beside the measured figures, printed and returned."""
    from qwen2_align.plan import count_parameters, memory_plan

    counts = count_parameters(config)
    matmul_params = sum(counts.per_layer) + config.vocab_size * config.hidden_size  # the LM head is a matmul too
    figures = {}
    for stage, flops_per_param, (batch, length) in (("sft", 6, (sft_batch, sft_length)), ("dpo", 8, (dpo_batch, 512))):
        plan_mb = sum(memory_plan(config, 1, batch, length, False, reference_model=stage == "dpo").values()) / 2**20
        figures[stage] = {}
        for name, r in results[stage].items():
            bf16 = probe.dtype == "bfloat16" if name == ours_name else "stock bf16" in name
            peak_gflops = probe.bf16_gflops if bf16 else probe.fp32_gflops
            share = r["tokens_per_s"] * flops_per_param * matmul_params / 1e9 / peak_gflops
            figures[stage][name] = {"matmul_share": share, "plan_mb": plan_mb}
            print(f"{stage.upper()} {name}: {share:.0%} of the measured {'bf16' if bf16 else 'fp32'} matmul rate "
                  f"({peak_gflops:.0f} GFLOP/s); peak +{r['peak_mb']:.0f} MB vs plan {plan_mb:.0f} MB "
                  f"({r['peak_mb'] / plan_mb:.2f}x)")
    return {"real_shape": figures}


if __name__ == "__main__":
    main()
