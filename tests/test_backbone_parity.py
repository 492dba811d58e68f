"""Our backbone against stock transformers' Qwen2, both directions, on random weights."""

import json

import pytest
import torch
import transformers
from helpers.batches import padded_batch

from alignment.model import Qwen2Config, Qwen2ForCausalLM, preset_config

ORIGINAL_LEN = 32  # YaRN runs at 4x this


def _config(preset: str, yarn: bool) -> Qwen2Config:
    extra = {"num_hidden_layers": 2, "initializer_range": 0.5}
    if yarn:
        extra |= {
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_LEN},
            "max_position_embeddings": 4 * ORIGINAL_LEN,
        }
    return preset_config(preset, **extra)


CASES = [(p, y) for p in ("tiny", "tiny-untied") for y in (False, True)]


@pytest.mark.parametrize("direction", ["stock_to_ours", "ours_to_stock"])
@pytest.mark.parametrize("preset,yarn", CASES)
def test_parity(tmp_path, preset, yarn, direction):
    config = _config(preset, yarn)
    torch.manual_seed(1)
    if direction == "stock_to_ours":
        src = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(config.to_dict()))
        load = Qwen2ForCausalLM
    else:
        src = Qwen2ForCausalLM(config)
        load = transformers.Qwen2ForCausalLM
    src.save_pretrained(tmp_path)
    dst, info = load.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert dst.config.tie_word_embeddings == config.tie_word_embeddings
    assert (dst.lm_head.weight.data_ptr() == dst.model.embed_tokens.weight.data_ptr()) == config.tie_word_embeddings
    src.eval(), dst.eval()

    seq_len = 4 * ORIGINAL_LEN if yarn else 24
    ids, mask, pos = padded_batch(seq_len)
    with torch.no_grad():
        a = src(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = dst(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max().item() <= 2e-6 * a[valid].abs().max().item()  # fp32 rounding

    prompt_ids, prompt_mask = ids[:, -20:], mask[:, -20:]
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=151643)
    ga = src.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)[:, 20:]
    gb = dst.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)[:, 20:]
    assert ga.shape == (3, 32)
    assert torch.equal(ga, gb)
    assert len(set(ga[0].tolist())) > 4, "weights too small: greedy output is degenerate"


def test_config_json_is_standard_and_keeps_legacy_rope_keys(tmp_path):
    config = _config("tiny", yarn=True)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["architectures"] == ["Qwen2ForCausalLM"]
    assert saved["rope_theta"] == 1_000_000.0
    assert saved["rope_scaling"]["type"] == "yarn" and saved["rope_scaling"]["factor"] == 4.0
    assert saved["rope_scaling"]["original_max_position_embeddings"] == ORIGINAL_LEN
    assert "dual_chunk_attention_config" not in saved


def test_reads_hub_style_config(tmp_path):
    # The released Qwen2 configs carry rope_theta / rope_scaling, not rope_parameters.
    hub = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "rope_theta": 1000000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = Qwen2Config.from_pretrained(tmp_path)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["rope_theta"] == 1e6
    model = Qwen2ForCausalLM(config)
    stock = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_pretrained(tmp_path))
    assert torch.allclose(model.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(stock.model.rotary_emb.attention_scaling)
