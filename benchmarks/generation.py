"""Completion tokens/s of the `vllm` vs `transformers` generation backends, same process.

    python benchmarks/generation.py [--preset qwen2-0.5b] [--prompts 64] [--new-tokens 64] [--dtype auto]

A randomly initialised model of the preset's shape is written to a temporary directory; both
backends decode the same chat prompts greedily. vLLM's engine start is timed apart from the
generation itself. Prints tokens/s for each and the ratio vllm / transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: what generation's `dtype: auto` picks on this machine (the CPU matmul probe)")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    import torch

    from alignment.checkpoint import init_checkpoint
    from alignment.generation import GenerationSpec, make_generator
    from alignment.precision import resolve_dtype
    from benchmarks.common import write_result

    dtype, why = resolve_dtype(a.dtype, "cpu")
    print(f"dtype: {why}")

    topics = ["the sea", "prime numbers", "a fox", "bread", "rain", "the moon", "chess", "a robot"]
    prompts = [[{"role": "user", "content": f"Write a short note about {topics[i % 8]} (#{i})."}] for i in range(a.prompts)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = init_checkpoint(a.preset, Path(tmp) / "model", seed=0, dtype=dtype, initializer_range=0.05)
        for backend in ("transformers", "vllm"):
            spec = GenerationSpec(backend=backend, model=str(model), dtype=dtype, max_new_tokens=a.new_tokens,
                                  temperature=0.0, batch_size=a.prompts, max_model_len=1024)
            t = time.perf_counter()
            gen = make_generator(spec)
            start = time.perf_counter() - t
            t = time.perf_counter()
            out = gen.generate(prompts, spec.sampling())
            sec = time.perf_counter() - t
            gen.close()
            tokens = sum(c.num_tokens for cs in out for c in cs)
            results[backend] = {"tokens": tokens, "seconds": sec, "tokens_per_s": tokens / sec, "start_s": start}
            print(f"{backend:>13}: {tokens / sec:8.1f} completion tokens/s  ({tokens} tokens in {sec:.1f} s; "
                  f"load/engine start {start:.1f} s)")
    ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print(f"{'ratio':>13}: {ratio:8.2f}x vllm / transformers  ({a.preset}, {a.prompts} prompts x {a.new_tokens} "
          f"new tokens, {dtype}, {torch.get_num_threads()} threads)")
    write_result(f"generation-{a.preset}-{dtype}", {"args": vars(a), "dtype": dtype, "results": results, "ratio": ratio})


if __name__ == "__main__":
    main()
