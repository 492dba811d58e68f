"""Run under `torch.distributed.run` on 2 CPU processes: each loads every MODEL with `load_sharded_frozen` (the
main process reads it, the other receives its shards and buffers) and runs the same ids through it; the main
process prints RESULT <json>: per model and process, the logits (every STRIDE-th over the vocabulary) and the
share of the parameters it holds.

    python -m torch.distributed.run --nproc-per-node 2 sharded_frozen.py IDS_JSON causal:MODEL reward:MODEL ...
"""

import json
import sys

import torch

from alignment.checkpoint import causal_lm_class, reward_model_class
from alignment.train.common import load_sharded_frozen

STRIDE = 64  # every 64th logit over the vocabulary: enough to compare, small enough to send as JSON

if __name__ == "__main__":
    ids = torch.tensor(json.loads(sys.argv[1]))
    torch.distributed.init_process_group("gloo")
    results = []
    for kind, path in (arg.split(":", 1) for arg in sys.argv[2:]):
        model_class = causal_lm_class(path) if kind == "causal" else reward_model_class(path)
        model = load_sharded_frozen(path, model_class, torch.float32, torch.device("cpu"))
        held = sum(p.to_local().numel() for p in model.parameters()) / sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            results.append({"logits": model(input_ids=ids).logits[..., ::STRIDE].tolist(), "held": held})
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    torch.distributed.destroy_process_group()
