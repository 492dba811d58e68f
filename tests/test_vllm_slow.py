"""Checkpoints written by our backbone (dense and MoE) run in vLLM (CPU build) with the same greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.checkpoint import init_checkpoint, load_causal_lm

HELPER = Path(__file__).parent / "helpers" / "vllm_greedy.py"


@pytest.mark.slow
@pytest.mark.parametrize("preset,init_std", [("tiny", 0.5), ("tiny-moe", 0.1)])
def test_vllm_generates_our_greedy_tokens(tmp_path, tokenizer, preset, init_std):
    model_dir = init_checkpoint(preset, tmp_path / "ck", seed=3, initializer_range=init_std)
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "今天天气"]
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(model_dir), json.dumps(prompt_ids), "24", "float32"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    from_vllm = json.loads(lines[-1][len("RESULT "):])

    model = load_causal_lm(model_dir).eval()
    for ids, theirs in zip(prompt_ids, from_vllm):
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False, repetition_penalty=1.0)
        ours = out[0, len(ids):].tolist()
        assert ours == theirs
        assert len(set(ours)) > 4


@pytest.mark.slow
def test_push_dry_run_folder_runs_in_vllm(tmp_path, tokenizer):
    """The exact folder `push` would upload loads in vLLM and decodes like our backbone."""
    from alignment.stages import write_manifest
    from qwen2_align.hub import build_upload_folder

    run_dir = init_checkpoint("tiny", tmp_path / "run", seed=4, initializer_range=0.5)
    write_manifest(run_dir, {"stage": "sft", "recipe": {"model": "Qwen/Qwen2-0.5B"}, "inputs": {}, "counts": {}})
    folder = build_upload_folder(run_dir, tmp_path / "upload", "me/tiny")
    ids = [tokenizer.encode("The capital of France is")]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    proc = subprocess.run([sys.executable, str(HELPER), str(folder), json.dumps(ids), "16", "float32"],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    theirs = json.loads(lines[-1][len("RESULT "):])[0]
    model = load_causal_lm(run_dir).eval()
    out = model.generate(torch.tensor(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.0)
    assert out[0, len(ids[0]):].tolist() == theirs
