"""Cross-cutting properties of tether.algo.

* masked positions never matter: filling them with garbage (huge values, inf, nan, invalid
  token ids) changes no output, loss, stat or gradient - for every function taking a mask;
* ``num_tokens``: micro-batches summed == one pass, in loss and gradient.
(That importing tether.algo pulls in no transformers: tests/test_layering.py.)
"""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tether.algo as algo

B, R, V = 3, 5, 6


def random_mask(gen, shape=(B, R)):
    mask = torch.rand(shape, generator=gen) < 0.6
    mask[0] = torch.arange(shape[1]) < 2  # a right-padded row
    mask[-1] = False  # an empty row
    return mask


def token_case(fn, names, **kwargs):
    """A case for fn(*tensors named ``names``, mask, **kwargs) with per-token inputs of shape (B, R)."""

    def build(gen):
        mask = random_mask(gen)
        inputs = {name: -torch.rand(B, R, generator=gen) * 3 for name in names}
        call = lambda ins: fn(*[ins[n] for n in names], ins["mask"], **kwargs)  # noqa: E731
        inputs["mask"] = mask
        return call, inputs, {name: mask for name in names}

    return build


def shape_rewards_case(estimator):
    def build(gen):
        mask = random_mask(gen)
        inputs = {
            "scores": torch.randn(B, generator=gen),
            "logprobs": -torch.rand(B, R, generator=gen) * 3,
            "ref_logprobs": -torch.rand(B, R, generator=gen) * 3,
            "mask": mask,
        }
        def call(i):
            return algo.shape_rewards(i["scores"], i["logprobs"], i["ref_logprobs"], i["mask"], 0.1, estimator)

        return call, inputs, {"logprobs": mask, "ref_logprobs": mask}

    return build


def lm_loss_case(num_tokens=None):
    def build(gen):
        loss_mask = random_mask(gen)
        logits = torch.randn(B, R, V, generator=gen)
        input_ids = torch.randint(0, V, (B, R), generator=gen)
        # logits[:, t] predicts input_ids[:, t + 1]: it is garbage-able where that target does not count
        logit_real = torch.cat([loss_mask[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], dim=1)
        call = lambda i: algo.lm_loss(i["logits"], i["input_ids"], i["loss_mask"], num_tokens)  # noqa: E731
        inputs = {"logits": logits, "input_ids": input_ids, "loss_mask": loss_mask}
        return call, inputs, {"logits": logit_real[..., None].expand(B, R, V), "input_ids": loss_mask}

    return build


CASES = {
    "masked_sum": token_case(algo.masked_sum, ["x"]),
    "masked_sum_dim1": token_case(algo.masked_sum, ["x"], dim=1),
    "masked_mean": token_case(algo.masked_mean, ["x"]),
    "masked_mean_dim0": token_case(algo.masked_mean, ["x"], dim=0),
    "masked_var": token_case(algo.masked_var, ["x"]),
    "masked_var_unbiased": token_case(algo.masked_var, ["x"], unbiased=True),
    "masked_whiten": token_case(algo.masked_whiten, ["x"]),
    "masked_whiten_scale_only": token_case(algo.masked_whiten, ["x"], shift_mean=False),
    "explained_variance": token_case(algo.explained_variance, ["values", "returns"]),
    "kl_loss_k1": token_case(algo.kl_loss, ["logprobs", "ref_logprobs"], estimator="k1"),
    "kl_loss_k2": token_case(algo.kl_loss, ["logprobs", "ref_logprobs"], estimator="k2", num_tokens=7.0),
    "kl_loss_k3": token_case(algo.kl_loss, ["logprobs", "ref_logprobs"], estimator="k3"),
    "shape_rewards_k1": shape_rewards_case("k1"),
    "shape_rewards_k3": shape_rewards_case("k3"),
    "gae": token_case(algo.gae, ["rewards", "values"], gamma=0.99, lam=0.95),
    "clipped_policy_loss": token_case(
        algo.clipped_policy_loss, ["logprobs", "old_logprobs", "advantages"], clip_eps_high=0.28, dual_clip=3.0
    ),
    "clipped_policy_loss_num_tokens": token_case(
        algo.clipped_policy_loss, ["logprobs", "old_logprobs", "advantages"], num_tokens=9.0
    ),
    "clipped_value_loss": token_case(algo.clipped_value_loss, ["values", "old_values", "returns"]),
    "clipped_value_loss_unclipped": token_case(
        algo.clipped_value_loss, ["values", "old_values", "returns"], clip_eps=None
    ),
    "entropy_loss": token_case(algo.entropy_loss, ["entropy"]),
    "clipped_policy_loss_weights": token_case(
        algo.clipped_policy_loss, ["logprobs", "old_logprobs", "advantages"], weights=torch.full((B, R), 0.1)
    ),
    "returns_to_go": token_case(algo.returns_to_go, ["rewards"]),
    "reinforce_pp_advantages": token_case(algo.reinforce_pp_advantages, ["rewards"]),
    "lm_loss": lm_loss_case(),
    "lm_loss_num_tokens": lm_loss_case(num_tokens=11.0),
}
# These read nothing per token but the mask (broadcast_to_tokens takes one value per response),
# so there is nothing to fill with garbage.
MASK_ONLY = {"last_token_index", "aggregation_weights", "broadcast_to_tokens"}
# append_missing_eos passes ids through unchanged, garbage in pads included; tested in test_algo_rewards.
PASS_THROUGH = {"append_missing_eos"}


def flatten(out):
    """All tensors of a result: a tensor, a tuple of them, or (loss, stats dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in flatten(out[key])]
    return [t for item in out for t in flatten(item)]


def run(call, inputs):
    inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    outputs = flatten(call(inputs))
    differentiable = [o for o in outputs if o.requires_grad]
    grads = {}
    if differentiable:
        targets = [k for k, v in inputs.items() if v.requires_grad]
        total = sum(o.sum() for o in differentiable)
        values = torch.autograd.grad(total, [inputs[k] for k in targets], allow_unused=True)
        grads = {k: g for k, g in zip(targets, values) if g is not None}
    return [o.detach() for o in outputs], grads


def garbage_like(x, real, gen, extreme):
    if x.dtype == torch.long:  # token ids: out of vocab and -100 labels
        junk = torch.randint(-100, 10**6, x.shape, generator=gen)
    else:
        junk = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1e4
        junk[torch.rand(x.shape, generator=gen) < 0.3] = 1e30
        if extreme:
            specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -1e30], dtype=x.dtype)
            pick = torch.randint(0, 4, x.shape, generator=gen)
            junk = torch.where(torch.rand(x.shape, generator=gen) < 0.5, specials[pick], junk)
    return torch.where(real, x, junk)


def test_every_masked_function_has_an_invariance_case():
    with_mask = {
        name
        for name in algo.__all__
        if inspect.isfunction(getattr(algo, name))
        and {"mask", "loss_mask"} & set(inspect.signature(getattr(algo, name)).parameters)
    }
    covered = {fn for fn in with_mask if any(case == fn or case.startswith(fn + "_") for case in CASES)}
    assert with_mask - covered - MASK_ONLY - PASS_THROUGH == set()
    assert len(with_mask) >= 13  # catches a broken introspection making this test vacuous


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), extreme=st.booleans())
def test_masked_positions_never_change_any_result(case, seed, extreme):
    gen = torch.Generator().manual_seed(seed)
    call, inputs, fillable = CASES[case](gen)
    clean_out, clean_grads = run(call, inputs)
    dirty = dict(inputs)
    for name, real in fillable.items():
        dirty[name] = garbage_like(inputs[name], real, gen, extreme)
        assert not torch.equal(dirty[name], inputs[name]) or bool(real.all())  # garbage really landed
    dirty_out, dirty_grads = run(call, dirty)
    assert len(clean_out) == len(dirty_out) > 0
    for a, b in zip(clean_out, dirty_out):
        assert torch.equal(a, b), case  # bit-identical, including the zeros at masked positions
    assert clean_grads.keys() == dirty_grads.keys()
    for name in clean_grads:
        assert torch.equal(clean_grads[name], dirty_grads[name]), (case, name)
        assert torch.isfinite(dirty_grads[name]).all(), (case, name)


def test_per_token_outputs_are_zero_at_masked_positions():
    gen = torch.Generator().manual_seed(3)
    mask = random_mask(gen)
    x = torch.randn(B, R, generator=gen) * 100
    assert (algo.masked_whiten(x, mask)[~mask] == 0).all()
    assert (algo.masked_whiten(x, mask, shift_mean=False)[~mask] == 0).all()
    for out in algo.gae(x, x.flip(1), mask) + algo.shape_rewards(x[:, 0], x, x.flip(1), mask, 0.2)[:3]:
        assert (out[~mask] == 0).all()


# ------------------------------------------------------------------ num_tokens


def loss_inputs(gen, name):
    """(fn(rows, num_tokens) -> (loss, stats), the leaf to differentiate, total real tokens)."""
    mask = torch.rand(4, R, generator=gen) < 0.7
    mask[:, :2] = True  # every micro-batch has real tokens (and lm targets)
    a, b, c = (-torch.rand(4, R, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    b = a + torch.randn(4, R, generator=gen, dtype=torch.float64) * 0.5  # some policy ratios clip
    if name == "lm":
        a = torch.randn(4, R, V, generator=gen, dtype=torch.float64)  # logits
        ids = torch.randint(0, V, (4, R), generator=gen)
    a.requires_grad_()

    def fn(s, n):
        if name == "policy":
            return algo.clipped_policy_loss(a[s], b[s], c[s], mask[s], dual_clip=2.0, num_tokens=n)
        if name == "value":
            return algo.clipped_value_loss(a[s], b[s], c[s], mask[s], 0.1, num_tokens=n)
        if name == "entropy":
            return algo.entropy_loss(a[s], mask[s], num_tokens=n)
        if name == "kl":
            return algo.kl_loss(a[s], b[s], mask[s], "k2", num_tokens=n)
        return algo.lm_loss(a[s], ids[s], mask[s], num_tokens=n)

    count = mask[:, 1:].sum() if name == "lm" else mask.sum()
    return fn, a, float(count)


@pytest.mark.parametrize("name", ["policy", "value", "entropy", "kl", "lm"])
@pytest.mark.parametrize("splits", [[slice(0, 2), slice(2, 4)], [slice(i, i + 1) for i in range(4)]])
def test_num_tokens_micro_batches_equal_one_pass(name, splits):
    fn, leaf, total_tokens = loss_inputs(torch.Generator().manual_seed(7), name)
    full_loss, full_stats = fn(slice(None), None)  # masked mean over the whole minibatch
    (full_grad,) = torch.autograd.grad(full_loss, leaf)
    summed, accumulated = 0.0, torch.zeros_like(leaf)
    for s in splits:  # gradient accumulation over micro-batches
        loss, stats = fn(s, total_tokens)
        (grad,) = torch.autograd.grad(loss, leaf)
        summed, accumulated = summed + loss.detach(), accumulated + grad
    torch.testing.assert_close(summed, full_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(accumulated, full_grad, rtol=1e-12, atol=1e-12)
    assert full_grad.abs().sum() > 0  # a real gradient was compared
    # stats stay per-call masked means: the last micro-batch's "loss" stat is its own mean
    own_loss, _ = fn(splits[-1], None)
    torch.testing.assert_close(stats["loss"], own_loss.detach())


def test_pairwise_num_pairs_micro_batches_equal_one_pass():
    gen = torch.Generator().manual_seed(5)
    chosen = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(6, generator=gen, dtype=torch.float64)
    full, _ = algo.pairwise_loss(chosen, rejected, margin=0.5)
    (full_grad,) = torch.autograd.grad(full, chosen)
    summed, accumulated = 0.0, torch.zeros_like(chosen)
    for s in (slice(0, 4), slice(4, 6)):
        loss, _ = algo.pairwise_loss(chosen[s], rejected[s], margin=0.5, num_pairs=6)
        (grad,) = torch.autograd.grad(loss, chosen)
        summed, accumulated = summed + loss.detach(), accumulated + grad
    torch.testing.assert_close(summed, full.detach())
    torch.testing.assert_close(accumulated, full_grad)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("name", ["policy", "entropy", "kl"])
@pytest.mark.parametrize("splits", [[slice(0, 2), slice(2, 4)], [slice(i, i + 1) for i in range(4)]])
def test_loss_aggregation_micro_batches_equal_one_pass(mode, name, splits):
    """Every loss_aggregation mode: micro-batch weights with whole-minibatch denominators give exactly
    the one-pass loss and gradient (gradient accumulation stays exact)."""
    gen = torch.Generator().manual_seed(11)
    mask = torch.rand(4, R, generator=gen) < 0.7
    mask[:, :2] = True
    a = (-torch.rand(4, R, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    b = a.detach() + torch.randn(4, R, generator=gen, dtype=torch.float64) * 0.5
    c = torch.randn(4, R, generator=gen, dtype=torch.float64)
    tokens, sequences = float(mask.sum()), 4.0

    def fn(s):
        w = algo.aggregation_weights(mask[s], mode, tokens, sequences, R).double()
        if name == "policy":
            return algo.clipped_policy_loss(a[s], b[s], c[s], mask[s], weights=w)[0]
        if name == "entropy":
            return algo.entropy_loss(a[s], mask[s], weights=w)[0]
        return algo.kl_loss(a[s], b[s], mask[s], "k3", weights=w)[0]

    full = fn(slice(None))
    (full_grad,) = torch.autograd.grad(full, a)
    summed, accumulated = 0.0, torch.zeros_like(a)
    for s in splits:
        loss = fn(s)
        (grad,) = torch.autograd.grad(loss, a)
        summed, accumulated = summed + loss.detach(), accumulated + grad
    torch.testing.assert_close(summed, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(accumulated, full_grad, rtol=1e-12, atol=1e-12)
    assert full_grad.abs().sum() > 0
