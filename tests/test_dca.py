"""Dual Chunk Attention: plain RoPE within a block, a brute-force reference beyond it, cached decoding, training."""

import copy
import json
import math
import random

import pytest
import torch
import transformers

from alignment.model import Qwen2Config, Qwen2ForCausalLM, preset_config
from alignment.model.dca import (DualChunkRotary, attention_with_lse, attention_with_lse_backward, block_parts,
                                 cuda_attend, cuda_attend_backward, dual_chunk_attention, enable_long_context,
                                 math_attend, math_attend_backward, query_positions, trained_length_of)
from alignment.model.rope import RotaryEmbedding, apply_rotary, rope_frequencies, rotate_half

THETA = 10_000.0
VOCAB = 4096


def _dca_config(chunk: int, local: int, original: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, **kw):
    dca = {"chunk_size": chunk, "local_size": local, "original_max_position_embeddings": original}
    return preset_config("tiny", num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * head_dim,
                         rope_theta=THETA, dual_chunk_attention_config=dca, **kw)


def reference_dca(q, k, v, pads, block, chunk, original):
    """One softmax over the explicit [n, n] DCA query/key position matrix (the definition, no blocking).

    q: [b, hq, n, d], k, v: [b, hkv, n, d], none rotated; pads: [b] left-pad counts.
    """
    b, hq, n, d = q.shape
    inv_freq, _ = rope_frequencies({"rope_type": "default", "rope_theta": THETA}, d, n)

    def rotate(x, p):  # x [..., d] at integer positions p (broadcast over x's leading dims)
        angle = p[..., None].float() * inv_freq
        emb = torch.cat((angle, angle), -1)
        return x * emb.cos() + rotate_half(x) * emb.sin()

    pos = torch.arange(n)[None] - pads[:, None]  # [b, n]
    i, j = pos[:, :, None], pos[:, None, :]  # [b, n, 1], [b, 1, n]
    ci, cj = i.div(block, rounding_mode="floor"), j.div(block, rounding_mode="floor")
    p_i = i % block
    qpos = torch.where(cj == ci, p_i, torch.where(cj == ci - 1, (p_i + block).clamp(max=chunk), min(2 * block - 1, chunk)))
    g = hq // k.shape[1]
    q_rot = rotate(q[:, :, :, None, :], qpos[:, None])  # [b, hq, n, n, d]
    k_rot = rotate(k, (pos % block)[:, None]).repeat_interleave(g, 1)  # [b, hq, n, d]
    m = (0.1 * torch.log((pos.clamp(min=0) + 1).float() / original) + 1).clamp(min=1)  # YaRN temperature [b, n]
    scores = (q_rot * k_rot[:, :, None]).sum(-1) * m[:, None, :, None] / math.sqrt(d)  # [b, hq, n, n]
    allowed = (j <= i) & (j >= 0)  # causal over real keys
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1).nan_to_num() @ v.repeat_interleave(g, 1)


def _ours(q, k, v, mask, config):
    x = torch.empty(q.shape[0], q.shape[2], 1)
    positions = DualChunkRotary(config)(x, mask, None, 0)
    return dual_chunk_attention(q, apply_rotary(k, *positions.key), v, positions)


CASES = [(seed, heads, padded) for seed in range(3) for heads in ((4, 2), (8, 2)) for padded in (False, True)]


@pytest.mark.parametrize("seed,heads,padded", CASES)
def test_matches_brute_force_reference_forward_and_backward(seed, heads, padded):
    rng = random.Random(seed)
    chunk = rng.randint(8, 40)
    local = rng.randint(0, chunk - 1)
    block = chunk - local
    n = rng.randint(3 * block, 5 * block)
    n += n % block == 0  # never a multiple of L
    original = rng.randint(block, 2 * block)  # the temperature switches on inside the sequence
    hq, hkv = heads
    config = _dca_config(chunk, local, original, hq, hkv)
    torch.manual_seed(seed)
    b, d = 3, 16
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for h in (hq, hkv, hkv))
    pads = torch.tensor([0, 5, n // 3]) if padded else torch.zeros(b, dtype=torch.long)
    mask = (torch.arange(n)[None] >= pads[:, None]).long()
    real = mask.bool()[:, None, :, None]  # queries that are not padding

    out = _ours(q, k, v, mask if padded else None, config)
    ref = reference_dca(q, k, v, pads, block, chunk, original)
    assert ((out - ref) * real).abs().max() <= 1e-5

    upstream = torch.randn_like(out) * real
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    for name, a, r in zip("qkv", grads, ref_grads):
        assert (a - r).abs().max() <= 1e-4, name


def test_every_key_is_used_once_and_distances_stay_within_the_chunk():
    rng = random.Random(0)
    for _ in range(300):
        chunk = rng.randint(2, 30)
        block = chunk - rng.randint(0, chunk - 1)
        kv_len = rng.randint(1, 8 * block)
        start = rng.randint(0, kv_len - 1)  # queries start..kv_len-1: a prefill, a continuation, a decode step
        uses = torch.zeros(kv_len, kv_len, dtype=torch.long)  # [query, key]
        positions = torch.arange(kv_len)
        qpos = torch.stack(query_positions(positions, block, chunk))  # [3, kv_len]
        max_distance = 0
        for rows, parts in block_parts(start, kv_len, block):
            queries = torch.arange(kv_len)[start:][rows]
            for branch, keys, causal in parts:
                keys = positions[keys]
                used = torch.ones(len(queries), len(keys), dtype=torch.bool)
                if causal:
                    assert torch.equal(queries, keys)
                    used = used.tril()
                uses[queries[:, None], keys[None, :]] += used
                distance = qpos[branch][queries][:, None] - (keys % block)[None, :]
                assert distance[used].min() >= 0
                max_distance = max(max_distance, distance[used].max().item())
        causal = torch.ones(kv_len, kv_len, dtype=torch.long).tril()
        assert torch.equal(uses[start:], causal[start:]), (chunk, block, kv_len, start)
        assert max_distance <= chunk


def test_math_kernel_matches_the_fused_kernel():
    # The kernel pair other devices use, checked against the CPU one on a GQA part, causal and full.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    grad = torch.randn(2, 6, 9, 8)
    for causal in (True, False):
        out, lse = attention_with_lse(q, k, v, causal, 0.3)
        m_out, m_lse = math_attend(q, k, v, causal, 0.3)
        assert (out - m_out).abs().max() < 1e-5 and (lse - m_lse).abs().max() < 1e-5
        for a, b in zip(attention_with_lse_backward(grad, q, k, v, out, lse, causal, 0.3),
                        math_attend_backward(grad, q, k, v, out, lse, causal, 0.3)):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("nq,nk,causal", [(40, 40, True), (40, 100, False)])
def test_cuda_kernel_calls_fit_the_efficient_kernels_signatures_and_shapes(nq, nk, causal):
    """The CUDA pair on meta tensors: arguments the aten ops accept, lse unpadded for the merge and
    padded back for the backward, K/V gradients summed back to the K/V heads. Values: benchmarks/gpu_check.py."""
    meta = lambda *shape: torch.empty(*shape, device="meta", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = meta(2, 8, nq, 64), meta(2, 2, nk, 64), meta(2, 2, nk, 64)
    out, lse = cuda_attend(q, k, v, causal, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 8, nq) and lse.dtype == torch.float32
    dq, dk, dv = cuda_attend_backward(meta(2, 8, nq, 64), q, k, v, out, lse, causal, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def _pair(chunk, local, original=32768, **kw):
    """A plain model and a DCA model with the same weights."""
    plain_config = preset_config("tiny", num_hidden_layers=2, initializer_range=0.3, **kw)
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(plain_config)
    dca = Qwen2ForCausalLM(enable_long_context(plain_config, chunk, local))
    dca.config.dual_chunk_attention_config["original_max_position_embeddings"] = original
    dca.model.rotary_emb.original_len = original
    dca.load_state_dict(plain.state_dict())
    return plain, dca


def test_within_one_block_equals_plain_causal_rope_forward_and_backward():
    plain, dca = _pair(chunk=48, local=8)  # L = 40
    ids = torch.randint(0, 151_000, (2, 40))
    losses = []
    for model in (plain, dca):
        model.zero_grad()
        out = model(input_ids=ids)
        (out.logits.float() ** 2).mean().backward()
        losses.append(out.logits)
    assert (losses[0] - losses[1]).abs().max() <= 1e-6
    for (name, a), b in zip(plain.named_parameters(), dca.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-6, name


def test_within_one_block_a_left_padded_batch_equals_plain():
    plain, dca = _pair(chunk=48, local=8)
    ids = torch.randint(0, 151_000, (3, 30))
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :11] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():  # the plain model takes the masked SDPA path here: equal up to fp32 rounding
        a = plain.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        b = dca.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


@pytest.fixture(scope="module")
def long_model():
    # L = 16 and the YaRN temperature from position 40 on: a 90-token prompt spans 6 blocks.
    # A 4,096-row vocabulary keeps 64 decoding steps (and float64 logits) cheap.
    return _pair(chunk=20, local=4, original=40, vocab_size=VOCAB)[1].eval()


def test_cached_decoding_equals_prefill_for_a_left_padded_batch(long_model):
    # float64: decoding and prefill group the same sums differently, and in float32 that alone moves
    # these logits (|logit| ~ 20) by ~2e-4, as it does for plain SDPA; in float64 they agree to 1e-13.
    long_model = copy.deepcopy(long_model).to(torch.float64)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 90 + 64))
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :30] = 0, 0
    with torch.no_grad():
        full = long_model(input_ids=ids, attention_mask=mask).logits  # [3, 154, vocab]
        out = long_model(input_ids=ids[:, :90], attention_mask=mask[:, :90], use_cache=True)
        steps, cache = [out.logits[:, -1:]], out.past_key_values
        for t in range(90, 90 + 63):
            out = long_model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                             use_cache=True)
            steps.append(out.logits)
    decoded = torch.cat(steps, 1)  # logits after positions 89 .. 152
    assert cache.get_seq_length() == 90 + 63
    assert (decoded - full[:, 89:-1]).abs().max() <= 1e-10


def test_generate_gives_the_greedy_tokens_of_full_prefill(long_model):
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 90))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    with torch.no_grad():
        gen = long_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                                  do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(2, 64, dtype=torch.long)], 1)
        logits = long_model(input_ids=gen, attention_mask=full_mask).logits
    assert gen.shape == (2, 154)
    assert torch.equal(logits[:, 89:-1].argmax(-1), gen[:, 90:])
    assert len(set(gen[0, 90:].tolist())) > 4, "weights too small: greedy output is degenerate"


def test_bf16_training_step_runs_and_agrees_with_float32(long_model):
    model = copy.deepcopy(long_model).to(torch.bfloat16).train()
    ids = torch.randint(0, VOCAB, (2, 70))  # 5 blocks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        ref = long_model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02


def test_packed_samples_and_4d_masks_are_refused(long_model):
    ids = torch.randint(0, VOCAB, (1, 30))
    with pytest.raises(ValueError, match="packed samples"):
        long_model(input_ids=ids, position_ids=torch.cat([torch.arange(10), torch.arange(20)])[None])
    with pytest.raises(ValueError, match="4-D"):
        long_model(input_ids=ids, attention_mask=torch.ones(1, 1, 30, 30, dtype=torch.bool))


def test_enable_long_context_round_trips_through_config_json(tmp_path):
    base = preset_config("tiny", num_hidden_layers=1)
    config = enable_long_context(base, chunk_size=4096, local_size=512, yarn_factor=4)
    assert base.dual_chunk_attention_config is None and base.rope_parameters["rope_type"] == "default"
    assert config.dual_chunk_attention_config == {
        "chunk_size": 4096, "local_size": 512, "original_max_position_embeddings": 32768}
    assert config.max_position_embeddings == 131072
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dual_chunk_attention_config"] == config.dual_chunk_attention_config
    assert saved["rope_scaling"]["type"] == "yarn" and saved["rope_scaling"]["factor"] == 4.0
    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.rotary_emb, DualChunkRotary) and loaded.model.rotary_emb.block == 3584
    assert Qwen2Config.from_pretrained(tmp_path).dual_chunk_attention_config == config.dual_chunk_attention_config
    # Readers without DCA (stock transformers) load the same file and fall back to static YaRN.
    stock = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert stock.config.rope_parameters["rope_type"] == "yarn"
    with pytest.raises(ValueError, match="both chunk_size and local_size"):
        enable_long_context(base, chunk_size=4096)


def test_chat_switches_long_context_on_for_generation_only(tmp_path, capsys):
    from alignment.checkpoint import init_checkpoint, load_causal_lm
    from qwen2_align.cli import main

    ck = init_checkpoint("tiny", tmp_path / "ck", initializer_range=0.3)
    before = (ck / "config.json").read_text()
    assert json.loads(before)["original_max_position_embeddings"] == 32768  # init records the trained length
    # The ChatML prompts are 20-odd tokens, so 8-token blocks put prefill and decoding through every branch.
    flags = ["--dca-chunk-size", "10", "--dca-local-size", "2", "--yarn-factor", "4"]
    assert main(["chat", "--model", str(ck), "--prompt", "Hi", "--prompt", "Name three colours.",
                 "--max-new-tokens", "6", *flags]) == 0
    assert capsys.readouterr().out.count("assistant:") == 2
    assert (ck / "config.json").read_text() == before
    model = load_causal_lm(ck, long_context={"chunk_size": 10, "local_size": 2, "yarn_factor": 4})
    assert model.model.rotary_emb.block == 8 and model.config.rope_parameters["factor"] == 4.0
    assert load_causal_lm(ck).config.dual_chunk_attention_config is None


# Qwen2-7B base's config.json, shrunk: the extended limit in max_position_embeddings, no rope_scaling.
HUB_BASE_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "rope_theta": 1000000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
}


def _query_temperature(config, position: int) -> float:
    """The factor DCA multiplies the query at `position` by, read off the module's rotated query tables."""
    rotary = DualChunkRotary(config)
    cos, sin = rotary(torch.empty(1, 1, config.hidden_size), None, None, past_len=position).queries
    return (cos[0, 0, 0, 0] ** 2 + sin[0, 0, 0, 0] ** 2).sqrt().item()  # cos^2 + sin^2 = m^2


def test_trained_length_is_never_guessed_from_max_position_embeddings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_BASE_CONFIG))
    base = Qwen2Config.from_pretrained(tmp_path)
    for request in ({"yarn_factor": 4}, {"chunk_size": 4096, "local_size": 512}):
        with pytest.raises(ValueError, match="pass the trained length") as refused:
            enable_long_context(base, **request)
        assert "\n" not in str(refused.value)
    assert enable_long_context(base).rope_parameters == base.rope_parameters  # nothing asked: nothing needed

    config = enable_long_context(base, chunk_size=4096, local_size=512, yarn_factor=4, trained_length=32768)
    assert trained_length_of(config) == 32768 and config.max_position_embeddings == 131072
    assert config.rope_parameters["original_max_position_embeddings"] == 32768
    # The YaRN tables are those of the rope_scaling Qwen2-Instruct documents, as stock transformers computes them.
    documented = transformers.Qwen2Config.from_dict(
        {**HUB_BASE_CONFIG, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    stock = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(documented)
    ours = RotaryEmbedding(config.rope_parameters, 16, config.max_position_embeddings)
    assert torch.allclose(ours.inv_freq, stock.inv_freq) and ours.attention_scaling == pytest.approx(stock.attention_scaling)
    over_extended = RotaryEmbedding({**config.rope_parameters, "original_max_position_embeddings": 131072}, 16, 131072)
    assert not torch.allclose(ours.inv_freq, over_extended.inv_freq)
    # DCA's temperature is 1 up to the trained length and YaRN's 0.1 ln(s) + 1 beyond it.
    assert _query_temperature(config, 32767) == pytest.approx(1.0)
    assert _query_temperature(config, 65535) == pytest.approx(0.1 * math.log(2) + 1, rel=1e-6)


def test_yarn_without_an_original_length_is_refused():
    params = {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0}
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_frequencies(params, 16, 131072)


def test_chat_refuses_long_context_without_a_trained_length_then_takes_the_flag(tmp_path, capsys):
    from alignment.checkpoint import init_checkpoint, load_causal_lm
    from alignment.generation import GenerationSpec
    from qwen2_align.cli import main

    ck = init_checkpoint("tiny", tmp_path / "hub", num_hidden_layers=1, initializer_range=0.3)
    hub_style = json.loads((ck / "config.json").read_text())  # as released: no record of the trained length
    del hub_style["original_max_position_embeddings"]
    (ck / "config.json").write_text(json.dumps({**hub_style, "max_position_embeddings": 131072}))
    capsys.readouterr()
    chat = ["chat", "--model", str(ck), "--prompt", "Hi", "--max-new-tokens", "2", "--yarn-factor", "4"]
    assert main(chat) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2-align chat: the trained length is unknown") and err.count("\n") == 1, err
    assert main([*chat, "--trained-length", "32768"]) == 0
    assert capsys.readouterr().out.count("assistant:") == 1
    spec = GenerationSpec(model=str(ck), yarn_factor=4, trained_length=32768)
    model = load_causal_lm(ck, long_context=spec.long_context())
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32768
    assert model.config.max_position_embeddings == 131072
    assert GenerationSpec(model=str(ck), trained_length=32768).long_context() == {}
