"""The online merging optimizers against torch's AdamW, against the formula computed by hand, and on the
things that go wrong quietly: masks, sign election, memory, resume, bf16 weights, sharded parameters."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from alignment.optim import (DRAW_BLOCK, CheckpointState, OnDAREAdamW, OnTIESAdamW, shard_uniform, stochastic_round_,
                             uniform_range)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _states(model: torch.nn.Module, scale: float = 0.05) -> tuple[dict, dict]:
    """A base and a reference state dict: the reference is the base plus a random tau."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    reference = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    return base, reference


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 4, generator=generator)
    return torch.nn.functional.mse_loss(model(inputs), targets)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        _loss(model, step).backward()
        optimizer.step()


def _groups(model: torch.nn.Module) -> list[dict]:
    """Decay for matrices, none for biases, as the trainers group them."""
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if p.ndim > 1], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if p.ndim <= 1], "weight_decay": 0.0}]


@pytest.mark.parametrize("optimizer_class, tau_scale", [(OnDAREAdamW, 0.05), (OnTIESAdamW, 0.0)])
def test_alpha_0_and_p_1_is_adamw_over_20_steps(optimizer_class, tau_scale):
    """OnTIES only where tau = 0: tau votes on the sign even when alpha = 0 gives it no weight."""
    ours, stock = _model(), _model()
    base, reference = _states(ours, tau_scale)
    merging = optimizer_class(_groups(ours), base, reference, lr=1e-2, alpha=0.0, reserve_rate=1.0)
    adamw = torch.optim.AdamW([{"params": [p for _, p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in _groups(stock)], lr=1e-2)
    _train(ours, merging, range(20))
    _train(stock, adamw, range(20))
    moved = max((p - base[n]).abs().max().item() for n, p in ours.named_parameters())
    assert moved > 0.05  # the steps did something to compare
    for (name, mine), theirs in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=name)


def test_ondare_alpha_0_updates_about_p_of_the_entries_each_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(200, 500))
    base = {"w": torch.zeros(200, 500)}
    optimizer = OnDAREAdamW([("w", weight)], base, base, lr=1e-3, alpha=0.0, reserve_rate=0.3)
    shares, masks = [], []
    for step in range(3):
        before = weight.detach().clone()
        weight.grad = torch.randn(200, 500)
        optimizer.step()
        changed = weight.detach() != before
        shares.append(changed.float().mean().item())
        masks.append(changed)
    assert all(abs(share - 0.3) < 0.01 for share in shares), shares
    assert (masks[0] & masks[1]).float().mean().item() == pytest.approx(0.09, abs=0.01)  # a fresh mask each step


def test_alpha_above_0_and_p_1_is_the_formula_by_hand():
    lr, alpha, decay, eps, (beta1, beta2) = 0.1, 0.25, 0.2, 1e-8, (0.9, 0.999)
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    base, reference = {"w": torch.tensor([0.5, 0.5, 0.5])}, {"w": torch.tensor([1.5, 0.0, 0.5])}
    tau = reference["w"] - base["w"]
    optimizer = OnDAREAdamW([("w", weight)], base, reference, lr=lr, alpha=alpha, reserve_rate=1.0,
                            weight_decay=decay)
    expected, m, v = weight.detach().clone().double(), torch.zeros(3, dtype=torch.float64), torch.zeros(3).double()
    for step, grad in enumerate([torch.tensor([0.3, -1.0, 2.0]), torch.tensor([-0.5, 0.1, 0.0])], start=1):
        weight.grad = grad.clone()
        optimizer.step()
        m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad.double() ** 2
        delta = -lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
        expected = expected * (1 - lr * decay) + (1 - alpha) * delta + alpha * tau
        torch.testing.assert_close(weight.detach().double(), expected, rtol=0, atol=1e-6)


def test_onties_trims_to_the_top_p_then_elects_the_sign_of_tau_plus_delta():
    """First Adam step with eps = 1: Delta = -lr g / (|g| + 1); lr = 2, g = (3, -1, 0.6, -3, 0.2, -0.2)
    -> Delta = (-1.5, 1, -0.75, 1.5, -1/3, 1/3), top half (0, 1, 3); tau's top half (0, 1, 2).
    Votes: 0: -1.5 + 4 (tau wins), 1: 1 - 2 (tau wins), 2: tau alone, 3: Delta alone."""
    weight = torch.nn.Parameter(torch.zeros(6))
    base = {"w": torch.zeros(6)}
    reference = {"w": torch.tensor([4.0, -2.0, -0.5, 0.1, 0.3, 0.2])}
    optimizer = OnTIESAdamW([("w", weight)], base, reference, lr=2.0, eps=1.0, alpha=0.5, reserve_rate=0.5)
    weight.grad = torch.tensor([3.0, -1.0, 0.6, -3.0, 0.2, -0.2])
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([2.0, -1.0, -0.25, 0.75, 0.0, 0.0]), rtol=0, atol=1e-6)


def test_onties_sign_election_on_hand_built_values_with_p_1():
    """p = 1 keeps everything: entry 0 Delta -1 vs tau +2 (tau wins), entry 1 both +, entry 2 Delta -1
    vs tau +0.5 (Delta wins), entry 3 Delta +1 vs tau -3 (tau wins)."""
    weight = torch.nn.Parameter(torch.zeros(4))
    base, reference = {"w": torch.zeros(4)}, {"w": torch.tensor([2.0, 2.0, 0.5, -3.0])}
    optimizer = OnTIESAdamW([("w", weight)], base, reference, lr=1.0, eps=1e-12, alpha=0.5, reserve_rate=1.0)
    weight.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])  # Delta = (-1, 1, -1, 1)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0, 1.5, -0.5, -1.5]), rtol=0, atol=1e-6)


def test_sparse_tau_costs_under_10_percent_of_the_weights_at_p_001():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    base, reference = _states(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for optimizer in (OnTIESAdamW(model.named_parameters(), base, reference, lr=1e-3, reserve_rate=0.01),
                      OnDAREAdamW(model.named_parameters(), base, reference, lr=1e-3, reserve_rate=0.01,
                                  tau_mask="fixed")):
        share = optimizer.merge_state_bytes() / weight_bytes
        print(f"{type(optimizer).__name__}: tau kept in {optimizer.merge_state_bytes()} bytes, "
              f"{share:.2%} of the weights' {weight_bytes}")
        assert 0.015 < share < 0.025  # 8 bytes per kept entry, p = 1%
    step_mask = OnDAREAdamW(model.named_parameters(), base, reference, lr=1e-3, reserve_rate=0.01)
    assert step_mask.merge_state_bytes() == 0  # read from the states each step


@pytest.mark.parametrize("optimizer_class", [OnDAREAdamW, OnTIESAdamW])
def test_state_dict_resume_gives_the_same_next_step(optimizer_class):
    model = _model()
    base, reference = _states(model)
    kwargs = dict(lr=1e-2, alpha=0.1, reserve_rate=0.2, weight_decay=0.1, merge_every=2, seed=3)
    optimizer = optimizer_class(_groups(model), base, reference, **kwargs)
    _train(model, optimizer, range(5))
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(model, optimizer, range(5, 7))
    resumed = _model(seed=9)
    resumed.load_state_dict(saved_model)
    optimizer = optimizer_class(_groups(resumed), base, reference, **kwargs)
    optimizer.load_state_dict(saved_optimizer)
    _train(resumed, optimizer, range(5, 7))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_merge_every_k_moves_every_parameter_on_the_plain_steps():
    model = _model()
    base, reference = _states(model)
    optimizer = OnDAREAdamW(model.named_parameters(), base, reference, lr=1e-2, reserve_rate=0.01, merge_every=3)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, range(1))  # step 1: not a merge step
    assert all((p != b).all() for p, b in zip(model.parameters(), before))
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, range(1, 3))  # steps 2 (plain) and 3 (merged)
    assert all((p != b).float().mean() > 0.99 for p, b in zip(model.parameters(), before))


def test_shard_draws_are_uniform_and_depend_on_the_key_and_the_entry_only():
    """The draws behind masks and rounding: uniform, independent across keys, and across block boundaries
    the same whatever range of the whole tensor a process asks for."""
    whole = torch.empty(3 * DRAW_BLOCK // 1000 + 7, 1000)
    draws = shard_uniform(whole, (0, 1, 2))
    assert draws.shape == (whole.numel(),) and draws.min() >= 0 and draws.max() < 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.003) and draws.var().item() == pytest.approx(1 / 12, abs=0.001)
    other = shard_uniform(whole, (0, 1, 3))
    assert abs(torch.corrcoef(torch.stack([draws, other]))[0, 1].item()) < 0.005
    assert torch.equal(draws, shard_uniform(whole, (0, 1, 2)))
    blocks = draws.view(-1)[: 3 * DRAW_BLOCK].view(3, DRAW_BLOCK)
    assert abs(torch.corrcoef(blocks)[0, 1].item()) < 0.005  # blocks are not one stream repeated
    # The ranges two or three processes would hold, inside a block and across block boundaries.
    for start, stop in ((0, 1000), (1000, DRAW_BLOCK + 5), (DRAW_BLOCK - 3, 2 * DRAW_BLOCK + 7),
                        (2 * DRAW_BLOCK + 7, whole.numel())):
        assert torch.equal(uniform_range(start, stop, (0, 1, 2), draws.device), draws[start:stop]), (start, stop)


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_loses_the_step():
    value = torch.full((100_000,), 1.0 + 2.0**-10)  # between bf16's 1 and 1 + 2**-7
    target = torch.empty(100_000, dtype=torch.bfloat16)
    stochastic_round_(target, value, shard_uniform(value, (0,)))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert target.float().mean().item() == pytest.approx(1.0 + 2.0**-10, abs=2e-5)
    assert value.to(torch.bfloat16).float().mean().item() == 1.0
    half = torch.empty(100_000, dtype=torch.float16)
    stochastic_round_(half, torch.full((100_000,), 1.0 + 2.0**-13), shard_uniform(value, (1,)))
    assert half.float().mean().item() == pytest.approx(1.0 + 2.0**-13, abs=2e-6)


def test_bf16_weights_keep_alpha_tau_that_bf16_addition_rounds_away():
    """No gradient signal (Delta = 0), p = 1: each step adds alpha * tau = 1e-5, 1/800 of bf16's spacing at 1."""
    weight = torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16))
    base, reference = {"w": torch.zeros(50_000)}, {"w": torch.full((50_000,), 0.01)}
    optimizer = OnDAREAdamW([("w", weight)], base, reference, lr=1e-3, alpha=1e-3, reserve_rate=1.0)
    for _ in range(200):
        weight.grad = torch.zeros(50_000, dtype=torch.bfloat16)
        optimizer.step()
    assert optimizer.state[weight]["exp_avg"].dtype == torch.float32
    assert weight.float().mean().item() == pytest.approx(1.0 + 200 * 1e-5, abs=2e-4)  # + 2e-3 in expectation


def test_checkpoint_folders_are_read_lazily_and_equal_state_dicts(tmp_path):
    model = _model()
    base, reference = _states(model)
    for name, state in (("base", base), ("reference", reference)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / name / "model.safetensors")
    lazy = CheckpointState(tmp_path / "reference")
    assert set(lazy) == set(reference)
    assert torch.equal(lazy.read("2.weight", (slice(1, 3),)), reference["2.weight"][1:3])
    runs = []
    for states in ((base, reference), (str(tmp_path / "base"), tmp_path / "reference")):
        trained = _model()
        optimizer = OnDAREAdamW(trained.named_parameters(), *states, lr=1e-2, alpha=0.1, reserve_rate=0.5)
        _train(trained, optimizer, range(3))
        runs.append([p.detach() for p in trained.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_bad_arguments_and_missing_tensors_are_named():
    model = _model()
    base, reference = _states(model)
    with pytest.raises(ValueError, match="reserve_rate"):
        OnDAREAdamW(model.named_parameters(), base, reference, lr=1e-3, reserve_rate=0.0)
    with pytest.raises(ValueError, match="named_params"):
        OnDAREAdamW(model.parameters(), base, reference, lr=1e-3)
    with pytest.raises(KeyError, match="base state has no tensor '0.bias'"):
        OnDAREAdamW(model.named_parameters(), {k: v for k, v in base.items() if k != "0.bias"}, reference, lr=1e-3)
    with pytest.raises(ValueError, match="2.weight: reference and base have shapes"):
        OnDAREAdamW(model.named_parameters(), base, reference | {"2.weight": torch.zeros(2, 2)}, lr=1e-3)


SHARDED_RUNS = {"onties": (OnTIESAdamW, {"reserve_rate": 1.0}),
                "ondare": (OnDAREAdamW, {"reserve_rate": 0.5}), "ondare-fixed": (OnDAREAdamW, {"reserve_rate": 0.5,
                                                                                             "tau_mask": "fixed"})}


def _sharded_worker(rank: int, world: int, port: int, results: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for run, (optimizer_class, options) in SHARDED_RUNS.items():
        model = _model()
        base, reference = _states(model)
        fully_shard(model)
        optimizer = optimizer_class(model.named_parameters(), base, reference, lr=1e-2, alpha=0.3, **options)
        _train(model, optimizer, range(3))
        full = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        if rank == 0:
            results[run] = full
    dist.barrier()  # neither rank tears its connections down while the other still uses them (gloo aborts)
    dist.destroy_process_group()


def test_fsdp2_shards_merge_with_their_own_slice_of_tau():
    """Two gloo processes, each holding half of every parameter (FSDP2): the merged result equals one
    process's. OnTIES at p = 1 checks which slice of tau meets which shard; OnDARE at p = 0.5 also that each
    shard draws the entries one process draws for them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_sharded_worker, args=(2, port, results), nprocs=2, join=True)
    for run, (optimizer_class, options) in SHARDED_RUNS.items():
        model = _model()
        base, reference = _states(model)
        optimizer = optimizer_class(model.named_parameters(), base, reference, lr=1e-2, alpha=0.3, **options)
        _train(model, optimizer, range(3))
        for name, param in model.named_parameters():
            torch.testing.assert_close(results[run][name], param.detach(), rtol=0, atol=1e-6, msg=f"{run}: {name}")
