"""The training doctor: each rule on hand-made metric rows, the text-health measures it reads,
and four seeded, deliberately mis-configured tiny runs diagnosed live and again by `tether doctor`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REWARDS, base_overrides
from tether.cli import main as cli_main
from tether.config import ConfigError, PPOConfig, config_from_dict, load_config
from tether.doctor import (
    RULES,
    THRESHOLD_NAMES,
    Doctor,
    diagnose_run,
    finding_from_dict,
    render_markdown,
    thresholds_from,
)
from tether.pipelines.ppo import build_ppo_trainer
from tether.text_health import distinct_n, phrase_shares, repeated_ngram_rate, spreading_phrases
from tether.trainers.ppo import TrainingStopped, reference_perplexity

ROOT = Path(__file__).resolve().parents[1]

# --- the rules on hand-made rows -------------------------------------------------------------

HEALTHY = {
    "reward/score": 0.0, "reward/score_std": 1.0, "kl/mean": 0.5, "policy/approx_kl": 0.01, "policy/clipfrac": 0.05,
    "policy/ratio_mean": 1.0, "policy/ratio_max": 1.3, "policy/entropy": 2.0, "policy/grad_norm": 0.5,
    "policy/first_minibatch_approx_kl": 0.0, "policy/first_minibatch_ratio_mean": 1.0,
    "value/explained_variance": 0.3, "response/length": 10.0, "response/eos_rate": 0.9,
    "response/distinct_2": 0.9, "response/repeated_3gram_rate": 0.02, "response/ref_perplexity": 20.0,
}


def rows_of(*phases: tuple[int, dict]) -> list[dict]:
    """(count, changes from HEALTHY) phases as consecutive update rows from update 1."""
    rows = []
    for count, changes in phases:
        rows += [{"update": len(rows) + 1 + i, **HEALTHY, **changes} for i in range(count)]
    return rows


def said(rows: list[dict], config: dict | None = None) -> list[tuple[str, str, int]]:
    doctor = Doctor(config)
    return [(f.rule, f.severity, f.update) for row in rows for f in doctor.observe(row)]


def findings(rows: list[dict], config: dict | None = None):
    doctor = Doctor(config)
    for row in rows:
        doctor.observe(row)
    return doctor.findings


def test_healthy_rows_raise_nothing():
    assert said(rows_of((40, {}))) == []


def test_reward_hacking_is_named_once_then_again_when_it_turns_critical():
    rows = rows_of((3, {}), (10, {"reward/score": 3.0, "response/distinct_2": 0.3}))
    # 'now' (the last 3 updates) is all hacked from update 6; critical after 3 updates in a row.
    assert said(rows, {"kl_coef": 0.01, "clip_eps": 0.2}) == [("reward_hacking", "warning", 6),
                                                               ("reward_hacking", "critical", 8)]
    first = findings(rows, {"kl_coef": 0.01, "clip_eps": 0.2})[0]
    assert [a.key for a in first.advice][:2] == ["kl_coef", "clip_eps"]
    assert "raise kl_coef from 0.01 to 0.03-0.1" in first.message and "lower clip_eps from 0.2 to 0.1" in first.message
    assert "response/distinct_2 0.9 (updates 1-3) -> 0.3 (updates 4-6) [<= 0.6 x start]" in first.message


@pytest.mark.parametrize("degraded, metric", [
    ({"response/repeated_3gram_rate": 0.5}, "response/repeated_3gram_rate"),
    ({"response/ref_perplexity": 60.0}, "response/ref_perplexity"),  # gibberish
    ({"response/ref_perplexity": 8.0, "response/length": 15.0}, "response/length"),  # collapse, longer
])
def test_each_text_health_measure_can_show_reward_hacking(degraded, metric):
    found = findings(rows_of((3, {}), (3, {"reward/score": 3.0, **degraded})))
    assert [f.rule for f in found] == ["reward_hacking"]
    assert metric in [e.metric for e in found[0].evidence]


def test_a_rising_score_with_healthy_text_is_not_hacking():
    assert said(rows_of((3, {}), (20, {"reward/score": 3.0}))) == []
    # and a collapsing perplexity without longer responses is not the collapse of Secrets of RLHF
    assert said(rows_of((3, {}), (5, {"reward/score": 3.0, "response/ref_perplexity": 8.0}))) == []


def test_a_stalled_score_names_the_learning_rate_or_the_clip_range():
    stalled = findings(rows_of((20, {"policy/approx_kl": 1e-6})), {"learning_rate": 1e-9})
    assert [(f.rule, f.update) for f in stalled] == [("reward_flat", 15)]
    assert stalled[0].advice[0].key == "learning_rate" and "from 1.00e-09 by 10-100x" in stalled[0].message
    clipped = findings(rows_of((20, {"policy/clipfrac": 0.25})), {"clip_eps": 0.05})
    assert [(f.rule, f.advice[0].key, f.advice[0].change) for f in clipped] == [("reward_flat", "clip_eps", "raise")]
    # Normal steps and a flat score: the reward may have nothing left to give.
    assert said(rows_of((20, {}))) == []


def test_critic_warmup_is_not_a_stall():
    rows = rows_of((20, {"policy/approx_kl": 0.0}), (5, {}))
    assert said(rows, {"critic_warmup_updates": 20}) == []
    assert said(rows_of((35, {"policy/approx_kl": 0.0})), {"critic_warmup_updates": 20}) == [("reward_flat", "warning", 35)]


def test_a_score_that_rose_and_levelled_off_is_not_stalled():
    rows = rows_of((3, {}), (25, {"reward/score": 3.0, "policy/approx_kl": 1e-6}))
    assert "reward_flat" not in [rule for rule, _, _ in said(rows)]


def test_unstable_steps_warn_and_a_nat_per_token_is_critical():
    assert said(rows_of((2, {}), (1, {"policy/clipfrac": 0.5}), (1, {"policy/approx_kl": 1.5}))) == [
        ("unstable", "warning", 3), ("unstable", "critical", 4)]
    # one token's probability multiplied 40-fold while the mean ratio stays near 1 (a clip range that never clips)
    runaway = findings(rows_of((1, {"policy/ratio_max": 40.0})))
    assert [(f.rule, f.severity) for f in runaway] == [("unstable", "warning")]
    assert "policy/ratio_max 40 (update 1) [>= 10]" in runaway[0].message
    ratio = findings(rows_of((1, {"policy/ratio_mean": 1.4})), {"clip_eps": 10.0})[0]
    assert "lower clip_eps from 10 to 0.1-0.2" in ratio.message and ratio.advice[0].key == "learning_rate"


def test_gold_falling_while_the_proxy_rises_is_the_reward_model_being_exploited():
    gold = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, -0.5, -0.5, -0.5]
    rows = [{**row, "gold/score": g, "reward/score": float(i)} for i, (row, g) in enumerate(zip(rows_of((12, {})), gold))]
    assert [(r, s) for r, s, _ in said(rows)] == [("reward_model_exploited", "warning"),
                                                  ("reward_model_exploited", "critical")]


def test_a_gold_dip_within_its_sampling_noise_is_not_called_exploitation():
    # SmolLM2 GRPO, 4 prompts x 4 samples: the training gold score of 16 responses per update, spread ~0.4
    gold = [0.277, 0.204, 0.431, 0.396, 0.529, 0.399, 0.543, 0.141, 0.334]
    proxy = [0.318, 0.391, 0.376, 0.295, 1.047, -0.155, 0.325, 0.274, 0.627]
    rows = [{**row, "gold/score": g, "reward/score": p, "batch/responses": 16.0}
            for row, g, p in zip(rows_of((9, {})), gold, proxy)]
    # without the spread the rule cannot tell the dip from noise and names it (as it did before it was logged)
    assert [(r, u) for r, _, u in said(rows)] == [("reward_model_exploited", 9)]
    assert said([{**row, "gold/score_std": 0.4} for row in rows]) == []
    # the same fall with a tenth of the spread is beyond the noise, and the evidence says by how much
    precise = findings([{**row, "gold/score_std": 0.04} for row in rows])
    assert [(f.rule, f.update) for f in precise] == [("reward_model_exploited", 9)]
    assert "gave back >= 0.3 of its gain, 18.5 standard errors]" in precise[0].message
    # exploit_gold_noise_z sets how many standard errors the fall must reach
    assert said([{**row, "gold/score_std": 0.4} for row in rows], {"doctor": {"exploit_gold_noise_z": 1.0}}) != []


def test_evaluations_past_the_fitted_gold_peak_are_named():
    # R(d) = d(1 - log d): the peak is at d = 1 (KL 1 nat); the latest evaluation is at d = 2.
    doctor = Doctor()
    doctor.observe({"update": 0, "eval/kl": 0.0, "eval/gold": 0.0})
    found = []
    for update, d in zip((1, 2, 3, 4), (0.5, 1.0, 1.5, 2.0)):
        found += doctor.observe({"update": update, **HEALTHY})
        found += doctor.observe({"update": update, "eval/kl": d * d, "eval/gold": d * (1 - math.log(d))})
    assert [(f.rule, f.update) for f in found] == [("reward_model_exploited", 4)]
    assert "peak at KL 1 nats" in found[0].message and found[0].advice[0].key == "kl_target"


def test_a_first_minibatch_that_differs_from_the_rollout_is_a_setup_bug():
    found = findings(rows_of((1, {}), (1, {"policy/first_minibatch_approx_kl": 0.01})))
    assert [(f.rule, f.severity, f.update) for f in found] == [("logprob_mismatch", "critical", 2)]
    assert {a.key for a in found[0].advice} == {"dropout", "temperature", "policy"}


def test_sampling_far_from_the_scored_distribution_is_named_with_the_settings_to_change():
    found = findings(rows_of((2, {"generation/truncation_gap": 0.01}), (1, {"generation/truncation_gap": 0.4})))
    assert [(f.rule, f.severity, f.update) for f in found] == [("truncated_sampling", "warning", 3)]
    assert [a.key for a in found[0].advice] == ["top_k", "top_p", "min_new_tokens"]
    assert "generation/truncation_gap 0.4 (update 3)" in found[0].message, found[0].message


def test_bf16_rounding_in_the_first_minibatch_is_judged_against_the_bf16_tolerance():
    rounding = rows_of((1, {"policy/first_minibatch_approx_kl": 5e-4}))
    assert [f.rule for f in findings(rounding, {"precision": "fp32"})] == ["logprob_mismatch"]
    assert findings(rounding, {"precision": "bf16-mixed"}) == []
    bug = rows_of((1, {"policy/first_minibatch_approx_kl": 0.01}))
    assert [f.rule for f in findings(bug, {"precision": "bf16-mixed"})] == ["logprob_mismatch"]


def test_a_critic_that_adds_variance_is_named_and_one_that_predicts_the_mean_is_not():
    bad = findings(rows_of((10, {"value/explained_variance": -0.5})), {"learning_rate": 1e-9})
    assert [(f.rule, f.update) for f in bad] == [("critic_not_learning", 10)]
    assert "set critic_learning_rate to ~1e-5-1e-4 (it is 1.00e-09, learning_rate's)" in bad[0].message
    assert said(rows_of((30, {"value/explained_variance": 0.0}))) == []


def test_entropy_collapse_gradient_spikes_engine_gap_and_runaway_length():
    assert said(rows_of((3, {}), (3, {"policy/entropy": 0.1}))) == [("entropy_collapse", "warning", 6)]
    assert said(rows_of((5, {}), (1, {"policy/grad_norm": 8.0}))) == [("grad_norm_spike", "warning", 6)]
    # a jump that stays under max_grad_norm reaches the weights as it should
    assert said(rows_of((5, {"policy/grad_norm": 0.001}), (1, {"policy/grad_norm": 0.5}))) == []
    assert said(rows_of((3, {"generation/logprob_gap": 0.01}), (3, {"generation/logprob_gap": 0.05}))) == [
        ("engine_gap_growing", "warning", 6)]
    assert said(rows_of((3, {}), (3, {"response/eos_rate": 0.3}))) == [("runaway_length", "warning", 6)]


def test_thresholds_are_settings_with_clear_errors():
    rows = rows_of((10, {"policy/approx_kl": 1e-6}))
    assert said(rows) == []
    assert said(rows, {"doctor": {"flat_updates": 8}}) == [("reward_flat", "warning", 8)]
    with pytest.raises(ValueError, match="unknown threshold 'flat_update'; did you mean flat_updates"):
        thresholds_from({"flat_update": 8})
    with pytest.raises(ValueError, match="whole number"):
        thresholds_from({"flat_updates": 2.5})
    with pytest.raises(ValueError, match="at least 2 x window"):
        thresholds_from({"flat_updates": 4})
    with pytest.raises(ValueError, match=">= 0"):
        thresholds_from({"unstable_clipfrac": -1})
    assert thresholds_from({"critic_ev_max": -0.2}).critic_ev_max == -0.2  # an explained variance may be < 0
    with pytest.raises(ConfigError, match="unknown threshold"):
        config_from_dict(PPOConfig, {"policy": "p", "prompts": "p", "reward_fn": "m:f", "doctor": {"nope": 1}})


def test_one_threshold_is_set_from_the_command_line(tmp_path):
    cfg = load_config(PPOConfig, None, ["policy=p", "prompts=p", "reward_fn=m:f", "doctor.flat_updates=30",
                                        "doctor.window=4", "doctor_stop_on=critical"])
    assert cfg.doctor == {"flat_updates": 30, "window": 4} and cfg.doctor_stop_on == "critical"


def test_docs_doctor_md_is_generated_from_the_rules():
    text = render_markdown()
    assert (ROOT / "docs" / "doctor.md").read_text() == text
    for rule in RULES:
        assert f"### `{rule.name}`" in text
    for name in THRESHOLD_NAMES:
        assert f"| `{name}` |" in text


def test_a_finding_survives_doctor_jsonl():
    found = findings(rows_of((3, {}), (3, {"reward/score": 3.0, "response/distinct_2": 0.3})))[0]
    assert finding_from_dict(json.loads(json.dumps(found.to_dict()))) == found


# --- text health -------------------------------------------------------------------------------


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[7, 7, 7, 7]], 2) == pytest.approx(1 / 3)
    assert distinct_n([[1]], 2) == 0.0


def test_repeated_ngram_rate_counts_repeats_within_each_response():
    # (1,2,3) (2,3,1) (3,1,2) (1,2,3): one of four 3-grams repeats; a response that never repeats: 0
    assert repeated_ngram_rate([[1, 2, 3, 1, 2, 3]], 3) == pytest.approx(1 / 4)
    assert repeated_ngram_rate([[1, 2, 3, 1, 2, 3], [4, 5, 6, 7]], 3) == pytest.approx((1 / 4 + 0) / 2)
    assert repeated_ngram_rate([[9] * 12], 3) == pytest.approx(9 / 10)  # "thanks thanks thanks ..."
    # across responses is not repetition, and a response too short to have a 3-gram is left out
    assert repeated_ngram_rate([[1, 2, 3], [1, 2, 3], [1, 2]], 3) == 0.0
    assert repeated_ngram_rate([[1]], 3) == 0.0


def test_reference_perplexity_is_exp_of_the_mean_negative_log_prob_of_real_tokens():
    ref = torch.tensor([[-1.0, -3.0, -50.0], [-2.0, -100.0, -100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert reference_perplexity(ref, mask) == pytest.approx(math.exp(2.0))


# 20 responses each: the phrase in 1 of them (5%) at the start, in 15 (75%) later.
BEFORE = ["the United States said no."] + ["the cat sat on the mat.", "a dog ran home.", "he went home."] * 6 + ["ok."]
AFTER = ["the cat sat in the United States.", "a dog ran to the United States!", "the United States said no."] * 5 \
    + ["the home was quiet."] * 5


def test_phrase_shares_count_each_text_once():
    shares = phrase_shares(["the cat saw the cat", "a dog"])
    assert shares["the cat"] == 0.5 and shares["the"] == 0.5 and shares["a dog"] == 0.5
    assert "cat saw the" in shares and "the cat saw the" not in shares  # at most three words


def test_spreading_phrases_name_the_longest_phrase_that_spread_not_its_parts():
    spread = spreading_phrases(phrase_shares(BEFORE), phrase_shares(AFTER))
    # "the" (35% -> 100%) and "united" rose only because "the united states" did.
    assert spread == [("the united states", 0.05, 0.75)]
    assert spreading_phrases(phrase_shares(BEFORE), phrase_shares(BEFORE)) == []


def test_doctor_names_a_spreading_phrase_once_as_information():
    doctor = Doctor()
    assert doctor.observe_phrases(1, BEFORE) == []  # the first rollout is the baseline
    found = doctor.observe_phrases(2, AFTER)
    assert [(f.rule, f.severity) for f in found] == [("phrase_spreading", "info")]
    assert '"the united states" is in 75% of the responses (5% at the first update)' in found[0].message
    assert "kl_coef" in found[0].message
    assert doctor.observe_phrases(3, AFTER) == []
    # Later "united" alone spreads further (part of the named habit): not a new habit.
    later = ["united we stand.", "the united front.", "the United States said no.", "the home was united."] * 5
    assert ("united", 0.05, 1.0) in spreading_phrases(doctor.first_shares, phrase_shares(later))
    assert doctor.observe_phrases(4, later) == []


# --- four seeded runs, deliberately mis-configured --------------------------------------------

# The tiny GPT-2 earns the vowel-share reward healthily from its first update; the 'o' share it can
# only earn by repeating one letter ("oooo...", the tiny model's "thanks thanks thanks"). The healthy
# settings, then each deliberate mistake from the issue.
HEALTHY_RUN = dict(reward_fn=f"{REWARDS}:vowel_share", total_updates=20, batch_size=16, num_minibatches=2,
                   ppo_epochs=4, max_new_tokens=16, learning_rate=1e-3, kl_coef=0.05)
MISCONFIGURED = {
    "a_hacking": dict(reward_fn=f"{REWARDS}:letter_o_rate", kl_coef=0.0, learning_rate=1e-2),
    "b_stalled": dict(learning_rate=1e-9, total_updates=16),
    "c_unstable": dict(clip_eps=10.0, learning_rate=1e-2),
    "d_healthy": dict(),
}
EXPECTED = {  # the rules that must fire at warning or worse, and no others
    # (a): the hack itself; its first update's steps are too large (the large learning rate).
    "a_hacking": {"reward_hacking", "unstable"},
    "b_stalled": {"reward_flat"},
    "c_unstable": {"unstable"},
    "d_healthy": set(),
}
# Rules a run may also earn. At lr 1e-2 the hacking run is chaotic: float rounding in the gradient
# (e.g. another log-softmax backward) moves it from update 5 on, and whether its entropy falls below a
# tenth of the start's, or its critic falls behind the returns, within 20 updates depends on that
# trajectory (measured: entropy 5.5 -> 0.16 and EV ~ -0.1 in one, 5.5 -> 1.0 and EV 0.9 in another).
MAY_ALSO = {"a_hacking": {"entropy_collapse", "critic_not_learning"}}


@pytest.fixture(scope="module")
def diagnosed_runs(tiny_dirs, tmp_path_factory):
    runs = {}
    for name, mistake in MISCONFIGURED.items():
        out = tmp_path_factory.mktemp(name)
        trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, out, **{**HEALTHY_RUN,
                                                                                                   **mistake})))
        trainer.train()
        runs[name] = (out / "run", trainer.doctor.findings)
    return runs


def serious(found) -> set[str]:
    return {f.rule for f in found if f.severity in ("warning", "critical")}


@pytest.mark.parametrize("name", sorted(MISCONFIGURED))
def test_each_misconfigured_run_is_diagnosed_correctly_and_only_correctly(diagnosed_runs, name):
    _, found = diagnosed_runs[name]
    assert EXPECTED[name] <= serious(found) <= EXPECTED[name] | MAY_ALSO.get(name, set()), [f.message for f in found]


def test_the_hacking_run_is_told_to_raise_kl_coef_and_lower_clip_eps(diagnosed_runs):
    _, found = diagnosed_runs["a_hacking"]
    hacking = [f for f in found if f.rule == "reward_hacking"]
    assert [f.severity for f in hacking] == ["warning", "critical"]
    assert "raise kl_coef from 0 to 0.05-0.2" in hacking[0].message and "lower clip_eps" in hacking[0].message
    assert {"response/distinct_2", "response/repeated_3gram_rate"} <= {e.metric for e in hacking[1].evidence}


def test_the_stalled_run_is_told_to_raise_the_learning_rate(diagnosed_runs):
    _, found = diagnosed_runs["b_stalled"]
    (stall,) = [f for f in found if f.rule == "reward_flat"]
    assert stall.update == 15 and (stall.advice[0].key, stall.advice[0].change) == ("learning_rate", "raise")


def test_the_unstable_run_is_told_to_lower_the_clip_range_and_learning_rate(diagnosed_runs):
    _, found = diagnosed_runs["c_unstable"]
    (unstable,) = [f for f in found if f.rule == "unstable"]
    assert {a.key for a in unstable.advice} >= {"learning_rate", "clip_eps"}
    assert "lower clip_eps from 10 to 0.1-0.2" in unstable.message


@pytest.mark.parametrize("name", sorted(MISCONFIGURED))
def test_tether_doctor_on_the_run_directory_prints_what_the_live_run_printed(diagnosed_runs, name, capsys):
    run, live = diagnosed_runs[name]
    written = [json.loads(line) for line in (run / "doctor.jsonl").read_text().splitlines()] \
        if (run / "doctor.jsonl").exists() else []
    assert [row["message"] for row in written] == [f.message for f in live]
    assert [f.message for f in diagnose_run(run)] == [f.message for f in live]
    code = cli_main(["doctor", str(run)])
    printed = [line for line in capsys.readouterr().out.splitlines() if " doctor: update " in line]
    assert [line.split(" doctor: ", 1)[1] for line in printed] == [f.message for f in live]
    assert code == (1 if EXPECTED[name] else 0)


def test_the_report_shows_each_finding_with_its_severity(diagnosed_runs):
    from tether.report import build_report

    page = build_report(diagnosed_runs["a_hacking"][0]).read_text()
    assert '<li class="critical"><b>critical</b> update' in page and "reward_hacking (critical)" in page


def test_tether_doctor_reads_a_crashed_run_and_takes_threshold_overrides(diagnosed_runs, tmp_path, capsys):
    run = tmp_path / "crashed"
    run.mkdir()
    source = diagnosed_runs["b_stalled"][0]
    lines = (source / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:15]) + "\n" + lines[15][:25])  # cut mid-line
    (run / "config.yaml").write_text((source / "config.yaml").read_text())
    assert [(f.rule, f.update) for f in diagnose_run(run)] == [("reward_flat", 15)]
    assert diagnose_run(run, {"flat_updates": 16}) == []  # 15 whole rows are left
    assert cli_main(["doctor", str(run), "flat_updates=16"]) == 0
    assert cli_main(["doctor", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# --- live behaviour in the trainer ---------------------------------------------------------------


def test_doctor_stop_on_critical_stops_with_a_checkpoint_and_the_report(tiny_dirs, tmp_path):
    values = base_overrides(tiny_dirs, tmp_path, **{**HEALTHY_RUN, **MISCONFIGURED["c_unstable"]},
                            doctor={"unstable_critical_approx_kl": 0.1}, doctor_stop_on="critical")
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values))
    with pytest.raises(TrainingStopped, match=r"the doctor stopped the run \(doctor_stop_on=critical\): unstable "
                                              r"\(critical\) at update 1") as stopped:
        trainer.train()
    run = tmp_path / "run"
    assert stopped.value.checkpoint == run / "checkpoint-1" and (run / "checkpoint-1").is_dir()
    assert (run / "report.html").is_file() and "report" in str(stopped.value)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "doctor.jsonl").read_text())["severity"] == "critical"


def test_dropout_left_on_in_the_policy_is_caught_as_a_logprob_mismatch(tiny_dirs, tmp_path, monkeypatch):
    """tether turns dropout off in every role (as TRL does); a setup that skips that samples in eval
    mode and trains in train mode, and the first minibatch shows it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tether.placement
    import tether.roles

    for module in (tether.placement, tether.roles):
        monkeypatch.setattr(module, "disable_dropout", lambda model: None)

    policy = tmp_path / "dropout"
    AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], resid_pdrop=0.3, embd_pdrop=0.3,
                                         attn_pdrop=0.3).save_pretrained(policy)
    AutoTokenizer.from_pretrained(tiny_dirs["gpt2"]).save_pretrained(policy)
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, policy=str(policy),
                                                                           total_updates=1)))
    trainer.train()
    assert [(f.rule, f.severity) for f in trainer.doctor.findings] == [("logprob_mismatch", "critical")]
    monkeypatch.undo()  # dropout turned off as usual: the first minibatch sees exactly the rollout's policy
    clean = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path / "clean",
                                                                         total_updates=1)))
    assert clean.step()["policy/first_minibatch_approx_kl"] == pytest.approx(0.0, abs=1e-7)
