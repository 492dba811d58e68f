"""Completion tokens/s of our generation backends against stock `transformers.generate`, same process, same prompts.

    python benchmarks/generation.py [--preset tiny|qwen2-0.5b] [--prompts 64] [--new-tokens 64] [--dtype auto]
                                    [--sampling sampled|nucleus|greedy] [--backends stock,before,transformers,vllm]

A model of the preset's shape is initialised at random into a temporary directory. Rows:
- `stock`: transformers' own Qwen2ForCausalLM and `generate` (top_k=0 where the sampling has none, so it samples
  the same distribution as ours);
- `before`: our backbone through `GenerationMixin.generate` with the config the transformers backend built before
  it had its own decoding loop (top-k unset, which transformers turns into top_k=50);
- `transformers`: the transformers backend now (`alignment/generation/decoding.py`);
- `vllm`: the offline vLLM engine, its start timed apart (skipped where vllm is not installed).
Sampling: `sampled` is the tiny rejection recipe's (temperature 1.0, top-k 50), `nucleus` temperature 0.7 and
top-p 0.95 over the whole vocabulary, `greedy` temperature 0. Prints tokens/s and the ratio of each row to
`stock` and to `before`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLINGS = {"sampled": dict(temperature=1.0, top_k=50, top_p=1.0), "nucleus": dict(temperature=0.7, top_k=-1, top_p=0.95),
             "greedy": dict(temperature=0.0, top_k=-1, top_p=1.0)}


def stock_generate(model, tokenizer, prompts, sampling: dict, new_tokens: int, eos_ids: list[int],
                   before: bool) -> list[int]:
    """New-token counts per row from `GenerationMixin.generate` on `model` (stock's or ours). `before` builds the
    config as the transformers backend did before its decoding loop (top_k None)."""
    import torch

    sample = sampling["temperature"] > 0
    top_k = sampling["top_k"] if sampling["top_k"] > 0 else (None if before else 0)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=sample,
                             temperature=sampling["temperature"] if sample else None,
                             top_p=sampling["top_p"] if sample else None, top_k=top_k if sample else None,
                             eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].size(1):]
    counts = []
    for row in new.tolist():
        ended = next((i for i, t in enumerate(row) if t in eos_ids), None)
        counts.append(len(row) if ended is None else ended + 1)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: what generation's `dtype: auto` picks on this machine (the CPU matmul probe)")
    ap.add_argument("--sampling", default="sampled", choices=list(SAMPLINGS))
    ap.add_argument("--backends", default="stock,before,transformers,vllm")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    import torch
    import transformers

    from alignment.checkpoint import init_checkpoint, load_causal_lm
    from alignment.generation import GenerationSpec, make_generator
    from alignment.precision import resolve_dtype
    from alignment.tokenizer import load_tokenizer
    from benchmarks.common import write_result

    dtype, why = resolve_dtype(a.dtype, "cpu")
    print(f"dtype: {why}")
    sampling = SAMPLINGS[a.sampling]
    backends = [b for b in a.backends.split(",") if b != "vllm" or importlib.util.find_spec("vllm")]
    topics = ["the sea", "prime numbers", "a fox", "bread", "rain", "the moon", "chess", "a robot"]
    prompts = [[{"role": "user", "content": f"Write a short note about {topics[i % 8]} (#{i})."}] for i in range(a.prompts)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = init_checkpoint(a.preset, Path(tmp) / "model", seed=0, dtype=dtype, initializer_range=0.05)
        tokenizer = load_tokenizer(str(path))
        eos_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
        for backend in backends:
            torch.manual_seed(0)
            t = time.perf_counter()
            if backend in ("stock", "before"):
                model = (transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
                         if backend == "stock" else load_causal_lm(str(path), dtype)).eval()
                start = time.perf_counter() - t
                t = time.perf_counter()
                counts = stock_generate(model, tokenizer, prompts, sampling, a.new_tokens, eos_ids, backend == "before")
            else:
                spec = GenerationSpec(backend=backend, model=str(path), dtype=dtype, max_new_tokens=a.new_tokens,
                                      batch_size=a.prompts, max_model_len=1024, **sampling)
                generator = make_generator(spec)
                start = time.perf_counter() - t
                t = time.perf_counter()
                counts = [c.num_tokens for cs in generator.generate(prompts, spec.sampling(seed=0)) for c in cs]
                generator.close()
            seconds = time.perf_counter() - t
            tokens = sum(counts)
            results[backend] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "start_s": start}
            print(f"{backend:>13}: {tokens / seconds:8.1f} completion tokens/s  ({tokens} tokens in {seconds:.1f} s; "
                  f"load/engine start {start:.1f} s)")
    ratios = {f"{b}/{base}": results[b]["tokens_per_s"] / results[base]["tokens_per_s"]
              for base in ("stock", "before") if base in results for b in results if b != base}
    for name, ratio in ratios.items():
        print(f"{name:>22}: {ratio:6.2f}x")
    print(f"({a.preset}, {a.prompts} prompts x {a.new_tokens} new tokens, {a.sampling} {sampling}, {dtype}, "
          f"{torch.get_num_threads()} threads)")
    write_result(f"generation-{a.preset}-{a.sampling}-{dtype}",
                 {"args": vars(a), "dtype": dtype, "sampling": sampling, "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
