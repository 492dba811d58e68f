"""Qwen2 MoE: grouped expert compute, parity with stock transformers' qwen2_moe, training."""

import copy
import json

import pytest
import torch
import transformers
from helpers.batches import padded_batch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from safetensors import safe_open

from alignment.checkpoint import load_causal_lm
from alignment.model import Qwen2MoeConfig, Qwen2MoeForCausalLM, preset_config
from alignment.model.mlp import Qwen2MLP
from alignment.model.moe import grouped_experts, is_moe_layer, route

# Three routing set-ups: renormalised top-k, raw top-k probabilities (Qwen2-57B-A14B), and a mix
# of dense and sparse layers (MoE only at layers 1 and 5: step 2, with layer 3 forced dense).
CASES = {
    "norm_topk": dict(num_hidden_layers=2, norm_topk_prob=True),
    "raw_topk": dict(num_hidden_layers=2, norm_topk_prob=False),
    "mixed_layers": dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]),
}


def _config(case: str, **extra) -> Qwen2MoeConfig:
    # std 0.1: logits of ~6 and diverse greedy tokens. (At 0.5 the residual stream reaches ~1e3 and the
    # float32 rounding of stock's differently grouped matmuls alone moves logits by ~1e-4.)
    return preset_config("tiny-moe", **{"initializer_range": 0.1, **CASES[case], **extra})


def _stock(config: Qwen2MoeConfig) -> transformers.Qwen2MoeForCausalLM:
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig.from_dict(config.to_dict()))


def _reference_experts(x, weights, experts, modules):
    """Token by token, expert by expert: the definition, for checking the grouped kernel."""
    rows = []
    for t in range(x.shape[0]):
        rows.append(sum(weights[t, j] * modules[int(experts[t, j])](x[t : t + 1])[0] for j in range(experts.shape[1])))
    return torch.stack(rows)


def test_moe_layer_placement_follows_stock_rule():
    config = _config("mixed_layers")
    assert [is_moe_layer(config, i) for i in range(6)] == [False, True, False, False, False, True]
    model = Qwen2MoeForCausalLM(config)
    stock = _stock(config)
    for ours_layer, stock_layer in zip(model.model.layers, stock.model.layers):
        assert type(ours_layer.mlp).__name__.endswith("MoeBlock") == type(stock_layer.mlp).__name__.endswith("MoeBlock")


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_grouped_experts_match_token_by_token_reference(norm_topk_prob):
    torch.manual_seed(0)
    num_experts, top_k, hidden = 6, 2, 16
    modules = torch.nn.ModuleList(Qwen2MLP(hidden, 8) for _ in range(num_experts)).double()
    x = torch.randn(37, hidden, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(37, num_experts, dtype=torch.float64)
    logits[:, 4:] = -1e4  # experts 4 and 5 never chosen: no work, zero gradient
    logits.requires_grad_()
    grad_out = torch.randn(37, hidden, dtype=torch.float64)

    weights, experts = route(logits, top_k, norm_topk_prob)
    assert set(experts.unique().tolist()) == {0, 1, 2, 3}
    ours = grouped_experts(x, weights, experts, modules)
    params = [x, logits, *modules.parameters()]
    grads = torch.autograd.grad((ours * grad_out).sum(), params, retain_graph=True)  # route() is shared

    ref = _reference_experts(x, weights, experts, modules)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), params, allow_unused=True, materialize_grads=True)
    assert torch.allclose(ours, ref, atol=1e-12)
    for name, a, b in zip(["x", "router logits", *dict(modules.named_parameters())], grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-12), name
    for p, gr in zip(modules.parameters(), grads[2:]):
        assert gr.shape == p.shape
    assert all(not gr.any() for gr in grads[2 + 3 * 4 :]), "unused experts must get exactly zero gradient"


EXPERT_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


def test_experts_with_lora_adapters_match_the_reference_and_train_the_adapters():
    """Wrapped projections run through each expert's forward: output and every gradient as token by token."""
    torch.manual_seed(0)
    modules = torch.nn.ModuleList(Qwen2MLP(16, 8) for _ in range(6)).double()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=EXPERT_PROJECTIONS, init_lora_weights=False)
    modules = inject_adapter_in_model(lora, modules)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(37, 6, dtype=torch.float64)
    logits[:, 4:] = -1e4  # experts 4 and 5 get no token
    logits.requires_grad_()
    grad_out = torch.randn(37, 16, dtype=torch.float64)

    weights, experts = route(logits, 2, False)
    adapters = {n: p for n, p in modules.named_parameters() if "lora_" in n}
    assert len(adapters) == 6 * 3 * 2 and all(p.requires_grad for p in adapters.values())
    ours = grouped_experts(x, weights, experts, modules)
    params = [x, logits, *adapters.values()]
    grads = torch.autograd.grad((ours * grad_out).sum(), params, retain_graph=True, allow_unused=True)
    ref = _reference_experts(x, weights, experts, modules)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), params, allow_unused=True)
    assert torch.allclose(ours, ref, atol=1e-12)
    for name, a, b in zip(["x", "router logits", *adapters], grads, ref_grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-12)), name
        if name.startswith(("0.", "1.", "2.", "3.")):  # experts that got tokens: their adapters learn
            assert a is not None and a.abs().max() > 0, name
        elif name.startswith(("4.", "5.")):
            assert a is None, name


def _lora_moe(base: Qwen2MoeForCausalLM):
    """`base` (copied) with LoRA adapters on every expert projection, attention's q/v and the shared expert."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[*EXPERT_PROJECTIONS, "q_proj", "v_proj"])
    return get_peft_model(copy.deepcopy(base), config)


def _expert_adapters(model) -> dict[str, torch.nn.Parameter]:
    """The LoRA A and B matrices on routed experts (not the shared expert), by name."""
    return {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}


def test_lora_on_moe_experts_starts_as_the_base_model_and_trains_the_expert_adapters():
    torch.manual_seed(0)
    base = Qwen2MoeForCausalLM(_config("raw_topk")).eval()
    model = _lora_moe(base)
    experts = _expert_adapters(model)
    assert len(experts) == 2 * 8 * 3 * 2  # layers x experts x projections x (A, B)
    ids = torch.randint(0, 151_000, (2, 12))
    with torch.no_grad():  # lora_B = 0: the adapters add nothing yet
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() <= 1e-5

    # With lora_B drawn too, one backward reaches A and B of exactly the experts that got tokens the
    # loss depends on: the 2 of 3 tokens that predict a label, at most 4 of the 8 experts per layer.
    with torch.no_grad():
        for name, p in experts.items():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    out = model(input_ids=ids[:1, :3], labels=ids[:1, :3], output_router_logits=True)
    out.loss.backward()
    for layer, router_logits in enumerate(out.router_logits):
        used = set(router_logits[:-1].topk(2).indices.flatten().tolist())
        for name, p in experts.items():
            if f"layers.{layer}.mlp.experts." in name:
                expert = int(name.split(".experts.")[1].split(".")[0])
                assert (p.grad is not None and p.grad.abs().max() > 0) == (expert in used), name

    # A few steps on one fixed batch: the loss falls and the expert adapters move.
    model.zero_grad()
    start = {n: p.detach().clone() for n, p in experts.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    moved = [n for n, p in experts.items() if not torch.equal(p, start[n])]
    assert {n.split(".experts.")[1].split(".")[1] for n in moved} == set(EXPERT_PROJECTIONS)


@pytest.mark.parametrize("direction", ["stock_to_ours", "ours_to_stock"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_stock(tmp_path, case, direction):
    config = _config(case)
    torch.manual_seed(1)
    if direction == "stock_to_ours":
        src, load = _stock(config), Qwen2MoeForCausalLM
    else:
        src, load = Qwen2MoeForCausalLM(config), transformers.Qwen2MoeForCausalLM
    src.save_pretrained(tmp_path)
    dst, info = load.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    src.eval(), dst.eval()

    ids, mask, pos = padded_batch(24)
    with torch.no_grad():
        a = src(input_ids=ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
        b = dst(input_ids=ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
    valid = mask.bool()
    assert (a.logits[valid] - b.logits[valid]).abs().max().item() <= 1e-5
    num_sparse = sum(is_moe_layer(config, i) for i in range(config.num_hidden_layers))
    assert len(a.router_logits) == len(b.router_logits) == num_sparse
    for ra, rb in zip(a.router_logits, b.router_logits):
        ra, rb = ra[valid.flatten()], rb[valid.flatten()]
        assert (ra - rb).abs().max().item() <= 1e-5
        assert torch.equal(ra.topk(config.num_experts_per_tok).indices, rb.topk(config.num_experts_per_tok).indices)
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= 1e-6

    prompt_ids, prompt_mask = ids[:, -20:], mask[:, -20:]
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=151643)
    ga = src.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)[:, 20:]
    gb = dst.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)[:, 20:]
    assert ga.shape == (3, 32)
    assert torch.equal(ga, gb)
    assert len(set(ga.flatten().tolist())) > 12, "weights too small: greedy output is degenerate"


def test_saves_the_hub_layout_that_stock_writes(tmp_path):
    config = _config("mixed_layers")
    torch.manual_seed(0)
    Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "ours")
    _stock(config).save_pretrained(tmp_path / "stock")
    keys = {}
    for name in ("ours", "stock"):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            keys[name] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert keys["ours"] == keys["stock"]
    assert keys["ours"]["model.layers.1.mlp.experts.7.down_proj.weight"] == [128, 96]
    assert keys["ours"]["model.layers.1.mlp.shared_expert_gate.weight"] == [1, 128]
    assert "model.layers.0.mlp.gate_proj.weight" in keys["ours"]  # a dense layer

    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "qwen2_moe" and saved["architectures"] == ["Qwen2MoeForCausalLM"]
    assert saved["rope_theta"] == 1_000_000.0 and "dual_chunk_attention_config" not in saved
    assert (saved["num_experts"], saved["num_experts_per_tok"], saved["moe_intermediate_size"]) == (8, 2, 96)
    assert saved["decoder_sparse_step"] == 2 and saved["mlp_only_layers"] == [3]
    assert isinstance(load_causal_lm(tmp_path / "ours"), Qwen2MoeForCausalLM)


def test_loss_adds_weighted_aux_loss_and_matches_stock_gradients():
    config = _config("raw_topk", tie_word_embeddings=False, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    ours = Qwen2MoeForCausalLM(config)
    stock = _stock(config)
    stock.load_state_dict(_stock_state_dict(ours, stock))
    ids = torch.randint(0, 151_000, (2, 40))
    labels = ids.clone()
    labels[:, :7] = -100
    lo = ours(input_ids=ids, labels=labels, output_router_logits=True)
    ls = stock(input_ids=ids, labels=labels, output_router_logits=True)
    assert lo.logits is None
    with torch.no_grad():
        lm_only = ours(input_ids=ids, labels=labels).loss
    assert abs(lo.loss.item() - (lm_only + 0.5 * lo.aux_loss).item()) < 1e-6
    assert abs(lo.loss.item() - ls.loss.item()) < 1e-5
    lo.loss.backward(), ls.loss.backward()
    layer_o, layer_s = ours.model.layers[1].mlp, stock.model.layers[1].mlp
    assert torch.allclose(layer_o.gate.weight.grad, layer_s.gate.weight.grad, atol=1e-6, rtol=1e-4)
    gate_up = torch.cat([layer_o.experts[3].gate_proj.weight.grad, layer_o.experts[3].up_proj.weight.grad])
    assert torch.allclose(gate_up, layer_s.experts.gate_up_proj.grad[3], atol=1e-6, rtol=1e-4)
    close = dict(atol=1e-6, rtol=1e-4)
    assert torch.allclose(layer_o.experts[3].down_proj.weight.grad, layer_s.experts.down_proj.grad[3], **close)
    assert torch.allclose(layer_o.shared_expert_gate.weight.grad, layer_s.shared_expert_gate.weight.grad, **close)


def test_fused_lm_head_call_matches_trls_fused_head_on_stock():
    """TRL's trainers call MoE models with `fused_lm_head=True`; ours answers as TRL's own head on stock."""
    from trl.trainer.utils import add_fused_lm_head

    config = _config("raw_topk", tie_word_embeddings=False, router_aux_loss_coef=0.5, output_router_logits=True)
    torch.manual_seed(0)
    ours = Qwen2MoeForCausalLM(config)
    stock = _stock(config)
    stock.load_state_dict(_stock_state_dict(ours, stock))
    add_fused_lm_head(stock)
    ids, mask, _ = padded_batch(24)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # nor first tokens predicted from padding (hidden states there differ)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    b = stock(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert torch.equal(a.label_mask, b.label_mask)
    assert torch.allclose(a.log_probs, b.log_probs, atol=1e-5)
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= 1e-6
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def _stock_state_dict(ours: Qwen2MoeForCausalLM, stock: transformers.Qwen2MoeForCausalLM) -> dict:
    """Our per-expert weights fused into stock's in-memory [E, 2I, H] / [E, H, I] parameters."""
    sd = dict(ours.state_dict())
    for i, layer in enumerate(ours.model.layers):
        if not layer.sparse:
            continue
        p = f"model.layers.{i}.mlp.experts."
        e = range(len(layer.mlp.experts))
        gate = torch.stack([sd.pop(f"{p}{j}.gate_proj.weight") for j in e])
        up = torch.stack([sd.pop(f"{p}{j}.up_proj.weight") for j in e])
        sd[p + "gate_up_proj"] = torch.cat([gate, up], 1)
        sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{j}.down_proj.weight") for j in e])
    return sd


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(_config("mixed_layers"))


def test_kv_cache_decoding_matches_full_forward(moe):
    moe.eval()
    ids = torch.randint(0, 151_000, (2, 30))
    with torch.no_grad():
        full = moe(input_ids=ids).logits
        out = moe(input_ids=ids[:, :20], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(20, 30):
            out = moe(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    # Looser than the dense test's 1e-5: an expert's matmul over 1-2 decode rows rounds differently
    # from the same expert's over the whole prompt.
    assert (torch.cat(steps, 1) - full).abs().max() < 5e-5


def test_gradient_checkpointing_gives_same_gradients(moe):
    moe.train()
    ids = torch.randint(0, 151_000, (2, 24))
    expert = moe.model.layers[1].mlp.experts[0].up_proj.weight
    moe.zero_grad()
    moe(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
    ref = expert.grad.clone()
    moe.gradient_checkpointing_enable()
    try:
        moe.zero_grad()
        moe(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
        assert torch.allclose(expert.grad, ref, atol=1e-6)
    finally:
        moe.gradient_checkpointing_disable()
        moe.eval()


def test_bf16_forward_backward_runs_and_agrees(moe):
    model = Qwen2MoeForCausalLM(moe.config).to(torch.bfloat16)
    model.load_state_dict(moe.state_dict())
    ids = torch.randint(0, 151_000, (2, 24))
    loss = model(input_ids=ids, labels=ids, output_router_logits=True).loss
    loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.dtype == torch.bfloat16
    with torch.no_grad():
        ref = moe(input_ids=ids, labels=ids, output_router_logits=True).loss
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02


def test_57b_preset_and_hub_config(tmp_path):
    config = preset_config("qwen2-57b-a14b")
    assert isinstance(config, Qwen2MoeConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        3584, 28, 28, 4)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (64, 8, 2560)
    assert config.shared_expert_intermediate_size == 20480 and not config.norm_topk_prob
    assert config.router_aux_loss_coef == 0.001 and not config.tie_word_embeddings and config.vocab_size == 151936
    # The released config.json has no mlp_only_layers (vLLM notes it); it must still read.
    hub = {k: v for k, v in config.to_dict().items() if k not in ("mlp_only_layers", "rope_parameters")}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    read = Qwen2MoeConfig.from_pretrained(tmp_path)
    assert read.mlp_only_layers == [] and read.rope_parameters["rope_theta"] == 1e6
    assert all(is_moe_layer(read, i) for i in range(28))


def test_loading_a_non_qwen2_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not one of qwen2, qwen2_moe"):
        load_causal_lm(tmp_path)
