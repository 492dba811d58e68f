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


def test_token_stats_match_full_softmax():
    torch.manual_seed(1)
    h = torch.randn(70, 16, requires_grad=True)
    w = torch.randn(3000, 16, requires_grad=True)
    y = torch.randint(0, 3000, (70,))
    y[5] = IGNORE_INDEX
    y[6] = (h[6] @ w.T).argmax()  # one label that is the argmax
    stats = token_logprobs(h, w, y, with_stats=True)
    logits = h @ w.T
    logp = torch.log_softmax(logits, -1)
    keep = y != IGNORE_INDEX
    ref = logp.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    assert torch.allclose(stats.log_probs[keep], ref[keep], atol=1e-5)
    entropy = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(stats.entropy[keep], entropy[keep], atol=1e-3)  # lse - E[z]: fp32 cancellation
    assert torch.allclose(stats.mean_logits[keep], logits.mean(-1)[keep], atol=1e-5)
    log_sum_sq = torch.logsumexp(2 * logp, -1)  # WPO's log sum_v p_v^2
    assert torch.allclose(stats.log_sum_sq_probs[keep], log_sum_sq[keep], atol=1e-4)
    assert torch.equal(stats.is_top1[keep], (logits.argmax(-1) == y)[keep]) and stats.is_top1[6]
    assert stats.log_probs[5] == 0 and stats.entropy[5] == 0


def test_fused_lm_head_protocol_matches_trl_kernel(pair):
    """Our answer to TRL's `fused_lm_head=True` call equals TRL's own fused head on the stock model."""
    from trl.trainer.utils import add_fused_lm_head

    ours, stock = pair
    add_fused_lm_head(stock, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    ids = torch.randint(0, 151_000, (2, 20))
    labels = _labels(ids)
    with torch.no_grad():
        a = ours(input_ids=ids, labels=labels, fused_lm_head=True)
        b = stock(input_ids=ids, labels=labels, fused_lm_head=True)
    assert a.log_probs.shape == b.log_probs.shape == (2, 19)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        assert torch.allclose(getattr(a, name) * a.label_mask, getattr(b, name) * b.label_mask, atol=1e-4), name
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    del stock.forward  # back to the class's forward for the other tests


def test_autocast_bf16_loss_and_gradients_close_to_fp32(pair):
    ours, _ = pair
    ids = torch.randint(0, 151_000, (2, 24))
    ours.zero_grad()
    ours(input_ids=ids, labels=ids).loss.backward()
    ref = ours.lm_head.weight.grad.clone()
    ours.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(input_ids=ids, labels=ids)
    out.loss.backward()
    assert ours.lm_head.weight.grad.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ours.lm_head.weight.grad.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
    assert 0 <= out.num_correct <= out.num_labels == 2 * 23
