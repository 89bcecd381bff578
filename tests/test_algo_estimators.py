"""Critic-free advantage estimators and loss aggregation (tether/algo/estimators.py): hand-computed
cases, groups of one, equal scores, masked padding, and vectorised == naive loops."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from tether.algo.estimators import (
    aggregation_weights,
    broadcast_to_tokens,
    dr_grpo_advantages,
    grpo_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
    uniform_groups,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_grpo_by_hand():
    # groups (1, 2, 3) and (4, 5, 6): means 2 and 5, unbiased std 1
    a = grpo_advantages(t(1, 2, 3, 4, 5, 6), group_size=3, eps=0.0)
    assert torch.allclose(a, t(-1, 0, 1, -1, 0, 1))
    # group (0, 2): mean 1, unbiased std sqrt(2), A = ∓1/sqrt(2); group (10, 10): 0 / (0 + eps) = 0
    c = grpo_advantages(t(0, 2, 10, 10), group_size=2, eps=1e-6)
    assert torch.allclose(c, t(-1 / 2 ** 0.5, 1 / 2 ** 0.5, 0, 0), atol=1e-5)


def test_dr_grpo_and_rloo_by_hand():
    assert torch.allclose(dr_grpo_advantages(t(1, 2, 6), 3), t(-2, -1, 3))
    # leave-one-out: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2 == n/(n-1) * (r - mean)
    assert torch.allclose(rloo_advantages(t(1, 2, 6), 3), t(-3, -1.5, 4.5))


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_groups_of_one_have_no_baseline_and_equal_scores_give_zero(estimator):
    assert torch.equal(estimator(t(0.5, -2.0, 3.0), 1), t(0.5, -2.0, 3.0))
    assert torch.equal(estimator(t(4, 4, 4, -1, -1, -1), 3), torch.zeros(6))


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        grpo_advantages(t(1, 2, 3, 4, 5, 6), 4)


def naive(returns: list[float], n: int, kind: str) -> list[float]:
    out = []
    for g in range(0, len(returns), n):
        group = returns[g : g + n]
        mean = statistics.fmean(group)
        for i, r in enumerate(group):
            if n == 1:
                out.append(r)
            elif kind == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + 1e-6))
            elif kind == "dr_grpo":
                out.append(r - mean)
            else:
                out.append(r - statistics.fmean(group[:i] + group[i + 1:]))
    return out


@pytest.mark.parametrize("kind,estimator", [("grpo", grpo_advantages), ("dr_grpo", dr_grpo_advantages),
                                            ("rloo", rloo_advantages)])
def test_vectorised_estimators_equal_naive_loops(kind, estimator):
    rng = random.Random(0)
    for _ in range(50):
        n = rng.choice([1, 2, 3, 4, 8])
        returns = [rng.gauss(0, 3) for _ in range(n * rng.randint(1, 5))]
        got = estimator(torch.tensor(returns, dtype=torch.float64), n)
        assert torch.allclose(got.double(), torch.tensor(naive(returns, n, kind), dtype=torch.float64),
                              atol=1e-4, rtol=1e-4)


def test_returns_to_go_by_hand_and_padding_is_never_read():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0], [0.5, -1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(returns_to_go(rewards, mask), torch.tensor([[6.0, 5.0, 3.0, 0.0], [-0.5, -1.0, 0.0, 0.0]]))


def test_returns_to_go_equals_a_naive_loop():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(6, 9, generator=gen)
    lengths = [9, 1, 4, 0, 7, 3]
    mask = torch.tensor([[j < n for j in range(9)] for n in lengths])
    got = returns_to_go(rewards, mask)
    for i, n in enumerate(lengths):
        for j in range(9):
            want = float(rewards[i, j:n].sum()) if j < n else 0.0
            assert got[i, j].item() == pytest.approx(want, abs=1e-5)


def test_reinforce_pp_whitens_returns_over_the_real_tokens_of_the_batch():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    a = reinforce_pp_advantages(rewards, mask)
    # returns-to-go: [1, 1, 1] and [2, 2, pad]: mean 1.4, var 0.24 over the 5 real tokens
    want = (torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]) - 1.4) / (0.24 ** 0.5 + 1e-8)
    assert torch.allclose(a, want * mask, atol=1e-5)
    assert a[1, 2] == 0
    real = a[mask]
    assert real.mean().abs() < 1e-5 and (real.var(unbiased=False) - 1).abs() < 1e-4


def test_broadcast_gives_each_real_token_its_response_advantage():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(broadcast_to_tokens(t(2.0, -1.0), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_aggregation_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    cases = {
        "token_mean": [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]],
        "seq_mean_token_mean": [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]],
        "seq_mean_token_sum": [[1 / 2, 1 / 2, 0], [1 / 2, 0, 0]],
        "seq_mean_token_sum_norm": [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]],
    }
    for mode, want in cases.items():
        got = aggregation_weights(mask, mode, num_tokens=3, num_sequences=2, max_length=3)
        assert torch.allclose(got, torch.tensor(want)), mode
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregation_weights(mask, "mean", 3, 2, 3)


def test_aggregation_splits_exactly_over_micro_batches():
    """Each mode's weights, computed per micro-batch with whole-minibatch denominators, sum to the
    one-pass loss (what gradient accumulation needs)."""
    gen = torch.Generator().manual_seed(2)
    per_token = torch.randn(6, 5, generator=gen)
    mask = torch.tensor([[j < n for j in range(5)] for n in [5, 1, 3, 2, 4, 5]])
    tokens, sequences = float(mask.sum()), 6.0
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"):
        whole = (aggregation_weights(mask, mode, tokens, sequences, 5) * per_token).sum()
        parts = sum((aggregation_weights(mask[i:i + 2], mode, tokens, sequences, 5) * per_token[i:i + 2]).sum()
                    for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6), mode
    lengths = mask.sum(1).float()
    original = (((per_token * mask).sum(1) / lengths).mean()).item()  # GRPO's definition, computed directly
    got = (aggregation_weights(mask, "seq_mean_token_mean", tokens, sequences, 5) * per_token).sum().item()
    assert got == pytest.approx(original, abs=1e-6)


def test_overlong_penalty_and_uniform_groups():
    assert torch.allclose(overlong_penalty(t(3, 6, 8, 10), max_new_tokens=10, buffer=4), t(0, 0, -0.5, -1))
    assert torch.allclose(overlong_penalty(t(10), 10, 4, penalty=2.0), t(-2))
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(t(1), 10, 0)
    assert torch.equal(uniform_groups(t(1, 1, 0, 1, 2, 2), 2), torch.tensor([True, False, True]))


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_group_of_equal_scores_gets_exactly_zero_advantage(estimator, dtype):
    """A float mean of n equal values can miss them by an ulp; GRPO would divide that by eps."""
    rng = random.Random(1)
    for n in range(2, 65):
        value = rng.uniform(-50, 50)
        assert torch.equal(estimator(torch.full((n,), value, dtype=dtype), n), torch.zeros(n, dtype=dtype)), (n, value)
    assert torch.equal(grpo_advantages(torch.full((8,), 2.7), 8), torch.zeros(8))


def test_reinforce_pp_baseline_scores_of_an_equal_group_are_exactly_zero():
    """REINFORCE++-baseline subtracts the group mean score (dr_grpo_advantages) before shaping: an
    all-equal batch then has zero returns and zero whitened advantages."""
    scores = dr_grpo_advantages(torch.full((16,), 0.7) + torch.arange(4).repeat_interleave(4) * 0.1, 4)
    assert torch.equal(scores, torch.zeros(16))
    rewards = torch.zeros(16, 5)
    rewards[:, -1] = scores
    assert torch.equal(reinforce_pp_advantages(rewards, torch.ones(16, 5, dtype=torch.bool)), torch.zeros(16, 5))


@pytest.mark.parametrize("kind,estimator", [("grpo", grpo_advantages), ("dr_grpo", dr_grpo_advantages),
                                            ("rloo", rloo_advantages)])
def test_group_statistics_equal_a_float64_loop_to_1e12(kind, estimator):
    rng = random.Random(2)
    for _ in range(100):
        n = rng.choice([2, 3, 5, 8, 16])
        returns = [rng.gauss(0, 3) for _ in range(n * rng.randint(1, 4))]
        got = estimator(torch.tensor(returns, dtype=torch.float64), n)
        assert got.dtype == torch.float64
        want = torch.tensor(naive(returns, n, kind), dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-12), (got - want).abs().max()


def test_uniform_groups_agree_with_the_exact_zero_advantages():
    scores = torch.tensor([2.7] * 8 + [1.0, 1.0 + 1e-12] * 4, dtype=torch.float64)
    assert uniform_groups(scores, 8).tolist() == [True, False]
    assert torch.equal(grpo_advantages(scores, 8)[:8], torch.zeros(8, dtype=torch.float64))
    assert (grpo_advantages(scores, 8)[8:] != 0).all()
