"""The policy's vLLM engine on GPUs (or a node) of its own, serving online DPO's trainers over HTTP, as TRL's
server mode runs it: `qwen2-align serve-policy --recipe R` starts it, a recipe with
`generation.backend: vllm-server` samples from it (`PolicyServerGenerator`), and after each episode the
trainer's main process broadcasts the new weights to the engine's workers (`weight_sync`, NCCL on GPUs)
without a checkpoint on the way. vLLM's CPU build cannot load weights in place, so there the received
weights are written beside the model's config and the engine is started again from them.

    GET  /health        {"policy": the policy the engine holds, "dtype": its weights' dtype, "workers": W}
    POST /generate      {"prompts": [...], "sampling": SamplingParams fields} -> {"completions": [[...]]}
    POST /weights       {"layout": [[name, shape], ...], "policy": tag} -> {"port", "world_size", "dtype"}:
                        the workers wait for the broadcast on that port (the sender is rank W)
    POST /weights/done  waits for the workers -> {"seconds", "restart_seconds" (CPU build), "policy"}
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import torch

from . import weight_sync
from .base import Completion, GenerationError, GenerationSpec, Generator, Prompt, SamplingParams


def policy_tag(path: str | Path) -> str:
    """What names a policy checkpoint for the server: its folder and when its weights were written."""
    folder = Path(path).resolve()
    weights = sorted(folder.glob("*.safetensors"))
    return f"{folder}@{max((w.stat().st_mtime_ns for w in weights), default=0)}"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class PolicyServer:
    """The engine behind a lock: one generation or one weight sync at a time."""

    def __init__(self, spec: GenerationSpec, host: str, scratch: Path):
        from .vllm_backend import VLLMGenerator  # vLLM is optional; only the server needs it

        self.host, self.scratch = host, scratch
        self.engine = VLLMGenerator(replace(spec, backend="vllm"))
        self.policy = policy_tag(spec.model)
        self.lock = threading.Lock()
        self.receiving: threading.Thread | None = None
        self.sync: dict = {}

    def health(self) -> dict:
        return {"policy": self.policy, "dtype": self.engine.weights_dtype(), "workers": self.engine.workers()}

    def generate(self, request: dict) -> dict:
        with self.lock:
            completions = self.engine.generate(request["prompts"], SamplingParams(**request["sampling"]))
        return {"completions": [[asdict(c) for c in cs] for cs in completions]}

    def begin_weights(self, request: dict) -> dict:
        """Hold the engine and start its workers receiving (they block until the sender has broadcast all, or
        time out). The engine is released when they finish, whether or not /weights/done is called: a sender
        that dies mid-sync leaves a server that times out and serves again, holding no named policy."""
        self.lock.acquire()
        try:
            port, workers = free_port(self.host), self.engine.workers()
            sync = {"policy": request["policy"], "start": time.perf_counter(), "error": None, "restart": 0.0}
            self.sync, self.policy = sync, ""  # until the new weights are in, the engine holds no named policy

            def receive() -> None:
                try:
                    sync["restart"] = self.engine.receive_weights(self.host, port, workers + 1, request["layout"],
                                                                  self.scratch)
                    self.policy = sync["policy"]
                except Exception as e:  # reported to the sender by /weights/done
                    sync["error"] = f"{type(e).__name__}: {e}"
                finally:
                    sync["seconds"] = time.perf_counter() - sync["start"]
                    self.lock.release()

            self.receiving = threading.Thread(target=receive, daemon=True)
            self.receiving.start()
        except BaseException:
            self.lock.release()
            raise
        return {"port": port, "world_size": workers + 1, "dtype": self.engine.weights_dtype()}

    def end_weights(self) -> dict:
        """Wait for the workers of the last /weights and report how it went."""
        if self.receiving is None:
            raise GenerationError("/weights/done without /weights")
        self.receiving.join()
        sync = self.sync
        if sync["error"]:
            raise GenerationError(f"weight sync failed on the server: {sync['error']}")
        return {"seconds": sync["seconds"], "restart_seconds": sync["restart"], "policy": sync["policy"]}


def serve(spec: GenerationSpec, host: str, port: int, scratch: Path) -> None:
    """Serve `spec`'s model until interrupted."""
    server = PolicyServer(spec, host, scratch)
    routes = {("GET", "/health"): lambda _: server.health(), ("POST", "/generate"): server.generate,
              ("POST", "/weights"): server.begin_weights, ("POST", "/weights/done"): lambda _: server.end_weights()}

    class Handler(BaseHTTPRequestHandler):
        def answer(self, method: str) -> None:
            route = routes.get((method, self.path))
            if route is None:
                return self.reply(404, {"error": f"no route {method} {self.path}"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                self.reply(200, route(json.loads(self.rfile.read(length)) if length else {}))
            except Exception as e:
                self.reply(500, {"error": f"{type(e).__name__}: {e}"})

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.answer("GET")

        def do_POST(self) -> None:
            self.answer("POST")

        def log_message(self, *args) -> None:  # one line per request is noise at a request per rank and step
            pass

    http = ThreadingHTTPServer((host, port), Handler)
    print(f"serve-policy: {spec.model} on http://{host}:{port} ({server.health()['workers']} worker(s))", flush=True)
    try:
        http.serve_forever()
    finally:
        server.engine.close()


class PolicyServerGenerator(Generator):
    """The `vllm-server` backend: samples from a `serve-policy` server and sends it new weights."""

    def __init__(self, spec: GenerationSpec):
        self.spec = spec
        self.url = spec.base_url.rstrip("/")

    def call(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.spec.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = json.loads(e.read() or b"{}").get("error", "")
            raise GenerationError(f"vllm-server: {self.url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise GenerationError(f"vllm-server: {self.url}{path}: {e}; is `qwen2-align serve-policy` running "
                                  "there?") from None

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        answer = self.call("/generate", {"prompts": prompts, "sampling": asdict(params)})
        return [[Completion(**c) for c in cs] for cs in answer["completions"]]

    def policy(self) -> str:
        return self.call("/health")["policy"]

    def send_weights(self, layout: list[tuple[str, list[int]]], tensors: Iterable[tuple[str, torch.Tensor]],
                     policy: str, device: torch.device) -> dict:
        """Broadcast `tensors` (in `layout`'s order and shapes) to the server's workers; the server then holds
        `policy`. Returns the seconds the sender waited, the bytes it sent and the seconds of those the server
        spent starting its engine again (vLLM's CPU build)."""
        start = time.perf_counter()
        sync = self.call("/weights", {"layout": [[n, list(s)] for n, s in layout], "policy": policy})
        group = weight_sync.open_group(urlparse(self.url).hostname, sync["port"], sync["world_size"] - 1,
                                       sync["world_size"], device)
        sent = weight_sync.send(group, tensors, device, weight_sync.DTYPES[sync["dtype"]])
        done = self.call("/weights/done", {}, timeout=weight_sync.TIMEOUT.total_seconds())
        return {"seconds": time.perf_counter() - start, "bytes": sent, "restart_seconds": done["restart_seconds"]}
