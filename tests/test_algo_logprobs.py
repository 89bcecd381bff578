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


# --- hand-written backward: equal to plain autograd, and lean in memory ------------------


def _result_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _plain_log_softmax(logits, temperature):
    """The computation the chunked functions must equal: one full-size log-softmax under autograd."""
    return torch.log_softmax(logits.to(_result_dtype(logits)) / temperature, dim=-1)


def _plain_logprobs(logits, tokens, temperature):
    return _plain_log_softmax(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)


def _plain_entropy(logits, temperature):
    log_p = _plain_log_softmax(logits, temperature)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)


def _value_and_grad(fn, logits, upstream):
    out = fn(logits)
    (grad,) = torch.autograd.grad(out, logits, upstream)
    return out, grad


def _assert_matches_plain(logits, tokens, temperature, **tolerance):
    """Values and gradients (under a random upstream gradient) of both functions equal the plain computation."""
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(7), dtype=_result_dtype(logits))
    pairs = [
        (lambda x: logprobs_from_logits(x, tokens, temperature), lambda x: _plain_logprobs(x, tokens, temperature)),
        (lambda x: entropy_from_logits(x, temperature), lambda x: _plain_entropy(x, temperature)),
    ]
    for chunked, plain in pairs:
        out, grad = _value_and_grad(chunked, logits, upstream)
        expected, expected_grad = _value_and_grad(plain, logits, upstream)
        assert out.dtype == _result_dtype(logits) and grad.dtype == logits.dtype
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(out, expected, **tolerance)
        torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rows_per_chunk", [1, 2, 5, None])  # None: the default, one chunk
@pytest.mark.parametrize("shape", [(3, 5, 11), (2, 2, 3, 11), (7, 11)])
def test_values_and_grads_equal_plain_log_softmax(monkeypatch, shape, rows_per_chunk, temperature):
    if rows_per_chunk is not None:
        monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", rows_per_chunk * shape[-1])
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=gen) * 4).requires_grad_()
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    _assert_matches_plain(logits, tokens, temperature, rtol=1e-6, atol=1e-6)


def test_non_contiguous_logits_equal_plain(monkeypatch):
    # as a trailing slice of a model's (B, L, V) output
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 2 * 9)
    gen = torch.Generator().manual_seed(3)
    full = (torch.randn(3, 6, 9, generator=gen) * 3).requires_grad_()
    logits = full[:, 1:-1]  # (3, 4, 9), strided
    tokens = torch.randint(0, 9, (3, 4), generator=gen)
    _assert_matches_plain(logits, tokens, 1.3, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_low_precision_grads_are_in_the_logits_dtype(monkeypatch, dtype, temperature):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 3 * 50)
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, 6, 50, generator=gen) * 5).to(dtype).requires_grad_()
    tokens = torch.randint(0, 50, (4, 6), generator=gen)
    # values are float32 on the rounded logits; gradients differ from plain only by their rounding to bf16/fp16
    _assert_matches_plain(logits, tokens, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_neg_inf_logits_equal_plain_without_nan(monkeypatch, temperature):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 2 * 8)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 8, generator=gen) * 3
    banned = torch.rand(3, 4, 8, generator=gen) < 0.4
    tokens = torch.randint(0, 8, (3, 4), generator=gen)
    banned.scatter_(-1, tokens[..., None], False)  # the chosen tokens stay possible
    banned[0, 0] = True
    banned[0, 0, tokens[0, 0]] = False  # one row with a single possible token: entropy 0
    logits = logits.masked_fill(banned, -math.inf).requires_grad_()
    _assert_matches_plain(logits, tokens, temperature, rtol=1e-6, atol=1e-6)
    assert entropy_from_logits(logits, temperature)[0, 0].item() == 0.0
    upstream = torch.randn(3, 4, generator=gen)
    for out in (logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits, temperature)):
        (grad,) = torch.autograd.grad(out, logits, upstream)
        assert (grad[banned] == 0).all()  # p = 0 there: no gradient, and no NaN


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 2 * 5)  # several chunks
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=gen)
    for temperature in (1.0, 0.6):
        assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, tokens, temperature), (logits,))
        assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, temperature), (logits,))


def _bytes_saved_besides_logits(fn, logits) -> int:
    """Bytes of the distinct storages, other than the logits' own, autograd keeps for the backward of ``fn(logits)``."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(logits)
    del out
    storages.pop(logits.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@pytest.mark.parametrize(
    "which,dtype,temperature",
    [("logprobs", torch.bfloat16, 1.0), ("logprobs", torch.float32, 0.7),
     ("entropy", torch.float32, 1.0), ("entropy", torch.bfloat16, 0.7)],
)
def test_backward_keeps_only_the_logits_and_per_row_numbers(monkeypatch, which, dtype, temperature):
    # Plain autograd through the chunks keeps float32 copies of the logits (upcast, / T, log-softmax,
    # probabilities): at a 49k vocab that is GBs. The hand-written backward keeps the logits
    # themselves and a few numbers per row.
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 4 * 64)  # 8 chunks
    rows, vocab = 32, 64
    logits = torch.randn(4, 8, vocab, dtype=dtype, requires_grad=True)
    tokens = torch.randint(0, vocab, (4, 8))
    fn = {"logprobs": lambda x: logprobs_from_logits(x, tokens, temperature),
          "entropy": lambda x: entropy_from_logits(x, temperature)}[which]
    per_row = 12  # a long token (log-probs) or a float32 entropy (entropy)
    assert _bytes_saved_besides_logits(fn, logits) <= per_row * rows
