"""The transformers backend's decoding loop and sampler, against transformers' own generate and logits warpers."""

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from alignment.checkpoint import init_checkpoint, load_causal_lm
from alignment.generation.decoding import FIRST_CANDIDATES, Sampler, decode
from alignment.tokenizer import load_tokenizer


def warped_distribution(logits: torch.Tensor, sampler: Sampler, seen: torch.Tensor) -> torch.Tensor:
    """The distribution transformers samples for `sampler`'s settings: its processors, in its order, in float64."""
    processors = LogitsProcessorList()
    if sampler.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampler.repetition_penalty))
    processors.append(TemperatureLogitsWarper(sampler.temperature))
    if sampler.top_k > 0:
        processors.append(TopKLogitsWarper(sampler.top_k))
    if sampler.top_p < 1:
        processors.append(TopPLogitsWarper(sampler.top_p))
    return torch.softmax(processors(seen[None], logits.double()[None]), -1)[0]


@pytest.mark.parametrize("sampler", [
    Sampler(temperature=0.7),
    Sampler(temperature=1.0, top_k=20),
    Sampler(temperature=0.8, top_p=0.9),  # nucleus inside the first candidates
    Sampler(temperature=1.0, top_k=30, top_p=0.8),
    Sampler(temperature=1.3, top_p=0.95, repetition_penalty=1.5),
], ids=["temperature", "top-k", "top-p", "top-k+top-p", "wide-top-p+penalty"])
def test_sampler_draws_what_transformers_warpers_define(sampler):
    """40,000 draws from one row: no token outside the warped support, and frequencies within 0.01 of it. The last
    case's nucleus is wider than the first candidates, so it takes the redraw path."""
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(vocab) * (0.3 if sampler.top_p == 0.95 else 2.0)
    seen = torch.zeros(vocab, dtype=torch.long)
    seen[:40] = torch.arange(40)  # transformers takes the ids, ours a mask
    expected = warped_distribution(logits, sampler, seen)
    if sampler.top_p == 0.95:
        assert int((expected > 0).sum()) > FIRST_CANDIDATES
    draws = 40_000
    mask = torch.zeros(draws, vocab, dtype=torch.bool)
    mask[:, :40] = True
    rows = sampler.penalise(logits.expand(draws, vocab).clone(), mask)
    generator = torch.Generator().manual_seed(1)
    tokens = sampler.next_tokens(rows, torch.rand(draws, generator=generator), generator)
    frequencies = torch.bincount(tokens, minlength=vocab).double() / draws
    assert not bool(((frequencies > 0) & (expected == 0)).any())
    assert float((frequencies - expected).abs().max()) < 0.01


def test_sampler_mixes_narrow_and_wide_rows():
    """One batch where some rows' nucleus fits the first candidates and others' does not: each row is drawn from
    its own nucleus."""
    sampler = Sampler(temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    peaked, flat = torch.randn(500) * 4, torch.randn(500) * 0.1
    draws = 20_000
    rows = torch.stack([peaked, flat]).repeat(draws, 1)  # alternating
    generator = torch.Generator().manual_seed(2)
    tokens = sampler.next_tokens(rows, torch.rand(2 * draws, generator=generator), generator)
    for offset, logits in ((0, peaked), (1, flat)):
        expected = warped_distribution(logits, sampler, torch.zeros(0, dtype=torch.long))
        frequencies = torch.bincount(tokens[offset::2], minlength=500).double() / draws
        assert not bool(((frequencies > 0) & (expected == 0)).any())
        assert float((frequencies - expected).abs().max()) < 0.015


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = init_checkpoint("tiny", tmp_path_factory.mktemp("m") / "tiny", seed=3, num_hidden_layers=2,
                           initializer_range=0.3)
    return load_causal_lm(str(path), "float32").eval(), load_tokenizer(str(path))


def test_greedy_decoding_is_transformers_generate(model_and_tokenizer):
    """Left-padded prompts of different lengths, greedy: the same tokens as `GenerationMixin.generate` on our
    model, row for row, including where a row ends."""
    model, tokenizer = model_and_tokenizer
    tokenizer.padding_side = "left"
    texts = ["Hello", "A much longer prompt about foxes and the sea, to pad the others", "12 * 7 ="]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reference = model.generate(**enc, do_sample=False, max_new_tokens=20, eos_token_id=[eos],
                               pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].size(1):]
    ours = decode(model, enc["input_ids"], enc["attention_mask"], Sampler(), 1, 20, [eos], tokenizer.pad_token_id,
                  torch.Generator().manual_seed(0))
    assert torch.equal(ours, reference[:, : ours.size(1)])
    # the same prompts where a row ends early: the tokens of a row that stopped, then padding
    first = int(reference[0, 3])
    ended = decode(model, enc["input_ids"], enc["attention_mask"], Sampler(), 1, 20, [first],
                   tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    stop_at = int((reference[0] == first).nonzero()[0]) + 1
    assert torch.equal(ended[0, :stop_at], reference[0, :stop_at])
    assert bool((ended[0, stop_at:] == tokenizer.pad_token_id).all())


def test_samples_of_a_prompt_share_its_prefill(model_and_tokenizer):
    """n samples of each prompt from one prefill equal the samples drawn with the prompts repeated n times."""
    model, tokenizer = model_and_tokenizer
    tokenizer.padding_side = "left"
    enc = tokenizer(["Once upon a time", "The sea is"], return_tensors="pt", padding=True)
    sampler = Sampler(temperature=1.0, top_p=0.9)
    shared = decode(model, enc["input_ids"], enc["attention_mask"], sampler, 3, 10, [], tokenizer.pad_token_id,
                    torch.Generator().manual_seed(4))
    repeated = decode(model, enc["input_ids"].repeat_interleave(3, 0), enc["attention_mask"].repeat_interleave(3, 0),
                      sampler, 1, 10, [], tokenizer.pad_token_id, torch.Generator().manual_seed(4))
    assert torch.equal(shared, repeated)
    assert len({tuple(row.tolist()) for row in shared}) > 2
    nothing = decode(model, enc["input_ids"], enc["attention_mask"], sampler, 3, 0, [], tokenizer.pad_token_id,
                     torch.Generator().manual_seed(4))
    assert nothing.shape == (6, 0)  # no new tokens asked: an empty continuation per sample
