"""The backbone in training: chunked loss, packing, gradient checkpointing, bf16, KV cache."""

import pytest
import torch
import transformers

from alignment.model import Qwen2ForCausalLM, preset_config
from alignment.model.loss import IGNORE_INDEX, token_logprobs


@pytest.fixture(scope="module")
def pair():
    config = preset_config("tiny-untied", num_hidden_layers=2, initializer_range=0.1)
    torch.manual_seed(0)
    ours = Qwen2ForCausalLM(config)
    stock = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(config.to_dict()))
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _labels(ids):
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # a prompt that carries no loss
    labels[1, -3:] = IGNORE_INDEX
    return labels


def test_loss_and_gradients_match_stock(pair):
    ours, stock = pair
    ids = torch.randint(0, 151_000, (2, 40))
    labels = _labels(ids)
    for m in pair:
        m.zero_grad()
    lo = ours(input_ids=ids, labels=labels)
    ls = stock(input_ids=ids, labels=labels)
    assert lo.logits is None  # the loss never materialises full logits
    assert abs(lo.loss.item() - ls.loss.item()) < 1e-5
    lo.loss.backward(), ls.loss.backward()
    go, gs = dict(ours.named_parameters()), dict(stock.named_parameters())
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert torch.allclose(go[name].grad, gs[name].grad, atol=1e-6, rtol=1e-4), name


def test_frozen_lm_head_trains_the_rest(pair):
    """LoRA-style: the head (tied to the embeddings) frozen, gradients still reach the layers."""
    ours, stock = pair
    ids = torch.randint(0, 151_000, (2, 16))
    for m in pair:
        m.zero_grad()
        m.lm_head.weight.requires_grad_(False)
    try:
        ours(input_ids=ids, labels=ids).loss.backward()
        stock(input_ids=ids, labels=ids).loss.backward()
    finally:
        for m in pair:
            m.lm_head.weight.requires_grad_(True)
    assert ours.lm_head.weight.grad is None
    go, gs = ours.model.layers[1].mlp.down_proj.weight.grad, stock.model.layers[1].mlp.down_proj.weight.grad
    assert torch.allclose(go, gs, atol=1e-6, rtol=1e-4)


def test_num_items_in_batch_scales_like_stock(pair):
    ours, stock = pair
    ids = torch.randint(0, 151_000, (2, 16))
    with torch.no_grad():
        a = ours(input_ids=ids, labels=ids, num_items_in_batch=100).loss
        b = stock(input_ids=ids, labels=ids, num_items_in_batch=100).loss
    assert abs(a.item() - b.item()) < 1e-6


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5000, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5000, (300,))
    y[::7] = IGNORE_INDEX
    g = torch.randn(300, dtype=torch.float64)
    ref = torch.log_softmax(h @ w.T, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1) * (y != IGNORE_INDEX)
    ours = token_logprobs(h, w, y)
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    gh_ref, gw_ref = torch.autograd.grad((ref * g).sum(), (h, w))
    gh, gw = torch.autograd.grad((ours * g).sum(), (h, w))
    assert torch.allclose(gh, gh_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)


def test_packed_samples_do_not_attend_across(pair):
    ours, _ = pair
    ours.eval()
    a, b = torch.randint(0, 151_000, (1, 9)), torch.randint(0, 151_000, (1, 14))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    with torch.no_grad():
        lp = ours(input_ids=packed, position_ids=pos).logits
        la, lb = ours(input_ids=a).logits, ours(input_ids=b).logits
    assert (lp[:, :9] - la).abs().max() < 1e-5
    assert (lp[:, 9:] - lb).abs().max() < 1e-5
    labels = packed.clone()
    labels[0, 9] = IGNORE_INDEX  # no prediction across the boundary
    with torch.no_grad():
        loss_packed = ours(input_ids=packed, position_ids=pos, labels=labels, num_items_in_batch=1).loss
        loss_a = ours(input_ids=a, labels=a, num_items_in_batch=1).loss
        loss_b = ours(input_ids=b, labels=b, num_items_in_batch=1).loss
    assert abs(loss_packed.item() - (loss_a + loss_b).item()) < 1e-3


def test_gradient_checkpointing_gives_same_gradients(pair):
    ours, _ = pair
    ours.train()
    ids = torch.randint(0, 151_000, (2, 24))
    ours.zero_grad()
    ours(input_ids=ids, labels=ids).loss.backward()
    ref = ours.model.layers[0].mlp.up_proj.weight.grad.clone()
    ours.gradient_checkpointing_enable()
    try:
        ours.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        assert torch.allclose(ours.model.layers[0].mlp.up_proj.weight.grad, ref, atol=1e-6)
    finally:
        ours.gradient_checkpointing_disable()
        ours.eval()


def test_kv_cache_decoding_matches_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(0, 151_000, (2, 30))
    with torch.no_grad():
        full = ours(input_ids=ids).logits
        out = ours(input_ids=ids[:, :20], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(20, 30):
            out = ours(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_bf16_forward_backward_runs_and_agrees(pair):
    ours, _ = pair
    model = Qwen2ForCausalLM(ours.config).to(torch.bfloat16)
    model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 151_000, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
    with torch.no_grad():
        ref = ours(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02
