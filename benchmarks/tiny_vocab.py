"""The demo's base model with Qwen2's full vocabulary vs the vocabulary cut down to its corpus, side by side.

    python benchmarks/tiny_vocab.py [--steps 6] [--rounds 2] [--batch 8] [--length 256] [--dtype float32]

Same `tiny` shape (4 layers, 128 wide), same corpus (qwen2_align.demo.tiny_world), same packed batches of real
corpus tokens; only the number of vocabulary rows differs (151,936 vs the reduced tokenizer's, rounded up to 64).
Measured: training tokens/s (forward, backward and AdamW step through our chunked LM head) and greedy generation
tokens/s (HF generate, 18 prompts, 32 new tokens). Variants alternate, `--rounds` times each; the median counts.
The result file records the CPU model and the commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import time_steps, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = parser.parse_args()

    from alignment.checkpoint import CAUSAL_LM_CLASSES
    from alignment.model.presets import preset_config
    from alignment.tokenizer import qwen2_tokenizer, reduced_tokenizer
    from qwen2_align.demo.tiny_world import TinyWorld, pretraining_corpus

    texts = [row["text"] for row in pretraining_corpus(TinyWorld())]
    tokenizers = {"full": qwen2_tokenizer(), "corpus": reduced_tokenizer(texts)}
    dtype = getattr(torch, a.dtype)
    variants = {}
    for name, tokenizer in tokenizers.items():
        stream = [i for text in texts[:400] for i in tokenizer(text)["input_ids"]]
        batch = torch.tensor(stream[: a.batch * a.length]).view(a.batch, a.length)
        config = preset_config("tiny", vocab_size=-(-len(tokenizer) // 64) * 64)
        torch.manual_seed(0)
        model = CAUSAL_LM_CLASSES[config.model_type](config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        prompts = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i} + 2?"}],
                                                             add_generation_prompt=True, return_dict=True)["input_ids"]
                                for i in range(1, 10)] * 2)
        variants[name] = (model, optimizer, batch, prompts, config.vocab_size)

    def train_step(name: str) -> None:
        model, optimizer, batch, _, _ = variants[name]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def generate(name: str) -> None:
        model, _, _, prompts, _ = variants[name]
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model.generate(prompts, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    seconds: dict[str, dict[str, list[float]]] = {name: {"train": [], "generate": []} for name in variants}
    for _ in range(a.rounds):
        for name in variants:
            seconds[name]["train"].append(time_steps(lambda: train_step(name), a.steps))
            seconds[name]["generate"].append(time_steps(lambda: generate(name), 2))
    results = {}
    for name, (_, _, batch, prompts, rows) in variants.items():
        train_s = sorted(seconds[name]["train"])[len(seconds[name]["train"]) // 2]
        generate_s = sorted(seconds[name]["generate"])[len(seconds[name]["generate"]) // 2]
        results[name] = {"vocabulary_rows": rows, "train_tokens_per_s": batch.numel() / train_s,
                         "generate_tokens_per_s": prompts.shape[0] * 32 / generate_s}
        print(f"{name:>6}: {rows:>7,} rows  train {results[name]['train_tokens_per_s']:8.0f} tok/s  "
              f"generate {results[name]['generate_tokens_per_s']:7.0f} tok/s")
    ratio = {k: results["corpus"][k] / results["full"][k] for k in ("train_tokens_per_s", "generate_tokens_per_s")}
    print(f"corpus vocabulary / full: train {ratio['train_tokens_per_s']:.1f}x, "
          f"generate {ratio['generate_tokens_per_s']:.1f}x")
    path = write_result(f"tiny-vocab-{a.dtype}", {"settings": vars(a), "results": results, "ratio": ratio})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
