"""Online Merging Optimizers (Lu et al. 2024): AdamW whose update is merged, every step, with
tau = reference - base, the SFT model's change from the pre-trained model, to limit the alignment tax.

One step, per parameter theta (fp32 arithmetic, fp32 optimizer state whatever the weights' dtype):

    theta <- theta * (1 - lr * weight_decay)                  decoupled decay first, as torch.optim.AdamW
    Delta  = -lr * m_hat / (sqrt(v_hat) + eps)                 the AdamW update
    theta <- theta + (1 - alpha) * F_p(Delta) + alpha * F_p(tau)

so with alpha = 0 and p = 1 it is AdamW. Where the paper and its public code differ, we follow the paper:

- F_p does not rescale the kept entries by 1/p (the code's `F.dropout` does; `rescale=True` asks for it).
- OnDARE: F_p keeps each entry with probability p, a fresh mask every step for Delta and for tau
  (`tau_mask="step"`: tau is read again each step from the base and reference states, one parameter at a
  time, so with checkpoint paths it costs disk reads, not memory). `tau_mask="fixed"` draws tau's mask
  once, as the public code does, and keeps only the kept entries: 8 p bytes per parameter (2% of fp32
  weights at p = 0.01).
- OnTIES: F_p keeps the top p fraction by magnitude (of the local shard under FSDP2). tau's top entries never
  change, so they are kept sparse (8 p bytes per parameter). The elected sign is that of F_p(tau) + F_p(Delta),
  unweighted and after trimming (TIES elects on the trimmed vectors); entries of either term whose sign
  disagrees are dropped.
- `merge_every=k` merges on every k-th step and applies the plain AdamW update to every parameter on the
  others (the public code's k-step mode skipped all but the first parameter there).
- bf16 or fp16 weights get the step's change by stochastic rounding, so that alpha * tau (1e-7 of the
  weights or less) is not rounded away as it is when added in bf16.

Random draws (masks, stochastic rounding) come from generators seeded by (seed, step, parameter, draw) and
by the block of the whole tensor an entry lies in (`shard_uniform`): resuming from `state_dict()` gives the
same next step, and every process draws the same for an entry whether it holds the whole tensor (one
process, DDP: the replicas stay equal) or a shard of it (FSDP2), so a sharded run merges as one process does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

TensorIndex = tuple[slice, ...] | None


class CheckpointState(Mapping[str, torch.Tensor]):
    """A safetensors checkpoint as a name -> tensor mapping that reads one tensor (or one shard's slice of it,
    `read`) at a time from the memory-mapped files, so a base or reference model costs no resident copy."""

    def __init__(self, path: str | Path):
        folder = Path(path)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.path = folder

    def read(self, name: str, index: TensorIndex = None) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def checkpoint_state(state: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A state dict as it is, or a checkpoint folder (local, or a Hub id already downloaded) read lazily."""
    if isinstance(state, Mapping):
        return state
    folder = Path(state)
    if not folder.exists():
        folder = Path(snapshot_download(str(state), allow_patterns=["*.safetensors", "*.json"]))
    return CheckpointState(folder)


def _read(state: Mapping[str, torch.Tensor], name: str, index: TensorIndex) -> torch.Tensor:
    if isinstance(state, CheckpointState):
        return state.read(name, index)
    tensor = state[name]
    return tensor if index is None else tensor[index]


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if isinstance(state, CheckpointState):
        with safe_open(state.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())
    return tuple(state[name].shape)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (its original parameter), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_index(param: torch.Tensor) -> TensorIndex:
    """Where this process's shard of a DTensor parameter lies in the whole tensor; None for a plain tensor."""
    if not hasattr(param, "device_mesh"):
        return None
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


DRAW_BLOCK = 1 << 20  # entries of the whole tensor per seeded generator


def _flat_range(param: torch.Tensor) -> tuple[int, int]:
    """Where this process's entries of `param` lie in the whole tensor's flat order: FSDP2 shards dim 0, so a
    shard is a contiguous range."""
    local = _local(param)
    index = _shard_index(param)
    if index is None:
        return 0, local.numel()
    if any(part != slice(0, size) for part, size in zip(index[1:], param.shape[1:])):
        raise ValueError(f"a parameter sharded on a dimension other than 0 ({index}): FSDP2 shards dim 0")
    start = index[0].start * math.prod(param.shape[1:])
    return start, start + local.numel()


def shard_uniform(param: torch.Tensor, key: tuple[int, ...]) -> torch.Tensor:
    """Uniform floats in [0, 1), one per entry of this process's shard of `param` (flat): `uniform_range` over
    the part of the whole tensor it holds, so an entry's draw does not depend on which process holds it or how
    the tensor is sharded."""
    return uniform_range(*_flat_range(param), key, _local(param).device)


def uniform_range(start: int, stop: int, key: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform floats in [0, 1) for entries start..stop of a flat tensor: drawn in blocks of DRAW_BLOCK entries,
    each from a generator seeded by `key` and the block, so any range gives the same draw for an entry."""
    out = torch.empty(stop - start, device=device)
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + part) % (1 << 61)
    for block in range(start // DRAW_BLOCK, -(-stop // DRAW_BLOCK)):
        generator = torch.Generator(device=device).manual_seed((seed * 1_000_003 + block) % (1 << 63))
        low, high = max(start, block * DRAW_BLOCK), min(stop, (block + 1) * DRAW_BLOCK)
        if high - low == DRAW_BLOCK:
            torch.rand(DRAW_BLOCK, generator=generator, device=device, out=out[low - start : high - start])
        else:
            draws = torch.rand(DRAW_BLOCK, generator=generator, device=device)
            out[low - start : high - start] = draws[low - block * DRAW_BLOCK : high - block * DRAW_BLOCK]
    return out


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, draws: torch.Tensor) -> None:
    """Write fp32 `value` into a bf16 / fp16 `target`, rounding up or down with the probability that makes the
    expected result exact (bf16: random low 16 bits added before truncation; fp16 through bf16's rule on
    the fp32 difference). `draws`: uniform in [0, 1), shaped like `value`."""
    if target.dtype == torch.bfloat16:
        noise = (draws * 65536).to(torch.int32)  # draws are multiples of 2^-24: 16 uniform bits
        rounded = (value.contiguous().view(torch.int32) + noise) & -65536
        target.copy_(rounded.view(torch.float32))
        return
    down = value.to(target.dtype)
    below = down.float() > value
    down = torch.where(below, torch.nextafter(down, torch.full_like(down, -math.inf)), down)
    up = torch.nextafter(down, torch.full_like(down, math.inf))
    gap = (up.float() - down.float()).clamp_min(torch.finfo(torch.float32).tiny)
    chance_up = ((value - down.float()) / gap).clamp(0, 1)
    target.copy_(torch.where(draws < chance_up, up, down))


class MergingAdamW(torch.optim.Optimizer):
    """AdamW with an online merge of its update and tau (see the module docstring); OnDAREAdamW and
    OnTIESAdamW choose the sparsifier F_p."""

    method: Literal["ondare", "onties"]

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
                 base_state: str | Path | Mapping[str, torch.Tensor],
                 reference_state: str | Path | Mapping[str, torch.Tensor], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 reserve_rate: float = 0.01, alpha: float = 1e-7, rescale: bool = False, merge_every: int = 1,
                 tau_mask: Literal["step", "fixed"] = "step", seed: int = 0):
        if not 0 < reserve_rate <= 1:
            raise ValueError(f"reserve_rate: must be in (0, 1], got {reserve_rate}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
        if merge_every < 1:
            raise ValueError(f"merge_every: must be >= 1, got {merge_every}")
        if tau_mask not in ("step", "fixed"):
            raise ValueError(f"tau_mask: must be 'step' or 'fixed', got {tau_mask!r}")
        groups = list(named_params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            if not all(isinstance(item, tuple) for item in group["params"]):
                raise ValueError("named_params: give (name, parameter) pairs, e.g. model.named_parameters(), so "
                                 "each parameter finds its tensor in the base and reference states")
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.reserve_rate, self.alpha, self.rescale, self.merge_every, self.seed = (
            reserve_rate, alpha, rescale, merge_every, seed)
        self.tau_mask = "fixed" if self.method == "onties" else tau_mask
        self.base, self.reference = checkpoint_state(base_state), checkpoint_state(reference_state)
        # By name, not by tensor: accelerate's FSDP2 `prepare` swaps the parameters for sharded ones after the
        # optimizer is built.
        names = [name for group in self.param_groups for name in group["param_names"]]
        self.positions = {name: i for i, name in enumerate(names)}
        self.sparse_tau: dict[str, tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = {}
        for group in self.param_groups:
            for param, name in zip(group["params"], group["param_names"]):
                self._check(param, name)
                if self.tau_mask == "fixed":
                    self._fixed_tau(param, name)

    def _check(self, param: torch.Tensor, name: str) -> None:
        """Both states hold `name` in the parameter's whole shape (read from the headers: no tensor is loaded)."""
        shapes = []
        for what, state in (("base", self.base), ("reference", self.reference)):
            if name not in state:
                raise KeyError(f"{what} state has no tensor {name!r} (a parameter of the model being trained; "
                               "LoRA adapters cannot be merged with a full-model tau)")
            shapes.append(_shape(state, name))
        if shapes[0] != tuple(param.shape) or shapes[1] != tuple(param.shape):
            raise ValueError(f"{name}: reference and base have shapes {shapes[1]} and {shapes[0]}, "
                             f"the parameter {tuple(param.shape)}")

    def _tau(self, param: torch.Tensor, name: str) -> torch.Tensor:
        """This process's shard of reference - base for `param`, fp32, on the parameter's device."""
        index, local = _shard_index(param), _local(param)
        tau = _read(self.reference, name, index).float() - _read(self.base, name, index).float()
        return tau.to(local.device)

    DRAWS = {"update": 0, "tau": 1, "rounding": 2}

    def _draw(self, param: torch.Tensor, name: str, step: int, draw: str) -> torch.Tensor:
        """`shard_uniform` of the parameter for one draw of one step, flat."""
        return shard_uniform(param, (self.seed, step, self.positions[name], self.DRAWS[draw]))

    def _fixed_tau(self, param: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """F_p(tau) drawn once, for the part of the whole tensor this process holds (drawn again if that part
        changed since: the parameter was sharded after the optimizer was built)."""
        held = _flat_range(param)
        if self.sparse_tau.get(name, (None,))[0] != held:
            self.sparse_tau[name] = (held, *self._trim(self._tau(param, name).flatten(), param, name, 0, "tau"))
        return self.sparse_tau[name][1:]

    def _trim(self, flat: torch.Tensor, param: torch.Tensor, name: str, step: int,
              draw: str) -> tuple[torch.Tensor, torch.Tensor]:
        """F_p of a flat tensor (`param`'s update or tau) as (indices, kept values): a random p of the entries
        (OnDARE, the step's `draw`) or the top p by magnitude (OnTIES), scaled by 1/p with `rescale`."""
        if self.method == "onties":
            keep = max(1, round(self.reserve_rate * flat.numel()))
            indices = flat.abs().topk(keep, sorted=False).indices
        else:
            indices = (self._draw(param, name, step, draw) < self.reserve_rate).nonzero().squeeze(1)
        indices = indices.to(torch.int32 if flat.numel() < 2**31 else torch.int64)
        values = flat[indices.long()]
        return indices, values / self.reserve_rate if self.rescale else values

    def _merge(self, param: torch.Tensor, name: str, update: torch.Tensor, step: int) -> torch.Tensor:
        """(1 - alpha) F_p(update) + alpha F_p(tau), dense and shaped like the local shard."""
        flat = update.flatten()
        delta_index, delta_value = self._trim(flat, param, name, step, "update")
        if self.tau_mask == "fixed":
            tau_index, tau_value = self._fixed_tau(param, name)
        else:
            tau_index, tau_value = self._trim(self._tau(param, name).flatten(), param, name, step, "tau")
        if self.method == "onties":
            elected = torch.zeros_like(flat)
            elected.index_add_(0, delta_index.long(), delta_value).index_add_(0, tau_index.long(), tau_value)
            sign = elected.sign()
            delta_value = delta_value * (delta_value.sign() == sign[delta_index.long()])
            tau_value = tau_value * (tau_value.sign() == sign[tau_index.long()])
        merged = torch.zeros_like(flat)
        merged.index_add_(0, delta_index.long(), delta_value, alpha=1 - self.alpha)
        merged.index_add_(0, tau_index.long(), tau_value, alpha=self.alpha)
        return merged.view_as(update)

    def merge_state_bytes(self) -> int:
        """Bytes this optimizer holds beyond AdamW's moments: the kept entries of tau (0 with tau_mask="step")."""
        return sum(i.numel() * i.element_size() + v.numel() * v.element_size() for _, i, v in self.sparse_tau.values())

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        """Loaded state keeps its dtype (fp32 moments beside bf16 weights); torch would cast it to the weights'."""
        return value if key == "step" else value.to(device=_local(param).device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param, name in zip(group["params"], group["param_names"]):
                if param.grad is None:
                    continue
                weights, grad = _local(param), _local(param.grad).float()
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(weights, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(weights, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                update = exp_avg / denom * (-lr / (1 - beta1**step))
                if step % self.merge_every == 0:
                    update = self._merge(param, name, update, step)
                if weights.dtype == torch.float32:
                    weights.mul_(1 - lr * weight_decay).add_(update)
                else:
                    moved = weights.float().mul_(1 - lr * weight_decay).add_(update)
                    stochastic_round_(weights, moved, self._draw(param, name, step, "rounding").view_as(moved))
        return loss


class OnDAREAdamW(MergingAdamW):
    """F_p keeps a random p of the entries (drop-and-rescale without the rescale, as the paper has it)."""

    method = "ondare"


class OnTIESAdamW(MergingAdamW):
    """F_p keeps the top p by magnitude; the elected sign of the trimmed tau + Delta drops disagreeing entries."""

    method = "onties"


MERGING_OPTIMIZERS: dict[str, type[MergingAdamW]] = {"ondare": OnDAREAdamW, "onties": OnTIESAdamW}
