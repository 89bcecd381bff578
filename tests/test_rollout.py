"""Rollout: sampling under left padding, cutting at EOS, log-probs as sampled; the four roles."""

import pytest
import torch

from tether.roles import SeparateRoles

from tether.models import (
    ValueModel,
    disable_dropout,
    ensure_pad_token,
    eos_token_ids,
    frozen_copy,
    position_ids_from_mask,
    reward_model_scores,
)
from tether.rewards import FunctionReward, ModelReward
from tether.rollout import collect_rollout
from tether.sampling import GenerationSettings, filter_logits, response_logprobs, sample_responses
from tether.tiny import build_tiny_causal_lm, build_tiny_reward_model, train_tokenizer, builtin_corpus


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def policy(request, tiny_tokenizer):
    model = build_tiny_causal_lm(request.param, tiny_tokenizer, seed=0, hidden=32, layers=2, heads=2)
    disable_dropout(model)
    return model.eval()


def left_padded(tokenizer, texts):
    from tether.data import left_pad

    return left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


def settings(tokenizer, **kw):
    return GenerationSettings(max_new_tokens=kw.pop("max_new_tokens", 10), eos_ids=[tokenizer.eos_token_id],
                              pad_id=tokenizer.pad_token_id, **kw)


def test_left_padding_does_not_change_logprobs(policy, tiny_tokenizer):
    """Position ids must skip left padding (N-details item 2): a padded row scores like the bare row."""
    ids, mask = left_padded(tiny_tokenizer, ["the cat is good today.", "a dog"])
    short = torch.tensor([tiny_tokenizer("a dog")["input_ids"]])
    response = torch.tensor([[5, 9, 12]])
    padded_full = torch.cat([ids, response.expand(2, -1)], 1)
    padded_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    bare_full = torch.cat([short, response], 1)
    padded_lp, _ = response_logprobs(policy, padded_full, padded_mask, 3, temperature=0.7)
    bare_lp, _ = response_logprobs(policy, bare_full, torch.ones_like(bare_full), 3, temperature=0.7)
    assert torch.allclose(padded_lp[1], bare_lp[0], atol=1e-5)
    real = int(padded_mask[1].sum())
    assert position_ids_from_mask(padded_mask)[1].tolist() == [0] * (padded_mask.shape[1] - real) + list(range(real))


def test_sampling_with_cache_cuts_at_eos_and_right_pads(policy, tiny_tokenizer):
    torch.manual_seed(0)
    ids, mask = left_padded(tiny_tokenizer, ["the cat", "my friend was", "a"])
    s = settings(tiny_tokenizer, max_new_tokens=12)
    # Make EOS likely so some rows end early and others do not.
    with torch.no_grad():
        policy.get_output_embeddings().weight[tiny_tokenizer.eos_token_id] *= 0
        policy.get_output_embeddings().weight[tiny_tokenizer.eos_token_id] += 0.3
    responses, response_mask, ended = sample_responses(policy, ids, mask, s)
    for row, m, e in zip(responses, response_mask, ended):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # real tokens form a prefix
        assert (row[n:] == tiny_tokenizer.pad_token_id).all()  # right-padded
        eos_at = (row == tiny_tokenizer.eos_token_id).nonzero().flatten().tolist()
        if e:
            assert eos_at == [n - 1]  # the EOS is the last real token, nothing after it
        else:
            assert n == s.max_new_tokens and not eos_at
    assert (responses != tiny_tokenizer.pad_token_id)[response_mask].all()  # pad is never sampled


def test_min_new_tokens_holds_eos_back(tiny_tokenizer):
    """EOS is never sampled before min_new_tokens; = max_new_tokens gives every row exactly that length."""
    model = build_tiny_causal_lm("gpt2", tiny_tokenizer, seed=0, hidden=32, layers=2, heads=2).eval()
    with torch.no_grad():  # EOS almost certain at every step when allowed: the final hidden state points at it
        model.transformer.ln_f.bias[0] = 10.0
        model.get_output_embeddings().weight[tiny_tokenizer.eos_token_id, 0] = 10.0
    ids, mask = left_padded(tiny_tokenizer, ["the cat", "my friend was", "a"])
    torch.manual_seed(0)
    _, free_mask, free_ended = sample_responses(model, ids, mask, settings(tiny_tokenizer, max_new_tokens=8))
    assert free_ended.all() and free_mask.sum(1).max() == 1  # without the setting rows end at once
    torch.manual_seed(0)
    responses, response_mask, ended = sample_responses(
        model, ids, mask, settings(tiny_tokenizer, max_new_tokens=8, min_new_tokens=3))
    lengths = response_mask.sum(1)
    assert (lengths >= 4).all() and ended.all()  # 3 tokens, then the EOS
    assert not (responses[:, :3] == tiny_tokenizer.eos_token_id).any()
    torch.manual_seed(0)
    responses, response_mask, ended = sample_responses(
        model, ids, mask, settings(tiny_tokenizer, max_new_tokens=8, min_new_tokens=8))
    assert response_mask.all() and not ended.any()
    assert not (responses == tiny_tokenizer.eos_token_id).any()


def test_cached_sampling_matches_a_full_forward(policy, tiny_tokenizer):
    """The KV-cache path gives the same next-token distribution as recomputing from scratch."""
    torch.manual_seed(1)
    ids, mask = left_padded(tiny_tokenizer, ["the cat is", "our"])
    s = settings(tiny_tokenizer, max_new_tokens=6, temperature=0.8)
    responses, response_mask, _ = sample_responses(policy, ids, mask, s)
    full = torch.cat([ids, responses], 1)
    full_mask = torch.cat([mask, response_mask.long()], 1)
    lp, _ = response_logprobs(policy, full, full_mask, responses.shape[1], 0.8, tiny_tokenizer.pad_token_id)
    assert torch.isfinite(lp[response_mask]).all()
    assert (lp[response_mask] < 0).all()
    # Recompute step by step without cache for row 0 and compare the log-prob of every sampled token.
    for t in range(int(response_mask[0].sum())):
        prefix = full[:1, : ids.shape[1] + t]
        prefix_mask = full_mask[:1, : ids.shape[1] + t]
        logits = policy(input_ids=prefix, attention_mask=prefix_mask,
                        position_ids=position_ids_from_mask(prefix_mask)).logits[0, -1] / 0.8
        logits[tiny_tokenizer.pad_token_id] = -1e4
        expected = logits.log_softmax(-1)[responses[0, t]]
        assert lp[0, t].item() == pytest.approx(expected.item(), abs=1e-4)


def test_temperature_scales_logprobs(policy, tiny_tokenizer):
    ids, mask = left_padded(tiny_tokenizer, ["the cat is good"])
    lp1, _ = response_logprobs(policy, ids, mask, 3, temperature=1.0)
    lp05, _ = response_logprobs(policy, ids, mask, 3, temperature=0.5)
    assert not torch.allclose(lp1, lp05)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert (~torch.isinf(filter_logits(logits, top_p=0.5))).tolist() == [[True, False, False, False]]


def test_stop_strings_end_a_response(tiny_tokenizer):
    model = build_tiny_causal_lm("gpt2", tiny_tokenizer, seed=3, hidden=32, layers=1, heads=2).eval()
    ids, mask = left_padded(tiny_tokenizer, ["the cat"])
    torch.manual_seed(0)
    free, free_mask, _ = sample_responses(model, ids, mask, settings(tiny_tokenizer, max_new_tokens=20))
    free_text = tiny_tokenizer.decode(free[0][free_mask[0]], skip_special_tokens=True)
    stop = free_text[4:6]  # a string the same sampling run is known to produce
    torch.manual_seed(0)
    s = settings(tiny_tokenizer, max_new_tokens=20, stop_strings=[stop])
    responses, response_mask, ended = sample_responses(model, ids, mask, s, tiny_tokenizer)
    text = tiny_tokenizer.decode(responses[0][response_mask[0]], skip_special_tokens=True)
    assert ended.all()
    assert stop in text and free_text.startswith(text)
    assert stop not in tiny_tokenizer.decode(responses[0][response_mask[0]][:-1], skip_special_tokens=True)
    assert int(response_mask[0].sum()) < int(free_mask[0].sum())


def test_pad_token_is_added_when_missing_and_not_eos():
    tok = train_tokenizer(builtin_corpus(50), vocab_size=128)
    tok.pad_token = tok.eos_token  # a common setup: pad = EOS
    assert ensure_pad_token(tok) is True
    assert tok.pad_token_id != tok.eos_token_id
    assert ensure_pad_token(tok) is False


def test_eos_ids_include_generation_config(tiny_tokenizer):
    model = build_tiny_causal_lm("gpt2", tiny_tokenizer, seed=0, hidden=32, layers=1, heads=2)
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, 7]
    assert eos_token_ids(tiny_tokenizer, model) == sorted({tiny_tokenizer.eos_token_id, 7})


def test_reward_model_reads_the_last_real_token(tiny_tokenizer):
    rm = build_tiny_reward_model("gpt2", tiny_tokenizer, seed=0, hidden=32, layers=1, heads=2).eval()
    ids = torch.tensor([tiny_tokenizer("the cat is good")["input_ids"]])
    alone = reward_model_scores(rm, ids, torch.ones_like(ids))
    pad = tiny_tokenizer.pad_token_id
    # the same text left-padded, right-padded, and with garbage where the mask is 0
    left = torch.cat([torch.full((1, 3), pad), ids], 1)
    right = torch.cat([ids, torch.full((1, 4), 17)], 1)
    left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    right_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], 1)
    assert reward_model_scores(rm, left, left_mask).item() == pytest.approx(alone.item(), abs=1e-5)
    assert reward_model_scores(rm, right, right_mask).item() == pytest.approx(alone.item(), abs=1e-5)


def test_reward_model_with_its_own_tokenizer_reencodes_text(tiny_tokenizer):
    """A reward model need not share the policy's vocabulary: text is decoded and re-encoded."""
    other = train_tokenizer(["completely different words here"] * 20 + builtin_corpus(100, seed=9), vocab_size=200)
    rm = build_tiny_reward_model("gpt2", other, seed=0, hidden=32, layers=1, heads=2).eval()
    reward = ModelReward(rm, other)
    prompts, responses = ["the cat", "a dog"], [" is good.", " was bad today."]
    policy_ids = torch.zeros(2, 3, dtype=torch.long)  # ignored: the text is what counts
    scores = reward.score(prompts, responses, policy_ids, torch.ones_like(policy_ids))
    expected = [reward_model_scores(rm, torch.tensor([other(p + r)["input_ids"]]),
                                    torch.ones(1, len(other(p + r)["input_ids"]), dtype=torch.long)).item()
                for p, r in zip(prompts, responses)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_model_scores_cut_responses_as_eos_terminated_text(tiny_tokenizer):
    """`tether reward` trains on texts ending in EOS; a response cut at max_new_tokens is scored that way."""
    rm = build_tiny_reward_model("gpt2", tiny_tokenizer, seed=0, hidden=32, layers=1, heads=2).eval()
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    cut = tiny_tokenizer("the cat is good")["input_ids"]
    ended = tiny_tokenizer("a dog")["input_ids"] + [eos]
    ids = torch.tensor([cut, ended + [pad] * (len(cut) - len(ended))])
    mask = torch.tensor([[1] * len(cut), [1] * len(ended) + [0] * (len(cut) - len(ended))])

    def alone(seq):
        return reward_model_scores(rm, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).item()

    shared = ModelReward(rm, eos=([eos], eos, pad)).score(["", ""], ["", ""], ids, mask)
    assert shared.tolist() == pytest.approx([alone(cut + [eos]), alone(ended)], abs=1e-5)
    as_is = ModelReward(rm).score(["", ""], ["", ""], ids, mask)
    assert as_is[0].item() == pytest.approx(alone(cut), abs=1e-5)
    assert abs(as_is[0].item() - shared[0].item()) > 1e-4  # the EOS changes what the head reads
    own = ModelReward(rm, tiny_tokenizer, eos=([eos], eos, pad)).score(["the cat"], [" is good"], ids[:1], mask[:1])
    assert own.item() == pytest.approx(alone(tiny_tokenizer("the cat is good")["input_ids"] + [eos]), abs=1e-5)


def test_collect_rollout_chunks_join_like_one_batch(tiny_tokenizer):
    policy = build_tiny_causal_lm("llama", tiny_tokenizer, seed=0, hidden=32, layers=1, heads=2).eval()
    reference = frozen_copy(policy)
    critic = ValueModel(build_tiny_causal_lm("llama", tiny_tokenizer, seed=1, hidden=32, layers=1, heads=2).model)
    reward = FunctionReward(lambda rs: [float(len(r)) for r in rs])
    ids, mask = left_padded(tiny_tokenizer, ["the cat is good today", "a", "my friend", "our team was"])
    torch.manual_seed(0)
    rollout = collect_rollout(SeparateRoles(policy, reference, critic, reward), tiny_tokenizer, ids, mask,
                              settings(tiny_tokenizer, max_new_tokens=6), chunk_size=2)
    assert rollout.input_ids.shape[0] == 4
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length:].bool(), rollout.response_mask)
    # policy == reference at the start, so the per-token KL is exactly zero
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    # recomputing log-probs on the joined batch gives the chunked values (padding changed nothing)
    lp, _ = response_logprobs(policy, rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1],
                              1.0, tiny_tokenizer.pad_token_id)
    assert torch.allclose(lp * rollout.response_mask, rollout.logprobs, atol=1e-5)
    assert rollout.scores.tolist() == [float(len(r)) for r in rollout.responses]


def test_a_reward_fn_file_may_define_dataclasses_and_never_shadows_an_installed_module(tmp_path):
    """'path/to/file.py:function' runs the file as a module registered under a name of its own."""
    import json as installed_json
    import sys

    from tether.rewards import load_reward_fn

    # String annotations make dataclasses look the defining module up in sys.modules.
    source = ("from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\n"
              "class Weights:\n    per_char: float = 0.5\n\n"
              "def score(responses):\n    return [Weights().per_char * len(r) for r in responses]\n")
    for name in ("scoring_rules", "json"):  # a fresh name, and the name of an installed module
        (tmp_path / f"{name}.py").write_text(source)
        reward = load_reward_fn(f"{tmp_path / name}.py:score")
        assert reward.score(["p", "q"], ["ab", "abcd"], None, None).tolist() == [1.0, 2.0]
    assert sys.modules["json"] is installed_json


def test_the_truncation_gap_is_minus_the_log_of_the_policy_mass_the_sampler_keeps():
    from tether.sampling import sample_next_token

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # pad id 4: never sampled, nor part of π
    gaps = []
    spec = GenerationSettings(max_new_tokens=1, eos_ids=[3], pad_id=4, top_k=2)
    sample_next_token(logits.clone(), spec, gaps=gaps)
    policy = logits[0, :4].softmax(-1)
    assert gaps[0].item() == pytest.approx(-torch.log(policy[:2].sum()).item(), abs=1e-6)
    gaps = []  # EOS (id 3) held back before min_new_tokens: q keeps everything else
    sample_next_token(logits.clone(), GenerationSettings(max_new_tokens=1, eos_ids=[3], pad_id=4), allow_eos=False,
                      gaps=gaps)
    assert gaps[0].item() == pytest.approx(-torch.log(1 - policy[3]).item(), abs=1e-6)
    gaps = []  # nothing truncated: exactly 0
    sample_next_token(logits.clone(), GenerationSettings(max_new_tokens=1, eos_ids=[3], pad_id=4), gaps=gaps)
    assert gaps[0].item() == 0.0


def test_ppo_with_top_k_scores_the_full_distribution_and_logs_the_gap(tiny_dirs, tmp_path, caplog):
    """The old log-probs come from tether's own forward under the policy's full distribution: the
    first minibatch sees ratio 1 and approx-KL 0 with top_k / top_p on; the gap is logged."""
    import json

    from conftest import base_overrides
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    runs = {}
    for name, extra in (("truncated", dict(top_k=5, top_p=0.9)), ("full", {})):
        cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path / name, total_updates=1, **extra))
        build_ppo_trainer(cfg).train()
        runs[name] = json.loads((tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    truncated, full = runs["truncated"], runs["full"]
    assert truncated["policy/first_minibatch_approx_kl"] == 0.0 and truncated["policy/first_minibatch_ratio_mean"] == 1.0
    assert truncated["generation/truncation_gap"] > 0.1  # a tiny random model is far from peaked
    assert "generation/truncation_gap" not in full
    warned = [r.getMessage() for r in caplog.records if "truncated distribution" in r.getMessage()]
    assert warned[0].startswith("top_k=5 top_p=0.9: responses are sampled from a truncated distribution"), warned
    assert any("truncated_sampling (warning)" in m for m in warned[1:]), warned  # the doctor, at the update
