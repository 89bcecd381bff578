"""Exact resume, protected run directories, the lock, Ctrl-C and the NaN guard (tether/rundir.py,
PPOTrainer.save/load_state)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides
from tether.config import PPOConfig, config_from_dict
from tether.pipelines.ppo import build_ppo_trainer
from tether.rundir import LOCK_FILE, RunDirError
from tether.trainers.ppo import TrainingStopped

CALLS = {"n": 0}


def nan_after_four_calls(responses):
    """A reward function that breaks: finite for four updates, then NaN for the second sample."""
    CALLS["n"] += 1
    scores = [r.count("o") / max(1, len(r)) for r in responses]
    if CALLS["n"] > 4:
        scores[1] = float("nan")
    return scores


def run_cfg(tiny_dirs, out, arch="gpt2", **extra):
    text = out.parent / "ptx.txt"
    text.write_text("\n\n".join(["the cat is good today."] * 50))
    values = base_overrides(tiny_dirs, out, arch=arch, total_updates=6, save_every=3, eval_prompts=str(tiny_dirs["prompts"]),
                            eval_every=2, eval_max_prompts=6, ptx_data=str(text), ptx_coef=0.5, ptx_block_size=16,
                            ptx_batch_size=2, normalize_scores=True, adaptive_kl=True, kl_horizon=100,
                            sample_every=1, num_samples=2)
    values.update(extra)
    return config_from_dict(PPOConfig, values)


def crash_after(trainer, update):
    """Make the run die (an exception) just before update `update` + 1 would start."""
    step = trainer.step

    def dying_step():
        if trainer.update == update:
            raise RuntimeError("simulated crash")
        return step()

    trainer.step = dying_step


def weights(run):
    final = Path(run) / "final"
    files = sorted(final.glob("*.safetensors")) + sorted((final / "critic").glob("*.safetensors"))
    assert files
    return {f"{f.parent.name}/{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def logged(run, name):
    rows = [json.loads(line) for line in (Path(run) / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("placement", ["separate", "shared_base"])
def test_six_updates_straight_equal_three_a_crash_and_a_resume(tiny_dirs, tmp_path, placement):
    extra = dict(arch="llama", placement="shared_base", lora_rank=4, lora_layers=1) if placement == "shared_base" else {}
    straight = tmp_path / "straight"
    build_ppo_trainer(run_cfg(tiny_dirs, straight, **extra)).train()

    broken = tmp_path / "broken"
    trainer = build_ppo_trainer(run_cfg(tiny_dirs, broken, **extra))
    crash_after(trainer, 4)  # checkpoint-3 is on disk, update 4 was logged and then lost
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    assert (broken / "run" / "checkpoint-3").is_dir() and not (broken / "run" / "final").exists()
    assert max(r["update"] for r in logged(broken / "run", "metrics.jsonl")) == 4

    resumed = build_ppo_trainer(run_cfg(tiny_dirs, broken, resume=True, **extra))
    assert resumed.update == 3
    resumed.train()

    a, b = weights(straight / "run"), weights(broken / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert logged(straight / "run", name) == logged(broken / "run", name), name


def test_a_second_run_into_a_used_directory_is_refused_and_changes_nothing(tiny_dirs, tmp_path):
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path))
    build_ppo_trainer(cfg).train()
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match="already holds a run.*resume=true.*overwrite=true"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, learning_rate=5e-4)))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_with_a_changed_config_lists_the_changed_keys(tiny_dirs, tmp_path):
    build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, save_every=1,
                                                                 total_updates=2))).train()
    with pytest.raises(RunDirError, match=r"learning_rate: 0.001 -> 0.0005.*clip_eps|clip_eps.*learning_rate"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
            tiny_dirs, tmp_path, resume=True, learning_rate=5e-4, clip_eps=0.1)))
    # total_updates is safe to change: the finished run continues from final/
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, resume=True,
                                                                           save_every=1, total_updates=3)))
    assert trainer.update == 2
    trainer.train()
    assert [r["update"] for r in logged(tmp_path / "run", "metrics.jsonl")] == [1, 2, 3]


def test_nothing_to_resume_says_so(tiny_dirs, tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, resume=True)))


def test_overwrite_replaces_the_run_only_once_every_check_has_passed(tiny_dirs, tmp_path):
    build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, save_every=1))).train()
    run = tmp_path / "run"
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(Exception, match="no_such_module|No module"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
            tiny_dirs, tmp_path, overwrite=True, reward_fn="no_such_module:score")))
    assert (run / "config.yaml").read_bytes() == config and (run / "checkpoint-1").is_dir()
    assert not (run / LOCK_FILE).exists()  # a failed start leaves no lock behind
    build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, overwrite=True,
                                                                 total_updates=1))).train()
    assert not (run / "checkpoint-1").exists()
    assert [r["update"] for r in logged(run, "metrics.jsonl")] == [1]


def test_the_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tiny_dirs, tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(RunDirError, match=f"another tether run \\(pid {sleeper.pid}"):
            build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path)))
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path)))
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.train()
    assert not (run / LOCK_FILE).exists()


def test_keep_checkpoints_keeps_the_newest(tiny_dirs, tmp_path):
    build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, total_updates=5, save_every=1,
                                                                 keep_checkpoints=2))).train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_sigint_stops_after_the_update_with_a_checkpoint_and_resumes(tiny_dirs, tmp_path):
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, total_updates=4)))
    step = trainer.step

    def interrupted_step():
        if trainer.update == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-update; the update still completes
        return step()

    trainer.step = interrupted_step
    with pytest.raises(TrainingStopped, match="stopped by SIGINT after update 2.*checkpoint-2.*resume=true") as err:
        trainer.train()
    assert err.value.exit_code == 130 and (tmp_path / "run" / "checkpoint-2").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    resumed = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, total_updates=4,
                                                                           resume=True)))
    resumed.train()
    assert [r["update"] for r in logged(tmp_path / "run", "metrics.jsonl")] == [1, 2, 3, 4]


def test_non_finite_scores_skip_the_update_then_stop_the_run(tiny_dirs, tmp_path):
    CALLS["n"] = 0
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
        tiny_dirs, tmp_path, reward_fn=f"{Path(__file__)}:nan_after_four_calls", total_updates=20,
        max_skipped_updates=3)))
    for _ in range(4):
        trainer.step()
    before = {k: v.clone() for k, v in trainer.roles.policy.state_dict().items()}
    metrics = trainer.step()
    assert metrics == {"ppo/skipped_updates": 1.0} and trainer.update == 5
    for key, value in trainer.roles.policy.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing reached the weights
    with pytest.raises(TrainingStopped, match=r"3 updates in a row were skipped; the first because the rollout had "
                                              r"a non-finite score \(nan\) for response 1 .*checkpoint-7"):
        trainer.train()
    said = [json.loads(line) for line in (tmp_path / "run" / "doctor.jsonl").read_text().splitlines()]
    assert [(r["update"], r["severity"]) for r in said if r["rule"] == "skipped_update"] == [
        (5, "warning"), (6, "warning"), (7, "warning")]


# --- SFT and reward-model training --------------------------------------------------------------


def final_weights(run):
    final = Path(run) / "final"
    return {f"{f.name}/{k}": v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def crash_method(monkeypatch, cls, counter, at):
    """cls.step raises once `counter` of the trainer reaches `at` (the first run dies there)."""
    step = cls.step if cls.__name__ == "SFTTrainer" else cls.train_step
    name = "step" if cls.__name__ == "SFTTrainer" else "train_step"

    def dying(self, *args):
        if getattr(self, counter) == at:
            raise RuntimeError("simulated crash")
        return step(self, *args)

    monkeypatch.setattr(cls, name, dying)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_resume_is_exact(tiny_dirs, tmp_path, monkeypatch, lora):
    from test_sft import sft_cfg, write_jsonl
    from tether.pipelines.sft import run_sft
    from tether.tiny import builtin_corpus
    from tether.trainers.sft import SFTTrainer

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in builtin_corpus(80, seed=2)])
    extra = dict(init="pretrained", model=str(tiny_dirs["llama"]), lora_rank=4) if lora else dict(dropout=0.1)
    run_sft(sft_cfg(data, tmp_path / "straight", max_steps=8, save_every=4, eval_every=3, **extra))
    with monkeypatch.context() as patch:
        crash_method(patch, SFTTrainer, "step_count", 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_sft(sft_cfg(data, tmp_path / "broken", max_steps=8, save_every=4, eval_every=3, **extra))
    run_sft(sft_cfg(data, tmp_path / "broken", max_steps=8, save_every=4, eval_every=3, resume=True, **extra))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged(tmp_path / "straight", "metrics.jsonl") == logged(tmp_path / "broken", "metrics.jsonl")


@pytest.mark.parametrize("lora", [False, True])
def test_reward_resume_is_exact(tiny_dirs, tmp_path, monkeypatch, lora):
    from test_reward import preference_rows, write_jsonl as write_pairs
    from tether.config import RewardConfig
    from tether.pipelines.reward import run_reward
    from tether.trainers.reward import RewardTrainer

    rows = preference_rows()
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    extra = dict(model=str(tiny_dirs["llama"]), lora_rank=4, lora_layers=1) if lora else dict(model=str(tiny_dirs["gpt2"]))

    def cfg(out, **more):
        return config_from_dict(RewardConfig, dict(data=str(data), output_dir=str(out), batch_size=8, epochs=2.0,
                                                   learning_rate=3e-3, max_length=64, eval_every=3, progress=False,
                                                   num_threads=1, save_every=4, **extra, **more))

    run_reward(cfg(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        crash_method(patch, RewardTrainer, "step", 6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_reward(cfg(tmp_path / "broken"))
    run_reward(cfg(tmp_path / "broken", resume=True))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged(tmp_path / "straight", "metrics.jsonl") == logged(tmp_path / "broken", "metrics.jsonl")


def test_a_non_finite_loss_skips_the_update_and_leaves_no_gradient_behind(tiny_dirs, tmp_path):
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
        tiny_dirs, tmp_path, gradient_accumulation_steps=2, total_updates=3)))
    policy_loss, calls = trainer.policy_loss, []

    def second_micro_batch_is_nan(micro, num_tokens, num_sequences):
        loss, stats = policy_loss(micro, num_tokens, num_sequences)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    trainer.policy_loss = second_micro_batch_is_nan
    before = {k: v.clone() for k, v in trainer.roles.policy.state_dict().items()}
    assert trainer.step() == {"ppo/skipped_updates": 1.0}
    assert all(p.grad is None for p in trainer.roles.trainable("policy") + trainer.roles.trainable("critic"))
    for key, value in trainer.roles.policy.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert "non-finite policy loss" in (tmp_path / "run" / "doctor.jsonl").read_text()
    assert trainer.step()["ppo/skipped_updates"] == 1.0 and trainer.skipped_in_a_row == 0  # the next one trains
