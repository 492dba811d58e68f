"""Forward + backward tokens/s of our Qwen2 backbone vs stock transformers, same weights, same process.

    python benchmarks/backbone.py [--preset tiny] [--batch 8] [--seq 256] [--steps 5] [--dtype float32]

Both models compute the causal-LM loss from labels and backpropagate it; stock transformers
uses its default (SDPA) attention. Prints tokens/s for each and the ratio ours / stock.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment.model import Qwen2ForCausalLM, preset_config  # noqa: E402
from benchmarks.common import time_steps, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)

    config = preset_config(a.preset)
    torch.manual_seed(0)
    ours = Qwen2ForCausalLM(config).to(dtype).train()
    stock = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(config.to_dict())).to(dtype).train()
    stock.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 151_000, (a.batch, a.seq))

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        return run

    tokens = a.batch * a.seq
    results = {}
    for name, model in (("stock transformers", stock), ("ours", ours)):
        sec = time_steps(step(model), a.steps)
        results[name] = tokens / sec
        print(f"{name:>20}: {tokens / sec:10.0f} tokens/s  ({sec * 1000:.0f} ms/step)")
    ratio = results["ours"] / results["stock transformers"]
    print(f"{'ratio ours/stock':>20}: {ratio:10.2f}x  ({a.preset}, batch {a.batch} x {a.seq}, {a.dtype}, "
          f"{torch.get_num_threads()} threads)")
    write_result(f"backbone-{a.preset}-{a.dtype}", {"args": vars(a), "tokens_per_s": results, "ratio": ratio})


if __name__ == "__main__":
    main()
