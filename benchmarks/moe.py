"""Forward + backward tokens/s of our Qwen2 MoE vs stock transformers' Qwen2MoeForCausalLM, same weights, same process.

    python benchmarks/moe.py [--layers 2] [--batch 4] [--seq 512] [--steps 5] [--dtype float32]
                             [--stock eager,grouped_mm] [--threads N]

The shape is Qwen2-57B-A14B's scaled down: 64 experts, 8 active, no top-k renormalisation, one
shared expert 8 experts wide; hidden 256 (8 heads, 2 KV heads), expert width 64, shared width 512.
Stock loads our checkpoint through its own `from_pretrained` (per-expert keys fused on load).
Two measurements:
- decoder stack: input embeddings in, final hidden states out, backward from a fixed random
  gradient; no LM head.
- whole model: causal-LM loss from labels plus the router aux loss (`output_router_logits`, as
  TRL's trainers ask for MoE models), backward.
Stock runs each experts implementation in --stock (`batched_mm` is left out by default: about
13 s per step here); the ratio is ours / the fastest of them. The candidates take turns, one
step each per round, and each reports its median round, so load from other processes on a
shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment.model import Qwen2MoeForCausalLM, preset_config  # noqa: E402
from benchmarks.common import time_steps, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--stock", default="eager,grouped_mm", help="stock experts implementations to time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)

    config = preset_config(
        "qwen2-57b-a14b", hidden_size=256, num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1024, moe_intermediate_size=64, shared_expert_intermediate_size=512,
    )
    torch.manual_seed(0)
    ours = Qwen2MoeForCausalLM(config).to(dtype).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        stock = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp, dtype=dtype).train()
    ids = torch.randint(0, 151_000, (a.batch, a.seq))
    embeds = ours.model.embed_tokens(ids).detach()  # [b, n, hidden]
    grad = torch.randn_like(embeds)

    def stack(model):
        def run():
            model.zero_grad(set_to_none=True)
            model.model(inputs_embeds=embeds).last_hidden_state.backward(grad)
        return run

    def whole(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
        return run

    tokens = a.batch * a.seq
    candidates = [(f"stock {impl}", stock, impl) for impl in a.stock.split(",")] + [("ours", ours, None)]
    results: dict[str, dict[str, float]] = {}
    for part, step in (("decoder stack", stack), ("whole model", whole)):
        times: dict[str, list[float]] = {name: [] for name, _, _ in candidates}
        for round_ in range(a.steps + 1):  # round 0 is the warm-up
            for name, model, impl in candidates:
                if impl is not None:
                    model.set_experts_implementation(impl)
                sec = time_steps(step(model), 1, warmup=0)
                if round_:
                    times[name].append(sec)
        results[part] = {}
        for name, _, _ in candidates:
            sec = sorted(times[name])[len(times[name]) // 2]
            results[part][name] = tokens / sec
            print(f"{part:>13} | {name:>18}: {tokens / sec:8.0f} tokens/s  ({sec * 1000:.0f} ms/step)")
        best = max((k for k in results[part] if k != "ours"), key=results[part].get)
        ratio = results[part]["ours"] / results[part][best]
        results[part]["ratio"] = ratio
        print(f"{part:>13} | {'ours / ' + best:>18}: {ratio:8.2f}x  ({a.layers} layers, batch {a.batch} x {a.seq}, "
              f"{a.dtype}, {torch.get_num_threads()} threads)")
    write_result(f"moe-{a.dtype}-{torch.get_num_threads()}threads", {"args": vars(a), "tokens_per_s": results})


if __name__ == "__main__":
    main()
