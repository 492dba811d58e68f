"""A policy's weights sent from a trainer to a running vLLM server without a checkpoint on the way.

Each sync opens its own process group outside the trainer's (a TCPStore hosted by the server's first
worker, on a port the server picks): the server's workers are ranks 0..W-1, the trainer's main process is
rank W and broadcasts every tensor in turn; each worker loads what it receives into its engine. NCCL where
the tensors are on GPUs, gloo on CPUs. The server side runs as a vLLM worker extension (`WeightReceiver`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import DTYPES

TIMEOUT = datetime.timedelta(minutes=10)


def open_group(host: str, port: int, rank: int, world_size: int, device: torch.device):
    """A process group of its own (not the default one accelerate or vLLM made), rank 0 hosting its store."""
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=TIMEOUT)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def broadcast(group, tensor: torch.Tensor, root: int) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = root
    group.broadcast([tensor], options).wait()


def send(group, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device, dtype: torch.dtype) -> int:
    """Broadcast each tensor (already in the order and shapes the receivers were told) as rank `size - 1`;
    returns the bytes sent."""
    sent = 0
    for _, tensor in tensors:
        tensor = tensor.detach().to(device=device, dtype=dtype).contiguous()
        broadcast(group, tensor, group.size() - 1)
        sent += tensor.numel() * tensor.element_size()
    return sent


def received(group, layout: list[tuple[str, list[int]]], device: torch.device,
             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `layout` as the sender broadcasts them, one at a time."""
    for name, shape in layout:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        broadcast(group, tensor, group.size() - 1)
        yield name, tensor


class WeightReceiver:
    """vLLM worker extension (`worker_extension_cls`): each worker joins the sync's group and loads the
    broadcast tensors into its model, its own shard of each under tensor parallelism. `save_to` (vLLM's CPU
    build, whose linear layers keep prepacked weights that an in-place load leaves stale) writes them to a
    safetensors file instead, for the engine to be started again from."""

    def receive_weights(self, host: str, port: int, world_size: int, layout: list, dtype: str,
                        save_to: str | None = None) -> int:
        rank = self.rank  # the worker's rank among the engine's workers  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        group = open_group(host, port, rank, world_size, device)
        tensors = received(group, layout, device, DTYPES[dtype])
        if save_to is None:
            self.model_runner.model.load_weights(weights=tensors)  # type: ignore[attr-defined]
            return len(layout)
        whole = {name: tensor.cpu() for name, tensor in tensors}
        if rank == 0:
            from safetensors.torch import save_file

            Path(save_to).mkdir(parents=True, exist_ok=True)
            save_file(whole, str(Path(save_to) / "model.safetensors"), metadata={"format": "pt"})
        return len(layout)
