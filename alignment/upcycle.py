"""Upcycling a dense Qwen2 checkpoint into a Qwen2 MoE, the Qwen2 report's recipe for Qwen2-57B-A14B.

Each layer's dense SwiGLU FFN (width h_F) becomes `num_experts` experts of width h_E:
1. replicate the FFN ceil(n * h_E / h_F) times;
2. shuffle each copy along the intermediate dimension (one permutation per copy, applied to the
   gate/up rows and the down columns alike, so each copy still computes the dense FFN exactly);
3. cut consecutive slices of h_E neurons from the concatenated copies as experts; drop the rest;
4. re-initialise a random `reinit_fraction` (0.5 in the report) of the elements of each expert's
   gate, up and down weights, redrawn from the dense init distribution N(0, initializer_range).
Steps 1-3 amount to giving expert e the dense neurons perm[e * h_E : (e + 1) * h_E] of the
concatenated permutations, which is how they are computed here.

Choices the report leaves open, made here:
- Shared expert: the first h_S neurons of its own shuffled copies (ceil(h_S / h_F) fresh ones,
  not the routed experts' copies), not re-initialised, its down projection scaled by
  2 * h_F / h_S, and `shared_expert_gate` zero. sigmoid(0) = 1/2, so at initialisation the shared
  expert's contribution is the dense FFN exactly when h_S = h_F (the tiny-moe shape) and the dense
  FFN in expectation over the shuffle otherwise (h_S neurons carry h_S / h_F of the sum on
  average). The MoE block then starts as the dense FFN plus the routed experts' small top-k
  weighted sum (weights ~1/n each without renormalisation), so the upcycled model starts close to
  the dense one while the re-initialised routed experts give the router something to tell apart.
- Router: N(0, initializer_range), what transformers gives a fresh qwen2_moe router: small,
  token-dependent logits, near-uniform probabilities, so every expert receives tokens from the
  first step and the load-balancing loss starts near its minimum.
Attention, norms, embeddings and the LM head are copied unchanged. Randomness comes from three
generators derived from `seed` (shuffle, re-initialisation, router), so the same seed writes the
same checkpoint and switching re-initialisation off leaves the shuffles unchanged.

The output is a stock `qwen2_moe` checkpoint (per-expert keys, safetensors shards of at most
`max_shard_bytes` with an index), written one layer at a time: the MoE model is never held in
memory whole, so a 7B -> 57B-A14B upcycle holds about one shard and one layer (~9 GB in bf16),
not the 114 GB model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .atomic import atomic_dir
from .model import Qwen2Config, Qwen2MoeConfig

# Dense config fields that carry over to the MoE config unchanged.
_CARRIED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_parameters", "use_sliding_window", "sliding_window",
    "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "dual_chunk_attention_config", "original_max_position_embeddings",
)
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


# An MoE preset's shape, in the order `upcycle` takes it: routed experts, experts per token, expert and shared widths.
MOE_SHAPE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")

def moe_config(
    dense: Qwen2Config,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_size: int,
    norm_topk_prob: bool = False,
    router_aux_loss_coef: float = 0.001,
) -> Qwen2MoeConfig:
    """The dense model's config with every layer's FFN made sparse."""
    if not 0 < top_k <= num_experts:
        raise ValueError(f"--top-k must be between 1 and --num-experts ({num_experts}), got {top_k}")
    if expert_size <= 0 or shared_size < 0:
        raise ValueError(f"--expert-size must be > 0 and --shared-size >= 0, got {expert_size} and {shared_size}")
    fields = {k: getattr(dense, k) for k in _CARRIED_FIELDS if hasattr(dense, k)}
    config = Qwen2MoeConfig(
        **fields,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=shared_size,
        norm_topk_prob=norm_topk_prob,
        router_aux_loss_coef=router_aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    config.architectures = ["Qwen2MoeForCausalLM"]
    config.dtype = dense.dtype
    return config


def _shuffled_neurons(width: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """The first `count` entries of ceil(count / width) concatenated random permutations of range(width)."""
    copies = math.ceil(count / width)
    return torch.cat([torch.randperm(width, generator=gen) for _ in range(copies)])[:count]


def upcycle_ffn(
    gate: torch.Tensor,  # [h_F, H]
    up: torch.Tensor,  # [h_F, H]
    down: torch.Tensor,  # [H, h_F]
    num_experts: int,
    expert_size: int,
    shared_size: int,
    gen: torch.Generator,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Steps 1-3 for one FFN: the experts' and the shared expert's (gate, up, down) weights."""
    width = gate.shape[0]
    neurons = _shuffled_neurons(width, num_experts * expert_size, gen).view(num_experts, expert_size)
    experts = [(gate[idx], up[idx], down[:, idx]) for idx in neurons]
    idx = _shuffled_neurons(width, shared_size, gen)
    scale = 2 * width / shared_size if shared_size else 0.0  # undo sigmoid(0) = 1/2 and the width ratio
    shared = (gate[idx], up[idx], (down[:, idx].float() * scale).to(down.dtype))
    return experts, shared


def reinit_(weight: torch.Tensor, fraction: float, std: float, gen: torch.Generator) -> None:
    """Redraw exactly round(fraction * numel) randomly chosen elements of `weight` from N(0, std), in place."""
    k = round(fraction * weight.numel())
    idx = torch.randperm(weight.numel(), generator=gen)[:k]
    weight.view(-1)[idx] = (torch.randn(k, generator=gen) * std).to(weight.dtype)


class _DenseWeights:
    """Lazy access to a safetensors checkpoint, one tensor at a time."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.path, self.weight_map = path, weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.path / self.weight_map[name], "pt") as f:
            return f.get_tensor(name)


class _ShardWriter:
    """Writes tensors as they come into safetensors shards of at most `max_bytes`, plus the index."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.directory / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as transformers does; an index only when there are several."""
        if self.pending:
            self._flush()
        if len(self.shards) == 1:
            os.replace(self.directory / "shard-0.tmp", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            filename = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.directory / f"shard-{i}.tmp", self.directory / filename)
            weight_map |= dict.fromkeys(names, filename)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def upcycle(
    dense_dir: str | os.PathLike,
    out: str | os.PathLike,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_size: int,
    reinit_fraction: float = 0.5,
    seed: int = 0,
    norm_topk_prob: bool = False,
    router_aux_loss_coef: float = 0.001,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write the MoE upcycled from the dense `qwen2` checkpoint in `dense_dir` to `out` (atomically)."""
    dense_dir = Path(dense_dir)
    if not (dense_dir / "config.json").exists():
        raise ValueError(f"{dense_dir}: not a checkpoint directory (no config.json)")
    model_type = json.loads((dense_dir / "config.json").read_text()).get("model_type")
    if model_type != "qwen2":
        raise ValueError(f"{dense_dir}: model_type {model_type!r}, upcycling needs a dense 'qwen2' checkpoint")
    if not 0.0 <= reinit_fraction <= 1.0:
        raise ValueError(f"--reinit-fraction must be in [0, 1], got {reinit_fraction}")
    dense = Qwen2Config.from_pretrained(dense_dir)
    config = moe_config(dense, num_experts, top_k, expert_size, shared_size, norm_topk_prob, router_aux_loss_coef)
    weights = _DenseWeights(dense_dir)
    root = torch.Generator().manual_seed(seed)
    shuffle_gen, reinit_gen, router_gen = (
        torch.Generator().manual_seed(int(s)) for s in torch.randint(2**62, (3,), generator=root)
    )
    std = config.initializer_range

    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for name in weights.keys():
            if not name.startswith("model.layers."):
                writer.add(name, weights[name])
        for i in tqdm(range(config.num_hidden_layers), desc="upcycling layers"):
            prefix = f"model.layers.{i}."
            for name in weights.keys():
                if name.startswith(prefix) and not name.startswith(prefix + "mlp."):
                    writer.add(name, weights[name])
            gate, up, down = (weights[f"{prefix}mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
            experts, shared = upcycle_ffn(gate, up, down, num_experts, expert_size, shared_size, shuffle_gen)
            for e, params in enumerate(experts):
                for proj, w in zip(("gate", "up", "down"), params):
                    if reinit_fraction:
                        reinit_(w, reinit_fraction, std, reinit_gen)
                    writer.add(f"{prefix}mlp.experts.{e}.{proj}_proj.weight", w)
            for proj, w in zip(("gate", "up", "down"), shared):
                writer.add(f"{prefix}mlp.shared_expert.{proj}_proj.weight", w)
            router = torch.randn(num_experts, config.hidden_size, generator=router_gen) * std
            writer.add(f"{prefix}mlp.gate.weight", router.to(gate.dtype))
            writer.add(f"{prefix}mlp.shared_expert_gate.weight", torch.zeros(1, config.hidden_size, dtype=gate.dtype))
        writer.close()
        config.save_pretrained(tmp)
        weight_files = {p for pattern in _WEIGHT_FILES for p in dense_dir.glob(pattern)}
        for p in dense_dir.iterdir():  # tokenizer, generation config, chat template
            if p.is_file() and p not in weight_files and p.name != "config.json" and not p.name.startswith("."):
                shutil.copy2(p, tmp / p.name)
    return Path(out)
