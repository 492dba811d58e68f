"""SFT and DPO training throughput: stock TRL vs ours, same tiny model and data, one process.

    python benchmarks/train_throughput.py [--steps 8] [--batch 8] [--rows 512] [--no-packing]

Stock: TRL's SFTTrainer / DPOTrainer on stock transformers' Qwen2 with TRL's default settings
(bf16 autocast and gradient checkpointing on), and again with bf16=False. Ours: the same TRL
trainers through our subclasses, on our backbone, with bf16 autocast and no gradient
checkpointing (what recipes/tiny uses). SFT packs the short arithmetic conversations into
512-token rows for every variant, as recipes/tiny does (`--no-packing`: one conversation per
row, ~40 tokens, where per-step costs such as the optimizer dominate). Tokens/s counts the tokens the trainer saw (TRL's
`num_tokens`) over the steps after the first two; peak memory is the largest resident-set
growth during the run, sampled every 10 ms. One line per stage ends in the speed-up `N.Nx`.
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
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--no-packing", action="store_true", help="SFT: one conversation per row")
    a = ap.parse_args()

    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignment.checkpoint import init_checkpoint
    from alignment.model import Qwen2ForCausalLM
    from alignment.tokenizer import load_tokenizer
    from alignment.train.dpo import Qwen2DPOTrainer
    from alignment.train.sft import Qwen2SFTTrainer
    from benchmarks.common import write_result
    from data_synthesis.arithmetic import arithmetic_sets

    demos, prefs = arithmetic_sets(a.rows, a.rows, seed=0)
    sft_data = datasets.Dataset.from_list([{"messages": r["messages"]} for r in demos])
    dpo_data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in prefs])
    common = dict(max_steps=a.steps, per_device_train_batch_size=a.batch, logging_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, use_cpu=True, max_length=512)
    variants = {  # name -> (ours, extra config)
        "stock TRL (defaults: bf16, grad ckpt)": (False, {}),
        "stock TRL (bf16=False)": (False, {"bf16": False}),
        "ours (bf16, no grad ckpt)": (True, {"bf16": True, "gradient_checkpointing": False}),
    }
    results: dict[str, dict[str, dict]] = {"sft": {}, "dpo": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(init_checkpoint("tiny", Path(tmp) / "tiny", seed=0))
        tok = load_tokenizer(model_dir)
        for name, (ours, extra) in variants.items():
            for stage in ("sft", "dpo"):
                torch.manual_seed(0)
                cls = Qwen2ForCausalLM if ours else transformers.Qwen2ForCausalLM
                with PeakMemory() as mem:
                    if stage == "sft":
                        trainer = (Qwen2SFTTrainer if ours else SFTTrainer)(
                            model=cls.from_pretrained(model_dir), processing_class=tok, train_dataset=sft_data,
                            args=SFTConfig(output_dir=f"{tmp}/out", packing=not a.no_packing, **common, **extra))
                    else:
                        trainer = (Qwen2DPOTrainer if ours else DPOTrainer)(
                            model=cls.from_pretrained(model_dir), ref_model=cls.from_pretrained(model_dir),
                            processing_class=tok, train_dataset=dpo_data,
                            args=DPOConfig(output_dir=f"{tmp}/out", **common, **extra))
                    speed = _timed_train(trainer)
                results[stage][name] = {"tokens_per_s": speed, "peak_mb": mem.peak}
                print(f"{stage} {name:>38}: {speed:8.0f} tokens/s, peak +{mem.peak:6.0f} MB", flush=True)
                del trainer
                gc.collect()
    print()
    for stage, by in results.items():
        base = by["stock TRL (defaults: bf16, grad ckpt)"]
        fp32 = by["stock TRL (bf16=False)"]
        ours = by["ours (bf16, no grad ckpt)"]
        print(f"{stage.upper()}: ours {ours['tokens_per_s']:.0f} tok/s, peak +{ours['peak_mb']:.0f} MB; stock "
              f"{base['tokens_per_s']:.0f} tok/s, +{base['peak_mb']:.0f} MB (bf16=False: {fp32['tokens_per_s']:.0f} "
              f"tok/s, +{fp32['peak_mb']:.0f} MB); speed-up {ours['tokens_per_s'] / base['tokens_per_s']:.1f}x")
    write_result("train_throughput-tiny", {"args": vars(a), "results": results})


if __name__ == "__main__":
    main()
