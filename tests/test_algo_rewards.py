"""tether.algo.rewards: reward shaping, score hygiene, running moments."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.algo import (
    RunningMoments,
    append_missing_eos,
    apply_missing_eos_penalty,
    clip_scores,
    kl_per_token,
    last_token_index,
    shape_rewards,
)

PROPERTY = settings(max_examples=50, deadline=None)


def test_last_token_index_hand_computed():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # EOS at 2, pads after
            [1, 1, 1, 1, 1],  # truncated: last position
            [0, 0, 0, 0, 0],  # empty -> 0 (documented)
            [1, 0, 1, 0, 0],  # not a prefix: still the last True
            [0, 0, 0, 0, 1],
        ]
    )
    out = last_token_index(mask)
    assert out.dtype == torch.long
    assert out.tolist() == [2, 4, 0, 2, 4]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 0, 2, 4]


def test_append_missing_eos_right_padded():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 6, 9, 0], [5, 6, 7, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    out, out_mask = append_missing_eos(ids, mask, torch.tensor([9, 4]), eos, pad)
    # ended rows untouched, the cut row gets EOS in its first pad, the full row a new column, empty stays empty
    assert out.tolist() == [[5, 6, 9, 0, 0], [5, 6, 7, 9, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]]
    assert out_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert ids.tolist()[1] == [5, 6, 7, 0]  # input not modified


def test_append_missing_eos_left_padded_and_other_end_ids():
    ids = torch.tensor([[0, 5, 4], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    out, out_mask = append_missing_eos(ids, mask, torch.tensor([9, 4]), 9, 0)
    assert out.tolist() == [[0, 5, 4, 0], [0, 5, 6, 9]]  # 4 is a generation EOS: already ended
    assert out_mask.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    same, same_mask = append_missing_eos(out, out_mask, torch.tensor([9, 4]), 9, 0)
    assert same.tolist() == out.tolist() and same_mask.tolist() == out_mask.tolist()  # idempotent
    # the appended EOS is where last_token_index (the score position) now points
    assert last_token_index(out_mask).tolist() == [2, 3]


def test_shape_rewards_puts_score_on_eos_not_pad():
    # row 0: response "a b EOS" + 1 pad; row 1: truncated, no pad
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 99.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, -7.0], [-1.0, -0.5, -1.0, -3.0]])
    scores = torch.tensor([1.0, -0.5])
    rewards, kl, kl_reward = shape_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # k1 = logprobs - ref: row 0 (0.5, 0, 0.5, pad->0); row 1 (0, -0.5, 0, 2)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, -0.5, 0.0, 2.0]]))
    torch.testing.assert_close(kl_reward, torch.tensor([[-0.05, 0.0, -0.05, 0.0], [0.0, 0.05, 0.0, -0.2]]))
    # score on the EOS (index 2) of row 0 - the pad at index 3 stays 0 (TRL #3750); row 1: last token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.95, 0.0], [0.0, 0.05, 0.0, -0.7]]))
    assert rewards[0, 3].item() == 0.0


def test_shape_rewards_estimator_and_empty_row():
    mask = torch.tensor([[1, 1], [0, 0]])
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)], [5.0, 5.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)], [0.0, 0.0]])
    rewards, kl, _ = shape_rewards(torch.tensor([2.0, 3.0]), logprobs, ref, mask, kl_coef=1.0, estimator="k3")
    assert kl[0].tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)], rel=1e-6)
    assert rewards[0].tolist() == pytest.approx([0.5 - math.log(2), 2 - 1 + math.log(2)], rel=1e-6)
    assert rewards[1].tolist() == [0.0, 0.0]  # no real token: the score goes nowhere


def test_shape_rewards_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(torch.zeros(3), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4), 0.1)


@st.composite
def shaping_case(draw):
    b, r = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.tensor(draw(st.lists(st.integers(0, r), min_size=b, max_size=b)))
    mask = torch.arange(r)[None, :] < lengths[:, None]
    logprobs = -torch.rand(b, r, generator=gen, dtype=torch.float64) * 5
    ref = -torch.rand(b, r, generator=gen, dtype=torch.float64) * 5
    scores = torch.randn(b, generator=gen, dtype=torch.float64)
    return scores, logprobs, ref, mask, draw(st.floats(0.0, 1.0)), draw(st.sampled_from(["k1", "k2", "k3"]))


@PROPERTY
@given(shaping_case())
def test_shape_rewards_matches_naive_loop(case):
    scores, logprobs, ref, mask, coef, estimator = case
    rewards, kl, kl_reward = shape_rewards(scores, logprobs, ref, mask, coef, estimator)
    b, r = mask.shape
    for i in range(b):
        length = int(mask[i].sum())
        for t in range(r):
            if t < length:
                log_r = ref[i, t].item() - logprobs[i, t].item()
                k = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.expm1(log_r) - log_r}[estimator]
                expected = -coef * k + (scores[i].item() if t == length - 1 else 0.0)
            else:
                k, expected = 0.0, 0.0
            assert kl[i, t].item() == pytest.approx(k, abs=1e-12)
            assert kl_reward[i, t].item() == pytest.approx(-coef * k, abs=1e-12)
            assert rewards[i, t].item() == pytest.approx(expected, abs=1e-12)
    # sum of rewards of a row = -coef * sum KL + score (if the row is non-empty)
    expected_sums = -coef * (kl_per_token(logprobs, ref, estimator) * mask).sum(1) + scores * mask.any(1)
    torch.testing.assert_close(rewards.sum(1), expected_sums)


def test_apply_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    out = apply_missing_eos_penalty(scores, torch.tensor([True, False, True]), penalty=1.0)
    assert out.tolist() == [1.0, 1.0, 3.0]
    assert scores.tolist() == [1.0, 2.0, 3.0]  # not in place
    out = apply_missing_eos_penalty(scores, torch.tensor([0, 0, 1]), penalty=0.5)
    assert out.tolist() == [0.5, 1.5, 3.0]


def test_clip_scores():
    assert clip_scores(torch.tensor([-5.0, 0.5, 7.0, -2.0]), 2.0).tolist() == [-2.0, 0.5, 2.0, -2.0]
    with pytest.raises(ValueError):
        clip_scores(torch.tensor([1.0]), 0.0)


def test_running_moments_hand_computed():
    rm = RunningMoments()
    assert (rm.mean, rm.std, rm.count) == (0.0, 1.0, 0)  # documented prior before any data
    rm.update(torch.tensor([1.0, 2.0, 3.0]))
    assert rm.mean == pytest.approx(2.0) and rm.std == pytest.approx(math.sqrt(2 / 3))
    rm.update(torch.tensor([4.0, 5.0]))
    # all seen: 1..5 -> mean 3, population variance 2
    assert rm.count == 5
    assert rm.mean == pytest.approx(3.0)
    assert rm.std == pytest.approx(math.sqrt(2.0))
    out = rm.normalize(torch.tensor([3.0, 3.0 + math.sqrt(2.0)]))
    assert out.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    rm.update(torch.tensor([]))  # empty batch: no-op
    assert rm.count == 5
    with pytest.raises(ValueError, match="non-finite"):
        rm.update(torch.tensor([1.0, float("nan")]))
    assert rm.count == 5 and rm.mean == pytest.approx(3.0)


def test_running_moments_state_dict_json_roundtrip():
    rm = RunningMoments()
    rm.update(torch.tensor([0.5, -1.0, 2.0]))
    state = json.loads(json.dumps(rm.state_dict()))
    assert all(isinstance(v, (int, float)) for v in state.values())
    resumed = RunningMoments()
    resumed.load_state_dict(state)
    rm.update(torch.tensor([3.0, 4.0]))
    resumed.update(torch.tensor([3.0, 4.0]))
    assert (resumed.mean, resumed.std, resumed.count) == (rm.mean, rm.std, rm.count)


@PROPERTY
@given(st.lists(st.integers(1, 20), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_running_moments_equal_statistics_of_concatenation(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, generator=gen) * 3 + 1 for n in sizes]
    rm = RunningMoments()
    for batch in batches:
        rm.update(batch)
    everything = torch.cat(batches).double()
    assert rm.count == everything.numel()
    assert rm.mean == pytest.approx(everything.mean().item(), rel=1e-9, abs=1e-9)
    assert rm.std == pytest.approx(everything.std(unbiased=False).item(), rel=1e-9, abs=1e-12)
