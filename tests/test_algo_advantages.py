"""tether.algo.advantages.gae: hand-computed cases and naive-loop equivalence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.algo import gae

PROPERTY = settings(max_examples=50, deadline=None)


def test_gae_three_tokens_gamma1_lambda_half():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.5)
    # t=2: delta = 1 + 0 (terminal) - 0.4 = 0.6;  A2 = 0.6
    # t=1: delta = 0 + 0.4 - 0.2 = 0.2;           A1 = 0.2 + 0.5 * 0.6 = 0.5
    # t=0: delta = 0 + 0.2 - 0.1 = 0.1;           A0 = 0.1 + 0.5 * 0.5 = 0.35
    assert adv[0].tolist() == pytest.approx([0.35, 0.5, 0.6])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0])  # A + V


def test_gae_padding_is_terminal_and_zero():
    # same episode followed by a pad holding garbage: identical result, zeros at the pad
    rewards = torch.tensor([[0.0, 0.0, 1.0, 100.0]])
    values = torch.tensor([[0.1, 0.2, 0.4, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.35, 0.5, 0.6, 0.0])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0, 0.0])


def test_gae_lambda_one_gives_discounted_reward_to_go():
    # lam = 1: returns are the Monte-Carlo discounted rewards-to-go, whatever the values
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    mask = torch.ones(1, 3)
    for values in (torch.zeros(1, 3), torch.tensor([[5.0, -3.0, 0.7]])):
        adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
        # G2 = 2; G1 = 0 + 0.9 * 2 = 1.8; G0 = 1 + 0.9 * 1.8 = 2.62
        assert ret[0].tolist() == pytest.approx([2.62, 1.8, 2.0])
        assert adv[0].tolist() == pytest.approx((torch.tensor([2.62, 1.8, 2.0]) - values[0]).tolist())


def test_gae_lambda_zero_is_one_step_td():
    rewards = torch.tensor([[0.5, -1.0]])
    values = torch.tensor([[1.0, 2.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    # A0 = 0.5 + 0.5 * 2 - 1 = 0.5; A1 = -1 + 0 - 2 = -3
    assert adv[0].tolist() == pytest.approx([0.5, -3.0])


def test_gae_validates_arguments():
    with pytest.raises(ValueError):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5)


def naive_gae(rewards, values, length, gamma, lam):
    """Textbook GAE on one row whose first ``length`` tokens are real (Schulman 2016 eq. 16)."""
    adv = [0.0] * len(rewards)
    next_adv, next_value = 0.0, 0.0
    for t in reversed(range(length)):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        adv[t] = next_adv
        next_value = values[t]
    ret = [a + v if t < length else 0.0 for t, (a, v) in enumerate(zip(adv, values))]
    return adv, ret


@st.composite
def gae_case(draw):
    b, r = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rewards = torch.randn(b, r, generator=gen, dtype=torch.float64)
    values = torch.randn(b, r, generator=gen, dtype=torch.float64)
    lengths = draw(st.lists(st.integers(0, r), min_size=b, max_size=b))
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5, 0.0]))
    lam = draw(st.sampled_from([0.95, 1.0, 0.5, 0.0]))
    return rewards, values, lengths, gamma, lam


@PROPERTY
@given(gae_case())
def test_gae_matches_naive_loop(case):
    rewards, values, lengths, gamma, lam = case
    mask = torch.arange(rewards.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, length in enumerate(lengths):
        exp_adv, exp_ret = naive_gae(rewards[i].tolist(), values[i].tolist(), length, gamma, lam)
        assert adv[i].tolist() == pytest.approx(exp_adv, abs=1e-10)
        assert ret[i].tolist() == pytest.approx(exp_ret, abs=1e-10)


@PROPERTY
@given(gae_case(), st.integers(0, 2**31 - 1))
def test_gae_skips_holes_in_the_mask(case, seed):
    # Documented: masked tokens are not steps; GAE with holes == GAE on the compacted row.
    rewards, values, _, gamma, lam = case
    mask = torch.rand(rewards.shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(rewards.shape[0]):
        real = mask[i]
        n = int(real.sum())
        exp_adv, exp_ret = naive_gae(rewards[i][real].tolist(), values[i][real].tolist(), n, gamma, lam)
        assert adv[i][real].tolist() == pytest.approx(exp_adv, abs=1e-10)
        assert ret[i][real].tolist() == pytest.approx(exp_ret, abs=1e-10)
        assert adv[i][~real].tolist() == [0.0] * (rewards.shape[1] - n)
        assert ret[i][~real].tolist() == [0.0] * (rewards.shape[1] - n)
