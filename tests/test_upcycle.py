"""Upcycling a dense checkpoint into an MoE: the report's four steps, determinism, loading, training."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from helpers.cli import run_cli

from alignment.checkpoint import init_checkpoint, load_causal_lm
from alignment.model import Qwen2MoeForCausalLM
from alignment.upcycle import upcycle
from qwen2_align.cli import main

SHAPE = dict(num_experts=8, top_k=2, expert_size=96, shared_size=384)  # tiny-moe from tiny (h_F = 384)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    dense = init_checkpoint("tiny", root / "dense", seed=0)  # initializer_range 0.02
    return {
        "dense": dense,
        "plain": upcycle(dense, root / "plain", **SHAPE, reinit_fraction=0.0, seed=7),
        "reinit": upcycle(dense, root / "reinit", **SHAPE, reinit_fraction=0.5, seed=7),
    }


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_experts_cut_from_one_shuffled_copy_sum_to_the_dense_ffn(ckpts):
    dense = load_causal_lm(ckpts["dense"]).double().eval()
    moe = load_causal_lm(ckpts["plain"]).double().eval()
    assert isinstance(moe, Qwen2MoeForCausalLM)
    x = torch.randn(5, 128, dtype=torch.float64) * 3
    per_copy = 384 // 96  # experts 0-3 come from the first shuffled copy, 4-7 from the second
    for layer_d, layer_m in zip(dense.model.layers, moe.model.layers):
        with torch.no_grad():
            ref = layer_d.mlp(x)
            for copy in range(2):
                experts = layer_m.mlp.experts[copy * per_copy : (copy + 1) * per_copy]
                assert (sum(e(x) for e in experts) - ref).abs().max() <= 1e-5
            # Shared expert at h_S = h_F with its zero gate: sigmoid(0) * 2 * dense = the dense FFN.
            shared = torch.sigmoid(layer_m.mlp.shared_expert_gate(x)) * layer_m.mlp.shared_expert(x)
            assert (shared - ref).abs().max() <= 1e-5
        neurons = torch.cat([e.gate_proj.weight for e in layer_m.mlp.experts[:per_copy]])
        assert not torch.equal(neurons, layer_d.mlp.gate_proj.weight), "each copy must be shuffled"
        assert torch.equal(neurons.sort(0).values, layer_d.mlp.gate_proj.weight.sort(0).values)


def test_upcycled_model_starts_close_to_the_dense_model(ckpts):
    dense, moe = load_causal_lm(ckpts["dense"]).eval(), load_causal_lm(ckpts["reinit"]).eval()
    ids = torch.randint(0, 151_000, (2, 32))
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, moe(input_ids=ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.1  # the shared expert carries the dense FFN
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8


def test_half_of_each_experts_parameters_are_redrawn(ckpts):
    plain, reinit = _weights(ckpts["plain"]), _weights(ckpts["reinit"])
    for layer in range(4):
        for e in range(SHAPE["num_experts"]):
            names = [f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
            changed = torch.cat([(plain[n] != reinit[n]).flatten() for n in names])
            assert abs(changed.float().mean().item() - 0.5) <= 0.01
        redrawn = reinit[names[0]][plain[names[0]] != reinit[names[0]]]
        assert abs(redrawn.mean().item()) < 0.002 and abs(redrawn.std().item() - 0.02) < 0.002  # N(0, 0.02)
        for name in ("shared_expert.down_proj.weight", "gate.weight", "shared_expert_gate.weight"):
            key = f"model.layers.{layer}.mlp.{name}"
            assert torch.equal(plain[key], reinit[key]), key  # the shared expert and router are not re-drawn


def test_non_ffn_weights_are_copied_and_router_starts_small(ckpts):
    dense, moe = _weights(ckpts["dense"]), _weights(ckpts["reinit"])
    copied = [k for k in dense if ".mlp." not in k]
    assert copied and all(torch.equal(dense[k], moe[k]) for k in copied)
    router = moe["model.layers.0.mlp.gate.weight"]
    assert router.shape == (8, 128) and abs(router.std().item() - 0.02) < 0.004
    assert not moe["model.layers.0.mlp.shared_expert_gate.weight"].any()
    assert not any(k.startswith("model.layers.0.mlp.gate_proj") for k in moe)


def test_same_seed_same_checkpoint_and_sharded_output_loads_in_stock(ckpts, tmp_path):
    again = upcycle(ckpts["dense"], tmp_path / "again", **SHAPE, reinit_fraction=0.5, seed=7,
                    max_shard_bytes=30 * 2**20)
    files = sorted(p.name for p in again.glob("*.safetensors"))
    assert len(files) > 1 and (again / "model.safetensors.index.json").exists()
    one = _weights(ckpts["reinit"])
    sharded = {k: v for f in files for k, v in load_file(again / f).items()}
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    other = upcycle(ckpts["dense"], tmp_path / "other", **SHAPE, reinit_fraction=0.5, seed=8)
    assert not torch.equal(_weights(other)["model.layers.0.mlp.experts.0.up_proj.weight"],
                           one["model.layers.0.mlp.experts.0.up_proj.weight"])
    assert (again / "tokenizer.json").exists()

    stock, info = transformers.Qwen2MoeForCausalLM.from_pretrained(again, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_causal_lm(again)
    ids = torch.randint(0, 151_000, (2, 16))
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5


def test_upcycled_tiny_model_trains(ckpts, tokenizer):
    model = load_causal_lm(ckpts["reinit"]).train()
    # The (tied) vocabulary matrix is 19.4M of the 21M parameters: frozen, the step is 3x cheaper and
    # what trains is what upcycling built: the experts, shared expert, routers, attention and norms.
    model.model.embed_tokens.weight.requires_grad_(False)
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Upcycling turns one dense network into many experts.",
        "Each token goes to a few of the experts.",
    ]
    batch = tokenizer(corpus, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):  # the loss drops by ~2.0 in 30 steps (2.1 in 50): the bar is 1.0
        out = model(**batch, labels=labels, output_router_logits=True)
        # The padded batch checks that padding is left out of the load-balancing loss.
        assert abs(out.aux_loss.item() - _switch_loss(out.router_logits, batch["attention_mask"], top_k=2)) < 1e-6
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def _switch_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, top_k: int) -> float:
    """Switch Transformer's load-balancing loss, written out: E * sum_e f_e * P_e over the real tokens of all
    MoE layers, f_e = share of tokens with e among their top-k, P_e = mean router probability of e."""
    real = attention_mask.flatten().bool()
    probs = torch.stack([logits.float().softmax(-1)[real] for logits in router_logits])  # [layers, tokens, E]
    num_experts = probs.shape[-1]
    chosen = F.one_hot(probs.topk(top_k).indices, num_experts).sum(-2).float()  # [layers, tokens, E] of 0/1
    return num_experts * (chosen.mean((0, 1)) * probs.mean((0, 1))).sum().item()


def test_load_balancing_loss_at_uniform_routing_is_top_k(ckpts):
    # Zero routers give every expert probability 1/E: f sums to k over experts, so E * sum_e f_e / E = k.
    model = load_causal_lm(ckpts["reinit"]).eval()
    for layer in model.model.layers:
        layer.mlp.gate.weight.data.zero_()
    ids = torch.randint(0, 151_000, (2, 16))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert out.aux_loss.item() == pytest.approx(SHAPE["top_k"], abs=1e-6)


def test_cli_upcycle_with_preset_and_clear_errors(ckpts, tmp_path, capsys):
    out = run_cli("upcycle", "--dense", str(ckpts["dense"]), "--preset", "tiny-moe", "--top-k", "4", "--seed", "1",
               "--out", str(tmp_path / "moe"))
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_experts_per_tok"] == 4
    shape = (config["num_experts"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"])
    assert shape == (8, 96, 384)
    assert config["original_max_position_embeddings"] == 32768  # the dense checkpoint's trained length, carried

    dense, out = ["--dense", str(ckpts["dense"])], ["--out", str(tmp_path / "bad")]
    errors = {
        "--top-k must be between 1 and --num-experts (4), got 8":
            [*dense, "--num-experts", "4", "--top-k", "8", "--expert-size", "96", "--shared-size", "384", *out],
        "--reinit-fraction must be in [0, 1], got 1.5":
            [*dense, "--preset", "tiny-moe", "--reinit-fraction", "1.5", *out],
        "not a checkpoint directory (no config.json)":
            ["--dense", str(tmp_path / "nope"), "--preset", "tiny-moe", *out],
        "give --preset or --num-experts, --top-k, --expert-size, --shared-size": [*dense, *out],
        "upcycling needs a dense 'qwen2' checkpoint": ["--dense", str(tmp_path / "moe"), "--preset", "tiny-moe", *out],
    }
    for message, args in errors.items():
        assert main(["upcycle", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()
