"""Online DPO's reward and log-prob models under FSDP2 or ZeRO-3 launches: sharded over the processes, read by
the main process alone, they score exactly as the whole model does (tied and untied heads, a score head)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.checkpoint import causal_lm_class, init_checkpoint, reward_model_class
from alignment.tokenizer import load_tokenizer

HELPER = Path(__file__).parent / "helpers" / "sharded_frozen.py"
IDS = [[151644, 872, 198, 3838, 374, 220, 17, 488, 220, 18, 30], [9707, 11, 1879, 0, 1096, 374, 264, 1273, 13, 151645, 198]]


def test_sharded_frozen_models_score_as_the_whole_models(tmp_path):
    tied = init_checkpoint("tiny", tmp_path / "tied", seed=4, initializer_range=0.3)
    untied = init_checkpoint("tiny-untied", tmp_path / "untied", seed=5, initializer_range=0.3)
    pad = load_tokenizer(str(untied)).pad_token_id
    reward_model_class(untied).from_pretrained(untied, num_labels=1, pad_token_id=pad).save_pretrained(tmp_path / "rm")
    models = [("causal", tied), ("causal", untied), ("reward", tmp_path / "rm")]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(HELPER),
                          json.dumps(IDS), *[f"{kind}:{path}" for kind, path in models]], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    processes = json.loads(lines[-1][len("RESULT "):])
    for index, (kind, path) in enumerate(models):
        model_class = causal_lm_class(path) if kind == "causal" else reward_model_class(path)
        with torch.no_grad():
            whole = model_class.from_pretrained(path, dtype=torch.float32).eval()(input_ids=torch.tensor(IDS)).logits
        whole = whole[..., ::64]  # the helper's STRIDE
        for rank, results in enumerate(processes):  # the process that did not read the checkpoint too
            assert 0.45 < results[index]["held"] < 0.55, (kind, path, rank)  # each holds about half
            assert torch.tensor(results[index]["logits"]) == pytest.approx(whole, abs=1e-5), (kind, path, rank)
