"""tether.algo.losses: hand-computed cases, sanity anchor and naive-loop equivalence."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.algo import clipped_policy_loss, clipped_value_loss, entropy_loss, lm_loss, pairwise_loss

PROPERTY = settings(max_examples=50, deadline=None)
STAT_KEYS = {"loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_max", "ratio_min"}


def assert_detached_scalars(stats):
    for name, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert not value.requires_grad, name


# ------------------------------------------------------------------ policy loss


def policy_case():
    # 4 real tokens + 1 pad with garbage. ratios 1.5, 1.1, 0.9, 0.7; advantages 1, 1, -1, 1.
    ratios = torch.tensor([[1.5, 1.1, 0.9, 0.7, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, 40.0]])
    logprobs = (old + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprobs, old, advantages, mask


def test_policy_loss_exactly_one_of_four_tokens_clips():
    logprobs, old, advantages, mask = policy_case()
    loss, stats = clipped_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # t0: max(-1.5, -1.2) = -1.2  clipped branch chosen (ratio above 1 + eps with A > 0)
    # t1: max(-1.1, -1.1) = -1.1  tie: not counted as clipped
    # t2: max( 0.9,  0.9) =  0.9  A < 0, ratio inside [0.8, 1.2]
    # t3: max(-0.7, -0.8) = -0.7  ratio below 1 - eps but A > 0: unclipped term is the max
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.9 - 0.7) / 4, rel=1e-6)  # -0.525
    assert set(stats) == STAT_KEYS
    assert_detached_scalars(stats)
    assert stats["loss"].item() == pytest.approx(-0.525, rel=1e-6)
    assert stats["clipfrac"].item() == 0.25
    assert stats["ratio_mean"].item() == pytest.approx(1.05, rel=1e-6)  # (1.5 + 1.1 + 0.9 + 0.7) / 4
    assert stats["ratio_max"].item() == pytest.approx(1.5, rel=1e-6)
    assert stats["ratio_min"].item() == pytest.approx(0.7, rel=1e-6)
    # k3 per token: (r - 1) - ln r = 0.094535, 0.004690, 0.005361, 0.056675
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 1.1, 0.9, 0.7)) / 4  # 0.040315
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    # gradient d loss / d logprobs = -A * ratio / 4 on unclipped tokens, 0 on the clipped one and the pad
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad[0].tolist() == pytest.approx([0.0, -1.1 / 4, 0.9 / 4, -0.7 / 4, 0.0], rel=1e-5)


def test_policy_loss_asymmetric_clip_higher():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[1.25, 0.75]]).log()
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # symmetric eps 0.2: t0 clipped to 1.2 -> -1.2; t1 clipped to 0.8 -> 0.8 (A < 0)
    loss, stats = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, rel=1e-6)
    assert stats["clipfrac"].item() == 1.0
    # DAPO clip-higher: eps_high 0.28 lets t0 through (1.25 < 1.28); eps_low stays 0.2
    loss, stats = clipped_policy_loss(logprobs, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2, rel=1e-6)
    assert stats["clipfrac"].item() == 0.5
    # a lower low bound (eps_low 0.3) lets t1 through instead
    loss, stats = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_low=0.3)
    assert loss.item() == pytest.approx((-1.2 + 0.75) / 2, rel=1e-6)


def test_policy_loss_dual_clip():
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[5.0, 5.0, 2.0]]).log().requires_grad_()
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # without dual clip: t0 max(5, 1.2) = 5; t1 max(-5, -1.2) = -1.2; t2 max(2, 1.2) = 2
    loss, _ = clipped_policy_loss(logprobs, old, adv, mask)
    assert loss.item() == pytest.approx((5.0 - 1.2 + 2.0) / 3, rel=1e-6)
    # dual clip c = 3 caps A < 0 tokens at -c * A = 3: only t0 changes (5 -> 3)
    loss, stats = clipped_policy_loss(logprobs, old, adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3, rel=1e-6)
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)  # t1 (the PPO clip), as defined
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad[0].tolist() == pytest.approx([0.0, 0.0, 2.0 / 3], rel=1e-5)  # capped & clipped: no grad
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_policy_loss(logprobs, old, adv, mask, dual_clip=1.0)


@PROPERTY
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_policy_sanity_anchor_ratio_exactly_one(b, r, seed):
    # N-details item 15: logprobs == old_logprobs -> ratio exactly 1, approx_kl 0, clipfrac 0
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(b, r, generator=gen) * 10
    adv = torch.randn(b, r, generator=gen)
    mask = torch.ones(b, r, dtype=torch.bool)
    mask[:, r // 2 + 1 :] = False
    loss, stats = clipped_policy_loss(logprobs.clone().requires_grad_(), logprobs.clone(), adv, mask)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["ratio_max"].item() == 1.0
    assert stats["ratio_min"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-(adv[mask]).mean().item(), rel=1e-6, abs=1e-7)


def test_policy_loss_empty_mask_is_zero_not_nan():
    x = torch.randn(2, 3, requires_grad=True)
    loss, stats = clipped_policy_loss(x, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in stats.values())


@st.composite
def policy_inputs(draw):
    b, r = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    old = -torch.rand(b, r, generator=gen, dtype=torch.float64) * 3
    logprobs = old + torch.randn(b, r, generator=gen, dtype=torch.float64) * 0.4
    adv = torch.randn(b, r, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, r, generator=gen) < 0.7
    return logprobs, old, adv, mask


@PROPERTY
@given(
    policy_inputs(),
    st.sampled_from([(0.2, None, None), (0.1, 0.2, 0.28), (0.3, None, 0.5)]),
    st.sampled_from([None, 2.0, 3.0]),
)
def test_policy_loss_matches_naive_loop(inputs, eps, dual_clip):
    logprobs, old, adv, mask = inputs
    clip_eps, low, high = eps
    loss, stats = clipped_policy_loss(logprobs, old, adv, mask, clip_eps, low, high, dual_clip)
    lo = 1 - (clip_eps if low is None else low)
    hi = 1 + (clip_eps if high is None else high)
    losses, kls, clipped, ratios = [], [], [], []
    for lp, o, a, m in zip(*(t.flatten().tolist() for t in (logprobs, old, adv, mask))):
        if not m:
            continue
        ratio = math.exp(lp - o)
        unclipped, clipped_term = -a * ratio, -a * min(max(ratio, lo), hi)
        value = max(unclipped, clipped_term)
        if dual_clip is not None and a < 0:
            value = min(value, -dual_clip * a)
        losses.append(value)
        kls.append((ratio - 1) - math.log(ratio))
        clipped.append(1.0 if clipped_term > unclipped else 0.0)
        ratios.append(ratio)
    n = len(losses)
    mean = lambda xs: sum(xs) / n if n else 0.0  # noqa: E731
    assert loss.item() == pytest.approx(mean(losses), abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(mean(kls), abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(mean(clipped), abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(mean(ratios), abs=1e-12)
    assert stats["ratio_max"].item() == pytest.approx(max(ratios) if n else 0.0, abs=1e-12)
    assert stats["ratio_min"].item() == pytest.approx(min(ratios) if n else 0.0, abs=1e-12)


# ------------------------------------------------------------------ value loss


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.5, 2.0, 77.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 1.0, -5.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 1e5]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    # t0: (1-2)^2 = 1 vs clip(1, 0.3, 0.7) = 0.7 -> (0.7-2)^2 = 1.69 -> 1.69 (clipped chosen)
    # t1: V inside the band -> 0.25 both (tie: not clipped)
    # t2: (2-1)^2 = 1 vs clip(2, 0.8, 1.2) = 1.2 -> 0.04 -> 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25 + 1.0) / 3, rel=1e-6)  # 0.49
    assert set(stats) == {"loss", "clipfrac", "mean", "error"}
    assert_detached_scalars(stats)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["mean"].item() == pytest.approx(3.5 / 3, rel=1e-6)
    assert stats["error"].item() == pytest.approx((1 + 0.25 + 1) / 3, rel=1e-6)  # 0.75
    (grad,) = torch.autograd.grad(loss, values)
    # clipped t0 has no gradient; t1: (0.5 - 0) / 3; t2: (2 - 1) / 3
    assert grad[0].tolist() == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.0], rel=1e-5)

    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * (1 + 0.25 + 1) / 3, rel=1e-6)  # 0.375
    assert stats["clipfrac"].item() == 0.0


@PROPERTY
@given(policy_inputs(), st.sampled_from([0.2, 0.05, None]))
def test_value_loss_matches_naive_loop(inputs, clip_eps):
    values, old, returns, mask = inputs
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps)
    losses, clipped, vs, errors = [], [], [], []
    for v, o, ret, m in zip(*(t.flatten().tolist() for t in (values, old, returns, mask))):
        if not m:
            continue
        e1 = (v - ret) ** 2
        e2 = (min(max(v, o - clip_eps), o + clip_eps) - ret) ** 2 if clip_eps is not None else e1
        losses.append(0.5 * max(e1, e2))
        clipped.append(1.0 if e2 > e1 else 0.0)
        vs.append(v)
        errors.append(e1)
    n = len(losses)
    mean = lambda xs: sum(xs) / n if n else 0.0  # noqa: E731
    assert loss.item() == pytest.approx(mean(losses), abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(mean(clipped), abs=1e-12)
    assert stats["mean"].item() == pytest.approx(mean(vs), abs=1e-12)
    assert stats["error"].item() == pytest.approx(mean(errors), abs=1e-12)


# ------------------------------------------------------------------ entropy, lm, pairwise


def test_entropy_loss_hand_computed():
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 50.0, 60.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = entropy_loss(entropy, mask)
    assert loss.item() == pytest.approx(-2.0)  # -(1 + 2 + 3) / 3
    assert stats["entropy"].item() == pytest.approx(2.0)
    assert_detached_scalars(stats)
    (grad,) = torch.autograd.grad(loss, entropy)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))
    loss, _ = entropy_loss(entropy, mask, num_tokens=6)
    assert loss.item() == pytest.approx(-1.0)


def test_lm_loss_uniform_logits_hand_computed():
    # V = 2, all logits 0 -> every target has NLL ln 2, perplexity 2
    logits = torch.zeros(1, 4, 2)
    input_ids = torch.tensor([[0, 1, 1, 0]])
    loss_mask = torch.tensor([[1, 1, 1, 0]])  # targets at positions 1, 2 count; position 3 does not
    loss, stats = lm_loss(logits, input_ids, loss_mask)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert stats["perplexity"].item() == pytest.approx(2.0, rel=1e-6)
    assert stats["tokens"].item() == 2.0
    assert_detached_scalars(stats)


def test_lm_loss_equals_torch_cross_entropy_on_shifted_example():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, requires_grad=True)
    input_ids = torch.randint(0, 7, (2, 5), generator=gen)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # prompt + padding masked
    loss, stats = lm_loss(logits, input_ids, loss_mask)
    labels = input_ids.clone()
    labels[loss_mask == 0] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    assert stats["tokens"].item() == 5.0  # targets at (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)
    assert stats["perplexity"].item() == pytest.approx(math.exp(expected.item()), rel=1e-6)
    # bf16 logits: float32 loss
    loss_bf16, _ = lm_loss(logits.detach().bfloat16(), input_ids, loss_mask)
    assert loss_bf16.dtype == torch.float32


def test_lm_loss_ignores_minus_100_labels_at_masked_targets():
    logits = torch.zeros(1, 3, 4)
    input_ids = torch.tensor([[2, -100, 3]])  # -100 at a masked target must not be gathered
    loss, stats = lm_loss(logits, input_ids, torch.tensor([[1, 0, 1]]))
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)
    assert stats["tokens"].item() == 1.0
    loss, stats = lm_loss(logits, input_ids, torch.tensor([[1, 0, 0]]))  # no targets: 0, ppl 1
    assert loss.item() == 0.0 and stats["perplexity"].item() == 1.0


def test_pairwise_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 1.0])
    loss, stats = pairwise_loss(chosen, rejected)
    # diffs (2, -1, 0): -log sigmoid = log(1 + e^-2), log(1 + e), log 2
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.e) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["margin"].item() == pytest.approx(1 / 3)  # mean(c - r)
    assert_detached_scalars(stats)
    loss, stats = pairwise_loss(chosen, rejected, margin=1.0)  # diffs - 1 = (1, -2, -1)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2)) + math.log1p(math.e)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # accuracy ignores the margin
    loss, _ = pairwise_loss(chosen, rejected, margin=torch.tensor([2.0, 0.0, 0.0]))  # per-pair margin
    expected = (math.log(2) + math.log1p(math.e) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # large score gaps stay finite (logsigmoid, not log(sigmoid))
    loss, _ = pairwise_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)


def test_value_clipfrac_counts_only_values_outside_the_band():
    """Values inside (and exactly on) the band are not clipped, even where V_old + (V - V_old) != V
    in floating point; a naive count of |V - V_old| > eps and a larger clipped error agrees."""
    torch.manual_seed(0)
    old, values, returns = torch.randn(1, 100_000) * 0.1, torch.randn(1, 100_000) * 0.3, torch.randn(1, 100_000)
    inside = (values - old).abs() <= 0.2  # in float32, V_old + (V - V_old) misses V by an ulp on ~1% of these
    _, stats = clipped_value_loss(values, old, returns, torch.ones_like(old, dtype=torch.bool), clip_eps=0.2)
    clipped_error = (old + (values - old).clamp(-0.2, 0.2) - returns) ** 2
    outside_and_larger = (~inside & (clipped_error > (values - returns) ** 2)).double().mean().item()
    assert stats["clipfrac"].item() == pytest.approx(outside_and_larger, abs=1e-9)
    # by hand: on the boundary (V - V_old = +eps exactly, in binary), just past it, and far past it
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.25, 0.25 + 1e-9, 1.0, -1.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    _, stats = clipped_value_loss(values, old, returns, torch.ones_like(old, dtype=torch.bool), clip_eps=0.25)
    # t0 on the boundary: not clipped; t1: clipped error (2-0.25)^2 > (2-0.25-1e-9)^2 -> clipped;
    # t2: V=1 outside, clipped error (1.75)^2 > 1 -> clipped; t3: V=-1 outside, clipped (2.25... vs 3)^2 smaller -> not
    assert stats["clipfrac"].item() == pytest.approx(2 / 4, abs=1e-15)
    naive = [1.0 if abs(v - o) > 0.25 and (min(max(v, o - 0.25), o + 0.25) - r) ** 2 > (v - r) ** 2 else 0.0
             for v, o, r in zip(values[0].tolist(), old[0].tolist(), returns[0].tolist())]
    assert sum(naive) / 4 == stats["clipfrac"].item()
