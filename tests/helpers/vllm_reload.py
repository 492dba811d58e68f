"""Greedy replies of our vLLM generator before and after it reads another checkpoint in place (run as a
subprocess: vLLM's workers need the main guard). Prints RESULT [[replies of A], [replies of B]] as JSON.

    python vllm_reload.py MODEL_A MODEL_B PROMPTS_JSON
"""

import json
import sys

if __name__ == "__main__":
    from alignment.generation import GenerationSpec, make_generator

    first, second, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    spec = GenerationSpec(backend="vllm", model=first, dtype="float32", temperature=0.0, max_new_tokens=12,
                          max_model_len=256, cpu_kvcache_gib=1)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    with make_generator(spec) as generator:
        before = [c[0].text for c in generator.generate(messages, spec.sampling(seed=0))]
        generator.load_weights(second)
        after = [c[0].text for c in generator.generate(messages, spec.sampling(seed=0))]
    print("RESULT " + json.dumps([before, after]))
