"""tether.algo.logprobs: hand-computed values, log_softmax equivalence, dtypes, chunking."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tether.algo.logprobs as logprobs_module
from tether.algo import entropy_from_logits, logprobs_from_logits

PROPERTY = settings(max_examples=50, deadline=None)


def test_logprobs_hand_computed():
    # logits (0, ln 3) -> probs (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    tokens = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([math.log(0.75), math.log(0.25)], rel=1e-6)


def test_logprobs_divide_by_temperature():
    # T = 2: logits (0, ln 3 / 2) -> p1 = sqrt(3) / (1 + sqrt(3)) (N-details item 3)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    out = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    assert out.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.tensor([[1]]), temperature=0.0)


def test_logprobs_shape_mismatch_raises():
    with pytest.raises(ValueError, match="tokens shape"):
        logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_logprobs_bf16_and_fp16_are_float32_and_accurate():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=gen) * 5
    tokens = torch.randint(0, 50, (3, 4), generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        out = logprobs_from_logits(low, tokens)
        assert out.dtype == torch.float32
        # equals the float32 computation on the *rounded* logits, not a bf16-precision result
        expected = torch.log_softmax(low.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert logprobs_from_logits(logits.double(), tokens).dtype == torch.float64


def test_chunked_path_equals_single_chunk(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5), generator=gen)
    whole = logprobs_from_logits(logits, tokens, temperature=0.7)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    ent_whole = entropy_from_logits(logits, temperature=0.7)
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 3 * 7)  # 3 rows per chunk, 5 chunks
    chunked = logprobs_from_logits(logits, tokens, temperature=0.7)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.7), ent_whole)


def test_entropy_hand_computed():
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [5.0, -math.inf, -math.inf, -math.inf]]]
    )
    out = entropy_from_logits(logits)
    assert out.shape == (1, 3) and out.dtype == torch.float32
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    # uniform over 4 -> ln 4; (1/4, 3/4, 0, 0) -> h; one-hot -> 0 (not NaN despite -inf logits)
    assert out[0].tolist() == pytest.approx([math.log(4.0), h, 0.0], abs=1e-6)
    # T = 2 flattens: (0, ln 3 / 2) -> p1 = sqrt3 / (1 + sqrt3)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    h2 = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert entropy_from_logits(logits[:, 1:2, :2], temperature=2.0).item() == pytest.approx(h2, rel=1e-6)


def test_entropy_grad_is_finite_with_neg_inf_logits():
    logits = torch.tensor([[[1.0, 2.0, -math.inf]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 2].item() == 0.0


@PROPERTY
@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(2, 9),
    st.sampled_from([1.0, 0.7, 1.3]),
    st.integers(0, 2**31 - 1),
)
def test_logprobs_and_entropy_match_log_softmax(b, r, v, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, r, v, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    tokens = torch.randint(0, v, (b, r), generator=gen)
    out = logprobs_from_logits(logits, tokens, temperature)
    entropy = entropy_from_logits(logits, temperature)
    log_softmax = torch.log_softmax(logits / temperature, dim=-1).tolist()
    for i in range(b):  # naive loop over tokens
        for j in range(r):
            row = log_softmax[i][j]
            assert out[i, j].item() == pytest.approx(row[tokens[i, j]], abs=1e-12)
            naive_entropy = -sum(math.exp(lp) * lp for lp in row)
            assert entropy[i, j].item() == pytest.approx(naive_entropy, abs=1e-10)
    weights = torch.randn(b, r, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    reference = torch.log_softmax(logits / temperature, dim=-1)
    (expected,) = torch.autograd.grad((reference.gather(-1, tokens[..., None]).squeeze(-1) * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)
