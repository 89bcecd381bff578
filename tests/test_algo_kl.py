"""tether.algo.kl: estimators, KL-as-loss gradients, controllers."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.algo import AdaptiveKLController, FixedKLController, kl_loss, kl_per_token

PROPERTY = settings(max_examples=50, deadline=None)
LN2 = math.log(2.0)


def test_kl_estimators_hand_computed():
    # token 0: pi = 0.5, ref = 0.25 -> log r = -ln 2, r = 1/2
    # token 1: pi = 0.25, ref = 0.5 -> log r = +ln 2, r = 2
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    k1 = kl_per_token(logprobs, ref, "k1")[0].tolist()
    k2 = kl_per_token(logprobs, ref, "k2")[0].tolist()
    k3 = kl_per_token(logprobs, ref, "k3")[0].tolist()
    assert k1 == pytest.approx([LN2, -LN2], rel=1e-6)  # -log r: can be negative
    assert k2 == pytest.approx([0.5 * LN2**2, 0.5 * LN2**2], rel=1e-6)  # 0.2402
    assert k3 == pytest.approx([-0.5 + LN2, 1.0 - LN2], rel=1e-6)  # (r - 1) - log r: 0.1931, 0.3069
    assert kl_per_token(logprobs, ref).tolist() == kl_per_token(logprobs, ref, "k1").tolist()  # default k1
    same = kl_per_token(ref, ref, "k3")
    assert torch.equal(same, torch.zeros_like(same))


def test_unknown_estimator_names_allowed_values():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


@PROPERTY
@given(st.floats(-20.0, 20.0))
def test_k2_k3_nonnegative(log_r):
    ref = torch.tensor([[log_r]], dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    k3 = kl_per_token(zero, ref, "k3").item()
    assert k3 >= 0.0
    assert k3 == pytest.approx(math.expm1(log_r) - log_r, rel=1e-12, abs=1e-300)
    assert kl_per_token(zero, ref, "k2").item() == pytest.approx(0.5 * log_r * log_r)


def test_k1_k3_unbiased_k2_biased_exact_expectation():
    # E_{a~pi}[k(a)] by enumeration: k1 and k3 give KL(pi || ref) exactly, k2 does not (Schulman 2020).
    pi = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    true_kl = 0.7 * math.log(7) + 0.2 * math.log(2 / 3) + 0.1 * math.log(1 / 6)  # 1.1018
    lp, lr = pi.log()[None, :], ref.log()[None, :]
    expect = lambda k: float((pi * kl_per_token(lp, lr, k)[0]).sum())  # noqa: E731
    assert expect("k1") == pytest.approx(true_kl, rel=1e-12)
    assert expect("k3") == pytest.approx(true_kl, rel=1e-12)
    assert expect("k2") == pytest.approx(1.50226, rel=1e-4)  # 0.5 * sum pi (log pi/ref)^2 != KL


def test_kl_loss_hand_computed_and_masked():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), 123.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -77.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = kl_loss(logprobs, ref, mask)  # default k3: (ln2 - 0.5 + 1 - ln2) / 2 = 0.25
    assert loss.item() == pytest.approx(0.25, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(0.25, rel=1e-6)
    loss, stats = kl_loss(logprobs, ref, mask, estimator="k2", num_tokens=4)  # sum 2 * 0.2402 / 4
    assert loss.item() == pytest.approx(LN2**2 / 4, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(0.5 * LN2**2, rel=1e-6)  # stats: mean over this call
    with pytest.raises(ValueError, match="num_tokens"):
        kl_loss(logprobs, ref, mask, num_tokens=0)


def _expected_grad(estimator, theta, ref_logprobs):
    """E_{a~pi}[grad of kl_loss on a single sampled token a], by exact enumeration."""
    pi = torch.softmax(theta, -1).detach()
    total = torch.zeros_like(theta)
    for a in range(theta.shape[0]):
        logprobs = torch.log_softmax(theta, -1)[a].reshape(1, 1)
        loss, _ = kl_loss(logprobs, ref_logprobs[a].reshape(1, 1), torch.ones(1, 1, dtype=torch.bool), estimator)
        (grad,) = torch.autograd.grad(loss, theta)
        total += pi[a] * grad
    return total


def test_kl_loss_gradients_match_documented_placement_claims():
    # Tang & Munos 2025 / Liu et al. 2025: on-policy k2-as-loss has the exact reverse-KL
    # gradient; k1-as-loss has zero expected gradient; k3-as-loss is biased.
    theta = torch.tensor([0.5, -1.0, 1.5, 0.0], dtype=torch.float64, requires_grad=True)
    ref_logprobs = torch.log_softmax(torch.tensor([1.0, 0.3, -0.5, 0.2], dtype=torch.float64), -1)
    exact_kl = (torch.softmax(theta, -1) * (torch.log_softmax(theta, -1) - ref_logprobs)).sum()
    (true_grad,) = torch.autograd.grad(exact_kl, theta)
    torch.testing.assert_close(_expected_grad("k2", theta, ref_logprobs), true_grad)
    torch.testing.assert_close(_expected_grad("k1", theta, ref_logprobs), torch.zeros_like(theta))
    k3_grad = _expected_grad("k3", theta, ref_logprobs)
    assert (k3_grad - true_grad).abs().max() > 0.05


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    state = json.loads(json.dumps(ctl.state_dict()))
    other = FixedKLController(0.9)
    other.load_state_dict(state)
    assert other.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # e = clip(12/6 - 1 = 1, +-0.2) = 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(6.6, 256)  # e = 0.1, inside the clip
    assert ctl.value == pytest.approx(0.2 * (1 + 0.1 * 256 / 10000))  # 0.200512
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(-3.0, 256)  # negative k1 estimate: e = clip(-1.5) = -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))  # 0.198976
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(torch.tensor(6.0), 256)  # on target: unchanged; tensors accepted
    assert ctl.value == pytest.approx(0.2)


def test_adaptive_kl_controller_state_and_errors():
    ctl = AdaptiveKLController(0.15, 6.0, 10000)
    for kl in (9.0, 7.0, 1.0):
        ctl.update(kl, 64)
    resumed = AdaptiveKLController(0.15, 6.0, 10000)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert resumed.value == ctl.value != 0.15
    ctl.update(8.0, 64)
    resumed.update(8.0, 64)
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"), 64)
    assert math.isfinite(ctl.value)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
