"""PPO trainer: invariants of one update, and tiny end-to-end runs where the reward must rise."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REWARDS, base_overrides
from tether.config import PPOConfig, config_from_dict
from tether.metrics import ALWAYS_LOGGED, PPO_METRIC_NAMES
from tether.pipelines.ppo import build_ppo_trainer, run_ppo
from tether.rewards import RewardError


def make_trainer(tiny_dirs, tmp_path, **extra):
    return build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, **extra)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_first_minibatch_has_ratio_one_and_no_kl(tiny_dirs, tmp_path, arch):
    # N-details item 15: rollout and training log-probs must agree exactly.
    trainer = make_trainer(tiny_dirs, tmp_path, arch=arch, num_minibatches=2, gradient_accumulation_steps=2)
    for _ in range(2):
        trainer.step()
        first = trainer.first_minibatch_stats
        assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert first["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert first["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9)
        assert first["policy/clipfrac"] == 0.0


@pytest.mark.parametrize("epochs,minibatches,accumulation", [(1, 1, 1), (2, 2, 1), (3, 2, 2), (2, 4, 2)])
def test_optimizer_steps_per_update(tiny_dirs, tmp_path, epochs, minibatches, accumulation):
    trainer = make_trainer(tiny_dirs, tmp_path, ppo_epochs=epochs, num_minibatches=minibatches,
                           gradient_accumulation_steps=accumulation)
    metrics = trainer.step()
    # AdamW counts its own steps per parameter: the number of optimizer steps actually taken.
    for optimizer in (trainer.policy_optimizer, trainer.critic_optimizer):
        steps = {int(state["step"]) for state in optimizer.state.values()}
        assert steps == {epochs * minibatches}
    assert metrics["ppo/optimizer_steps"] == epochs * minibatches


def test_accumulation_does_not_change_the_update(tiny_dirs, tmp_path):
    """batch 8 x accumulation 1 gives the same update as batch 1 x accumulation 8."""
    one = make_trainer(tiny_dirs, tmp_path / "a", num_minibatches=1, gradient_accumulation_steps=1)
    eight = make_trainer(tiny_dirs, tmp_path / "b", num_minibatches=1, gradient_accumulation_steps=8)
    assert one.cfg.micro_batch_size == 8 and eight.cfg.micro_batch_size == 1
    torch.manual_seed(0)
    rollout = one.rollout(list(range(8)))
    _, scores = one.process_scores(rollout)
    from tether.algo import shape_rewards

    rewards, _, _ = shape_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, 0.05)
    batch = one.make_batch(rollout, rewards)
    stats_one = one.optimise(batch)
    stats_eight = eight.optimise(batch)
    for (name, p1), (_, p8) in zip(one.roles.policy.named_parameters(), eight.roles.policy.named_parameters()):
        assert torch.allclose(p1, p8, atol=1e-6, rtol=1e-5), name
    for (name, c1), (_, c8) in zip(one.roles.critic.named_parameters(), eight.roles.critic.named_parameters()):
        assert torch.allclose(c1, c8, atol=1e-6, rtol=1e-5), name
    assert stats_one["policy/loss"] == pytest.approx(stats_eight["policy/loss"], abs=1e-5)
    # the update really moved the weights (the comparison above is not between two no-ops)
    reference = dict(one.roles.reference.named_parameters())
    assert any(not torch.equal(p, reference[n]) for n, p in one.roles.policy.named_parameters())


def test_critic_warmup_trains_only_the_critic_then_the_policy(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path, critic_warmup_updates=2, total_updates=4, ptx_data=str(tiny_dirs["prompts"]),
                           ptx_field="prompt", ptx_block_size=8)
    policy_start = {n: p.detach().clone() for n, p in trainer.roles.policy.named_parameters()}
    critic_start = {n: p.detach().clone() for n, p in trainer.roles.critic.named_parameters()}
    for _ in range(2):
        metrics = trainer.step()
        assert metrics["policy/grad_norm"] == 0.0 and metrics["ptx/loss"] == 0.0
        assert metrics["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)  # the policy never moved
    assert all(torch.equal(p, policy_start[n]) for n, p in trainer.roles.policy.named_parameters())
    assert any(not torch.equal(p, critic_start[n]) for n, p in trainer.roles.critic.named_parameters())
    assert trainer.policy_scheduler.last_epoch == 0  # its schedule starts when it starts training
    metrics = trainer.step()
    assert metrics["policy/grad_norm"] > 0 and metrics["ptx/loss"] > 0
    assert any(not torch.equal(p, policy_start[n]) for n, p in trainer.roles.policy.named_parameters())
    trainer.step()
    assert trainer.policy_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ends with the run


def test_critic_warmup_must_leave_updates_for_the_policy(tiny_dirs, tmp_path):
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="critic_warmup_updates"):
        make_trainer(tiny_dirs, tmp_path, critic_warmup_updates=2, total_updates=2)


def run_rows(tiny_dirs, tmp_path, **extra):
    cfg = config_from_dict(PPOConfig, base_overrides(
        tiny_dirs, tmp_path, **{**dict(total_updates=30, batch_size=32, num_minibatches=2, ppo_epochs=4,
                                       max_new_tokens=16, learning_rate=3e-3), **extra}))
    run_ppo(cfg)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def mean_of(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.fixture(scope="module")
def weak_kl_rows(tiny_dirs, tmp_path_factory):
    return run_rows(tiny_dirs, tmp_path_factory.mktemp("weak"), kl_coef=0.01)


def test_score_rises_on_a_learnable_reward(weak_kl_rows):
    rows = weak_kl_rows
    assert len(rows) == 30
    early, late = mean_of(rows[:5], "reward/score"), mean_of(rows[-5:], "reward/score")
    assert late > early + 0.05, (early, late)
    assert late > 3 * early


def test_large_kl_coefficient_keeps_policy_at_reference(weak_kl_rows, tiny_dirs, tmp_path):
    rows = run_rows(tiny_dirs, tmp_path, kl_coef=50.0)
    weak_kl, strong_kl = mean_of(weak_kl_rows[-5:], "kl/mean"), mean_of(rows[-5:], "kl/mean")
    assert weak_kl > 2.0  # without the brake the policy drifts far from the reference
    assert strong_kl < 0.5 and strong_kl < 0.1 * weak_kl, (weak_kl, strong_kl)
    assert mean_of(rows[-5:], "reward/score") < mean_of(weak_kl_rows[-5:], "reward/score")


def test_every_documented_metric_is_logged_and_only_those(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path)
    metrics = trainer.step()
    assert set(metrics) == set(ALWAYS_LOGGED)
    assert all(isinstance(v, float) for v in metrics.values())


def test_gold_scorer_and_held_out_evaluation(tiny_dirs, tmp_path):
    """The gold scorer sees the same samples as the proxy; eval runs at update 0, every eval_every and the end."""
    run = make_trainer(tiny_dirs, tmp_path, gold_reward_fn=f"{REWARDS}:text_length", eval_prompts=str(tiny_dirs["prompts"]),
                       eval_every=2, eval_max_prompts=6, total_updates=3, num_samples=2)
    run.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"update", "eval/score", "eval/gold", "eval/kl", "eval/length", "eval/distinct_2"}
    assert set(rows[1]) == set(ALWAYS_LOGGED) | {"update", "gold/score", "gold/score_std"}
    assert rows[1]["gold/score_std"] >= 0.0
    # The options this run leaves off: vLLM generation, overlong shaping, dynamic sampling, several rewards.
    other_options = {n for n in PPO_METRIC_NAMES if n.startswith(("generation/", "sampling/"))}
    left_off = {"reward/overlong_penalty", "reward/<name>"}
    assert set(rows[2]) == set(PPO_METRIC_NAMES) - other_options - left_off | {"update"}
    assert rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    evals = [s for s in samples if s["split"] == "eval"]
    assert sorted({s["update"] for s in evals}) == [0, 2, 3]
    first = [s["prompt"] for s in evals if s["update"] == 0]
    assert len(first) == 6 and first == [s["prompt"] for s in evals if s["update"] == 3]
    for s in samples:  # gold is the gold function of the very response shown
        assert s["gold"] == pytest.approx(len(s["response"]) / 10)


def test_evaluation_never_changes_what_training_samples(tiny_dirs, tmp_path):
    """Evaluation draws from its own stream, the same at every evaluation: training metrics do not
    depend on eval_every, and the untrained policy's responses at two evaluations are identical."""
    def train(eval_every, out):
        trainer = make_trainer(tiny_dirs, out, eval_prompts=str(tiny_dirs["prompts"]), eval_every=eval_every,
                               eval_max_prompts=6, total_updates=3)
        trainer.train()
        return trainer, [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]

    often, often_rows = train(1, tmp_path / "often")
    _, rare_rows = train(100, tmp_path / "rare")
    training = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("eval/", "time/"))}
                             for r in rows if "kl/mean" in r]
    assert len([r for r in often_rows if "eval/kl" in r]) == 4 and len([r for r in rare_rows if "eval/kl" in r]) == 2
    assert training(often_rows) == training(rare_rows)
    assert often.evaluate() == often.evaluate()


def test_ptx_loss_is_added_and_falls(tiny_dirs, tmp_path):
    text = tmp_path / "ptx.txt"
    text.write_text("\n\n".join(["the cat is good today."] * 200))
    trainer = make_trainer(tiny_dirs, tmp_path, ptx_data=str(text), ptx_coef=5.0, ptx_block_size=16,
                           ptx_batch_size=4, total_updates=6, learning_rate=3e-3)
    losses = [trainer.step()["ptx/loss"] for _ in range(6)]
    assert losses[0] > 0
    assert losses[-1] < 0.8 * losses[0], losses


def test_kl_early_stop_cuts_the_update(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path, ppo_epochs=4, num_minibatches=2, target_kl_stop=1e-12,
                           learning_rate=1e-2, reward_fn=f"{REWARDS}:text_length")
    metrics = trainer.step()
    assert metrics["ppo/early_stopped"] == 1.0
    assert metrics["ppo/optimizer_steps"] < 8


def test_adaptive_kl_moves_the_coefficient(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path, adaptive_kl=True, kl_target=0.05, kl_horizon=100,
                           learning_rate=1e-2, reward_fn=f"{REWARDS}:text_length", total_updates=5)
    rows = [trainer.step() for _ in range(5)]
    assert rows[0]["kl/coef"] == pytest.approx(0.05)
    # Ziegler et al. 2019: beta moves toward the target by at most 20% x n_steps / horizon per update
    for before, after in zip(rows, rows[1:]):
        error = max(-0.2, min(0.2, before["kl/mean"] / 0.05 - 1))
        assert after["kl/coef"] == pytest.approx(before["kl/coef"] * (1 + error * 8 / 100), rel=1e-5)
    assert any(r["kl/mean"] > 0.05 for r in rows) and rows[-1]["kl/coef"] != rows[0]["kl/coef"]


def test_run_directory_and_checkpoint_load_with_plain_transformers(tiny_dirs, tmp_path):
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, total_updates=2, save_every=1,
                                                     sample_every=1, num_samples=3))
    run_ppo(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["update"] for s in samples] == [1, 1, 1, 2, 2, 2]
    assert set(samples[0]) >= {"prompt", "response", "score"}
    for name in ("checkpoint-1", "final"):
        model = AutoModelForCausalLM.from_pretrained(run / name)
        assert model.config.vocab_size >= 256
        assert (run / name / "critic" / "value_head.safetensors").is_file()
        assert (run / name / "tokenizer.json").is_file()
    assert not list(run.glob("*.tmp"))


def test_reward_model_and_critic_from_it(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path, reward_fn=None, reward_model=str(tiny_dirs["reward"]))
    from tether.placement import load_reward_model

    rm = load_reward_model(str(tiny_dirs["reward"]))
    assert torch.equal(trainer.roles.critic.value_head.weight.data, rm.score.weight.data)
    metrics = trainer.step()
    assert metrics["reward/score_std"] > 0
    eos = trainer.tokenizer.eos_token_id
    assert trainer.roles.reward.eos is not None and trainer.roles.reward.eos[1] == eos and eos in trainer.roles.reward.eos[0]
    as_is = make_trainer(tiny_dirs, tmp_path / "b", reward_fn=None, reward_model=str(tiny_dirs["reward"]),
                         reward_append_eos=False)
    assert as_is.roles.reward.eos is None


def test_a_reward_function_that_raises_names_the_response_and_keeps_earlier_checkpoints(tiny_dirs, tmp_path):
    module = tmp_path / "bad_reward.py"
    module.write_text("calls, bad = [], []\n"
                      "def reward(responses):\n"
                      "    calls.append(1)\n"
                      "    if len(calls) == 2:\n"
                      "        bad.append(responses[2])\n"
                      "    if bad and bad[0] in responses:\n"
                      "        raise ValueError('cannot score this one')\n"
                      "    return [0.5 for _ in responses]\n")
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, reward_fn=f"{module}:reward",
                                                     total_updates=3, save_every=1))
    with pytest.raises(RewardError, match=r"raised ValueError: cannot score this one on response \d+ '"):
        run_ppo(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoint-1" / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_reward_function_with_wrong_count_names_the_function(tiny_dirs, tmp_path):
    module = tmp_path / "short_reward.py"
    module.write_text("def reward(responses):\n    return [1.0]\n")
    trainer = make_trainer(tiny_dirs, tmp_path, reward_fn=f"{module}:reward")
    with pytest.raises(RewardError, match=r"returned 1 scores for 8 responses"):
        trainer.step()


def test_reusing_the_scoring_forward_gives_the_same_update_with_fewer_forwards(tiny_dirs, tmp_path):
    """The first optimizer step reuses the rollout's policy and critic forwards (same weights, same
    inputs): the update is the one of recomputing them, with one critic forward fewer per update."""
    trainers, calls = {}, {}
    for reuse in (True, False):
        trainer = make_trainer(tiny_dirs, tmp_path / str(reuse), num_minibatches=1, ppo_epochs=2,
                               reuse_scoring_forward=reuse)
        calls[reuse] = []
        trainer.roles.critic.register_forward_pre_hook(lambda *_a, log=calls[reuse]: log.append(1))
        torch.manual_seed(0)
        for _ in range(2):
            metrics = trainer.step()
            assert trainer.first_minibatch_stats["policy/ratio_max"] == 1.0  # exactly: the same log-probs
        trainers[reuse] = (trainer, metrics)
    assert trainers[True][0].reuses_scoring_forward()
    assert len(calls[False]) == 2 * (1 + 2) and len(calls[True]) == 2 * (1 + 1)  # per update: score + epochs
    (reused, m_reused), (fresh, m_fresh) = trainers[True], trainers[False]
    for (name, a), (_, b) in zip(reused.roles.policy.named_parameters(), fresh.roles.policy.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(reused.roles.critic.named_parameters(), fresh.roles.critic.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("policy/loss", "value/loss", "kl/mean", "reward/score"):
        assert m_reused[key] == pytest.approx(m_fresh[key], rel=1e-4, abs=1e-6), key
