"""bf16 gradients through the chunked LM head for confident tokens, against float64.

SFT of a pretrained model lives at target probabilities near 1, where bf16 rounds p to 1: the
gradient must be formed in float32 (as stock `cross_entropy` under autocast does), or the
target's term p - 1 vanishes. Each case puts every token near one median target probability.
"""

import pytest
import torch
import torch.nn.functional as F

from alignment.model.loss import causal_lm_loss, token_logprobs

VOCAB, HIDDEN, TOKENS = 8192, 64, 192


def _confident_case(median_p: float, seed: int = 0):
    """hidden [N, H], weight [V, H], targets [N] (float64) with median p(target) close to `median_p`."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    direction = weight[targets] / weight[targets].norm(dim=-1, keepdim=True)
    direction = direction + 0.3 * torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64) / HIDDEN**0.5

    def median_at(scale: float) -> float:
        return F.softmax(scale * direction @ weight.T, -1).gather(1, targets[:, None]).median().item()

    low, high = 0.0, 400.0
    for _ in range(60):  # bisection on the scale of the hidden states
        mid = (low + high) / 2
        low, high = (mid, high) if median_at(mid) < median_p else (low, mid)
    return low * direction, weight, targets


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def _gradients(loss_of, hidden64, weight64, targets, dtype):
    """d loss / d (hidden, weight) with fp32 leaves under `dtype` autocast (float64: exact)."""
    leaf_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hidden = hidden64.to(leaf_dtype).clone().requires_grad_()
    weight = weight64.to(leaf_dtype).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss_of(hidden, weight, targets).backward()
    return hidden.grad, weight.grad


def _upstream(targets):
    """A per-token upstream gradient of mixed sign, as DPO's loss gives the log-probs."""
    return torch.linspace(-1.0, 1.0, targets.numel(), dtype=torch.float64)


def ours_cross_entropy(hidden, weight, targets):
    labels = torch.cat([targets.new_full((1,), -100), targets])[None]  # shifted back by one
    padded = torch.cat([hidden, hidden[:1]])[None]
    return causal_lm_loss(padded, weight, labels, num_items_in_batch=1)[0]


def stock_cross_entropy(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")


def ours_logprobs(hidden, weight, targets):
    return (token_logprobs(hidden, weight, targets) * _upstream(targets).to(torch.float32)).sum()


def stock_logprobs(hidden, weight, targets):
    logprobs = F.log_softmax(F.linear(hidden, weight).float(), -1).gather(1, targets[:, None]).squeeze(1)
    return (logprobs * _upstream(targets).to(logprobs.dtype)).sum()


@pytest.mark.parametrize("median_p", [0.78, 0.98, 0.998, 0.9999])
@pytest.mark.parametrize("ours, stock", [(ours_cross_entropy, stock_cross_entropy), (ours_logprobs, stock_logprobs)],
                         ids=["sft", "logprobs"])
def test_bf16_gradients_of_confident_tokens_are_as_good_as_stock(median_p, ours, stock):
    hidden, weight, targets = _confident_case(median_p)
    exact_h, exact_w = _gradients(stock, hidden, weight, targets, torch.float64)
    ours_h, ours_w = _gradients(ours, hidden, weight, targets, torch.bfloat16)
    stock_h, stock_w = _gradients(stock, hidden, weight, targets, torch.bfloat16)
    for got, reference, exact, name in ((ours_h, stock_h, exact_h, "hidden"), (ours_w, stock_w, exact_w, "weight")):
        ours_error, stock_error = _relative_error(got, exact), _relative_error(reference, exact)
        assert ours_error <= 1.5 * stock_error, f"{name}: ours {ours_error:.4f} vs stock bf16 {stock_error:.4f}"
        assert ours_error < 0.1, f"{name}: relative error {ours_error:.4f}"


def test_scoring_under_inference_mode_then_training_reuses_no_inference_buffer():
    """Online DPO scores samples under `torch.inference_mode`, then trains: the CPU scratch buffers made while
    scoring cannot be written outside it, so training must not reuse them (it raised before)."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=generator), torch.randn(50, 16, generator=generator)
    labels = torch.randint(0, 50, (6,), generator=generator)
    with torch.inference_mode():
        scored = token_logprobs(hidden, weight, labels)
    trained_weight = weight.clone().requires_grad_(True)
    logprobs = token_logprobs(hidden, trained_weight, labels)
    logprobs.sum().backward()
    expected = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(logprobs.detach().double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(scored.double(), expected, rtol=0, atol=1e-5)
    assert trained_weight.grad is not None and trained_weight.grad.abs().sum() > 0
