"""The critic-free estimators as options of the one PPO trainer: no critic anywhere, the grouped
batch, each estimator learning the tiny end-to-end reward, dynamic sampling and overlong shaping."""

from __future__ import annotations

import json

import pytest

from conftest import REWARDS, base_overrides
from tether.config import ConfigError, PPOConfig, config_from_dict
from tether.metrics import ALWAYS_LOGGED, CRITIC_METRICS
from tether.pipelines.ppo import build_ppo_trainer, run_ppo

# Each estimator with the loss and KL handling it is usually run with (GRPO: KL k3 in the loss, a
# mean per response; Dr. GRPO: the constant normaliser; the others: token mean, KL in the reward).
ESTIMATORS = {
    "grpo": dict(kl_placement="loss", kl_estimator="k3", loss_aggregation="seq_mean_token_mean"),
    "dr_grpo": dict(loss_aggregation="seq_mean_token_sum_norm"),
    "rloo": dict(),
    "reinforce_pp": dict(),
    "reinforce_pp_baseline": dict(loss_aggregation="seq_mean_token_sum"),
}


def config(tiny_dirs, tmp_path, **extra) -> PPOConfig:
    return config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, **extra))


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_raises_the_score_within_30_updates(tiny_dirs, tmp_path, estimator):
    # 8 prompts x 4 samples: the 32 responses per update of the GAE end-to-end test (tests/test_ppo.py)
    cfg = config(tiny_dirs, tmp_path, advantage_estimator=estimator, samples_per_prompt=4, total_updates=30,
                 batch_size=8, num_minibatches=2, ppo_epochs=4, max_new_tokens=16, learning_rate=3e-3,
                 kl_coef=0.01, **ESTIMATORS[estimator])
    run_ppo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["reward/score"] for r in rows[:5]) / 5
    late = sum(r["reward/score"] for r in rows[-5:]) / 5
    assert late > early + 0.05 and late > 2 * early, (early, late)
    assert not (tmp_path / "run" / "final" / "critic").exists()  # no critic was trained or saved
    assert all(r["batch/prompts"] == 8 and r["batch/responses"] == 32 for r in rows)


@pytest.mark.parametrize("placement", ["separate", "shared_base"])
def test_a_critic_free_run_builds_no_critic_and_logs_no_value_metrics(tiny_dirs, tmp_path, placement):
    lora = dict(lora_rank=4, lora_alpha=8.0) if placement == "shared_base" else {}
    trainer = build_ppo_trainer(config(tiny_dirs, tmp_path, advantage_estimator="rloo", samples_per_prompt=2,
                                       placement=placement, **lora))
    assert trainer.roles.trainable("critic") == [] and trainer.critic_optimizer is None
    if placement == "separate":
        assert trainer.roles.critic is None
    else:
        assert trainer.roles.value_head is None and "critic" not in trainer.roles.adapters
    metrics = trainer.step()
    assert set(metrics) == (ALWAYS_LOGGED - CRITIC_METRICS)
    rollout_rows = len(trainer.prompts)  # sanity: the batch is prompts x samples, in groups
    assert metrics["batch/responses"] == 2 * metrics["batch/prompts"] == 16 and rollout_rows > 0
    path = trainer.save(tmp_path / "ckpt")
    assert not (path / "critic").exists()
    again = build_ppo_trainer(config(tiny_dirs, tmp_path / "again", advantage_estimator="rloo", samples_per_prompt=2,
                                     placement=placement, **lora))
    again.load_state(path)  # a critic-free checkpoint resumes
    assert again.update == 1


def test_groups_stay_adjacent_and_whole(tiny_dirs, tmp_path):
    trainer = build_ppo_trainer(config(tiny_dirs, tmp_path, advantage_estimator="grpo", samples_per_prompt=4,
                                       kl_placement="loss", kl_estimator="k3"))
    rollout, _ = trainer.collect([0, 1])
    assert len(rollout) == 8
    assert rollout.prompts[:4] == [rollout.prompts[0]] * 4 and rollout.prompts[4:] == [rollout.prompts[4]] * 4
    assert rollout.prompts[0] != rollout.prompts[4] or trainer.prompts[0] == trainer.prompts[1]


def test_dynamic_sampling_drops_uniform_groups_and_refills(tiny_dirs, tmp_path):
    # A reward that is 1 for every response: every group is uniform, so each round drops them all,
    # the refill rounds run out, and the batch is filled with dropped groups (counted).
    trainer = build_ppo_trainer(config(tiny_dirs, tmp_path, advantage_estimator="grpo", samples_per_prompt=2,
                                       kl_placement="loss", kl_estimator="k3", dynamic_sampling=True,
                                       dynamic_sampling_max_rounds=2, reward_fn=f"{REWARDS}:constant_reward"))
    metrics = trainer.step()
    assert metrics["sampling/extra_rounds"] == 2
    assert metrics["sampling/uniform_groups"] == 8 * 3  # 8 prompts a round, 3 rounds
    assert metrics["sampling/kept_uniform_groups"] == 8
    assert metrics["batch/responses"] == 16


def test_dynamic_sampling_keeps_informative_groups_without_extra_rounds(tiny_dirs, tmp_path):
    trainer = build_ppo_trainer(config(tiny_dirs, tmp_path, advantage_estimator="dr_grpo", samples_per_prompt=4,
                                       dynamic_sampling=True, reward_fn=f"{REWARDS}:text_length", max_new_tokens=8))
    rollout, sampling = trainer.collect(list(range(8)))
    groups = rollout.scores.view(-1, 4)
    kept_uniform = int(((groups.max(1).values - groups.min(1).values) == 0).sum())
    assert kept_uniform == sampling["sampling/kept_uniform_groups"]
    assert len(rollout) == 32


def test_overlong_shaping_penalises_responses_near_the_limit(tiny_dirs, tmp_path):
    trainer = build_ppo_trainer(config(tiny_dirs, tmp_path, overlong_buffer=4, overlong_penalty=0.5,
                                       min_new_tokens=8, max_new_tokens=8))
    metrics = trainer.step()  # every response is 8 tokens, at the limit: the full penalty
    assert metrics["reward/overlong_penalty"] == pytest.approx(-0.5)


@pytest.mark.parametrize("values,match", [
    (dict(advantage_estimator="grpo"), "samples_per_prompt >= 2"),
    (dict(advantage_estimator="reinforce_pp", kl_placement="loss", kl_estimator="k3"), "kl_placement=reward"),
    (dict(advantage_estimator="rloo", samples_per_prompt=2, critic_warmup_updates=1, total_updates=3),
     "critic_warmup_updates"),
    (dict(kl_placement="loss", kl_estimator="k1"), "k2"),
    (dict(dynamic_sampling=True), "samples_per_prompt >= 2"),
    (dict(overlong_buffer=20, max_new_tokens=8), "overlong_buffer"),
])
def test_combinations_that_cannot_work_are_refused(tiny_dirs, tmp_path, values, match):
    with pytest.raises(ConfigError, match=match):
        config(tiny_dirs, tmp_path, **values).validate()


def test_k1_in_the_loss_runs_only_when_insisted_on_with_a_warning(tiny_dirs, tmp_path, caplog):
    cfg = config(tiny_dirs, tmp_path, kl_placement="loss", kl_estimator="k1", allow_k1_kl_loss=True)
    cfg.validate()
    assert "zero in expectation" in caplog.text


def test_samples_show_one_response_per_prompt_group(tiny_dirs, tmp_path):
    distinct = tmp_path / "distinct.jsonl"
    distinct.write_text("".join(json.dumps({"prompt": f"the {w}"}) + "\n" for w in
                                ("cat", "dog", "sun", "sea", "car", "day", "man", "boy")))
    trainer = build_ppo_trainer(config(tiny_dirs, tmp_path, advantage_estimator="rloo", samples_per_prompt=4,
                                       num_samples=2, sample_every=1, prompts=str(distinct)))
    trainer.step()
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["prompt"] != rows[1]["prompt"]  # not two samples of one prompt
