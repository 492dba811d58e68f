"""Online DPO with its policy on a `qwen2-align serve-policy` server (vLLM's CPU build here): the trainer sends
each episode's weights over a gloo group of its own, not through a checkpoint, and the server then decodes
exactly the saved policy; a server holding another policy is sent the checkpoint first; 2 DDP processes
sampling from one server form one process's pairs and weights."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from alignment.checkpoint import checkpoint_tensors, init_checkpoint
from alignment.generation import GenerationError, GenerationSpec, PolicyServerGenerator, make_generator, policy_tag
from qwen2_align.stage_table import load_recipe, run
from test_online_dpo import RECIPE, ROOT, _assert_same_run, _models, _overrides, _two_processes

PROMPTS = [[{"role": "user", "content": p}] for p in ("What is 2 + 3?", "Name a colour.")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny online-DPO models, and a server started from a checkpoint that is none of them."""
    setup = _models(tmp_path_factory.mktemp("served"), "tiny")
    other = init_checkpoint("tiny", setup["root"] / "other", seed=2, initializer_range=0.5)
    url = f"http://127.0.0.1:{_free_port()}"
    server_settings = [f"generation.base_url={url}", "generation.enforce_eager=true", "generation.dtype=float32",
                       "generation.max_model_len=256", "generation.cpu_kvcache_gib=1"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine in the server's process: a 4x faster start here
    settings = [f"model={other}", f"run_dir={setup['root'] / 'server'}", *server_settings]
    log = (setup["root"] / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "qwen2_align.cli", "serve-policy", "--recipe", str(RECIPE),
                               *[a for s in settings for a in ("--set", s)]], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    client = PolicyServerGenerator(GenerationSpec(backend="vllm-server", base_url=url, timeout_s=10))
    deadline = time.monotonic() + 300
    while True:
        try:
            assert client.policy() == policy_tag(other)
            break
        except GenerationError:
            assert server.poll() is None and time.monotonic() < deadline, (setup["root"] / "server.log").read_text()[-3000:]
            time.sleep(1)
    yield {**setup, "client": client, "settings": ["generation.backend=vllm-server", *server_settings]}
    server.terminate()
    server.wait(timeout=60)


def _greedy(generator, prompts=PROMPTS) -> list[str]:
    """12 greedy tokens per prompt; a character cut in two at the end (transformers decodes it as U+FFFD, vLLM
    holds it back) is dropped."""
    spec = GenerationSpec(temperature=0.0, max_new_tokens=12)
    return [cs[0].text.rstrip("\ufffd") for cs in generator.generate(prompts, spec.sampling(seed=0))]


def _transformers_greedy(model: str) -> list[str]:
    with make_generator(GenerationSpec(model=model, dtype="float32")) as generator:
        return _greedy(generator)


def test_online_dpo_sends_each_episode_to_the_server_which_then_decodes_the_saved_policy(served):
    run_dir = served["root"] / "one"
    run("online-dpo", load_recipe(RECIPE, overrides=_overrides(served, run_dir) + served["settings"] + ["episodes=1"]))
    parameters = sum(t.numel() for t in load_file(run_dir / "model.safetensors").values())
    metrics = json.loads((run_dir / "episode-001/metrics.json").read_text())
    assert metrics["samples"] == 12 and metrics["weight_sync_s"] > 0
    assert metrics["weight_sync_gib"] == pytest.approx(parameters * 4 / 2**30)  # float32, each tensor once
    final = run_dir / "episode-001/model"
    client = served["client"]
    assert client.policy() == policy_tag(final)  # sent from the trainer, not read from the checkpoint
    assert _greedy(client) == _transformers_greedy(str(final))

    # A server holding another policy is sent the checkpoint's tensors (the start of a run, a resumed run).
    sft = served["sft"]
    client.send_weights(*checkpoint_tensors(sft), policy_tag(sft), torch.device("cpu"))
    assert client.policy() == policy_tag(sft)
    assert _greedy(client) == _transformers_greedy(sft) != _transformers_greedy(str(final))


@pytest.mark.slow
def test_two_processes_sampling_from_one_server_form_the_pairs_and_weights_of_one(served):
    """Each DDP process asks the server for its share of the prompts, each prompt with its own seed: the
    samples, pairs and weights are one process's."""
    one, two = served["root"] / "one-process", served["root"] / "two-processes"
    run("online-dpo", load_recipe(RECIPE, overrides=_overrides(served, one) + served["settings"]))
    _two_processes("ddp", served, two, extra=tuple(served["settings"]))
    _assert_same_run(one, two)
