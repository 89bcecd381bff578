"""Runs as a user types them, and the docs that describe them."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import REWARDS, base_overrides
from tether.config import PPOConfig, config_from_dict
from tether.data import DataError
from tether.metrics import PPO_METRIC_NAMES, render_markdown
from tether.pipelines.ppo import build_ppo_trainer

ROOT = Path(__file__).resolve().parents[1]


def test_docs_metrics_md_is_generated_from_the_metric_table():
    assert (ROOT / "docs" / "metrics.md").read_text() == render_markdown()
    for name in PPO_METRIC_NAMES:
        assert f"`{name}`" in render_markdown()


def test_metrics_doc_says_which_option_turns_a_metric_on_and_on_which_rows_it_appears():
    rows = {line.split(" | ")[0]: line.split(" | ")[-1] for line in render_markdown().splitlines()
            if line.startswith("| `")}
    assert rows["| `eval/gold`"] == ("`eval_prompts` and `gold_reward_fn` are set; update 0, every `eval_every` "
                                    "updates and the last |")
    assert rows["| `reward/score`"] == "always |"
    # The reward model's and SFT's conditional rows name a schedule, not an option.
    assert rows["| `eval/accuracy`"] == "eval_every step / the end |"
    assert rows["| `train/steps`"] == "the last row |"


def test_cli_ppo_run_as_a_user_types_it(tiny_dirs, tmp_path):
    config = tmp_path / "ppo.yaml"
    values = base_overrides(tiny_dirs, tmp_path, total_updates=2)
    values.pop("output_dir")
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "tether.cli", "ppo", "--config", str(config),
                             f"output_dir={tmp_path / 'cli_run'}", "kl_coef=0.1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: ppo; reward/score" in result.stdout
    run = tmp_path / "cli_run"
    saved = (run / "config.yaml").read_text()
    assert "kl_coef: 0.1" in saved and "total_updates: 2" in saved
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]
    assert (run / "final" / "model.safetensors").is_file()


def test_cli_names_a_missing_prompt_file(tiny_dirs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tether.cli", "ppo", f"policy={tiny_dirs['gpt2']}",
                             f"prompts={tmp_path / 'missing.jsonl'}", f"reward_fn={REWARDS}:text_length",
                             f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr and "not found" in result.stderr


def test_tokenizer_without_pad_token_gets_one_and_says_so(tiny_dirs, tmp_path, caplog):
    policy_dir = tmp_path / "nopad"
    policy_dir.mkdir()
    for f in tiny_dirs["gpt2"].iterdir():
        (policy_dir / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.pad_token = None
    tok.save_pretrained(policy_dir)
    with caplog.at_level(logging.WARNING):
        trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
            tiny_dirs, tmp_path, policy=str(policy_dir), reward_fn=f"{REWARDS}:text_length")))
    assert "no dedicated pad token" in caplog.text
    assert trainer.tokenizer.pad_token_id != trainer.tokenizer.eos_token_id
    assert trainer.roles.policy.get_input_embeddings().num_embeddings == len(trainer.tokenizer)
    assert trainer.roles.critic.backbone.get_input_embeddings().num_embeddings == len(trainer.tokenizer)
    trainer.step()  # pads are valid ids for every role


def test_overlong_prompts_are_counted_or_rejected(tiny_dirs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, max_prompt_length=2)))
    assert "were longer than max_prompt_length=2 and were truncated on the left" in caplog.text
    with pytest.raises(DataError, match="max_prompt_length"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
            tiny_dirs, tmp_path / "b", max_prompt_length=2, overlong_prompts="error")))


def test_empty_prompt_file_is_a_clear_error(tiny_dirs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, prompts=str(empty))))


def test_large_freed_blocks_go_back_to_the_os_unless_the_user_chose():
    """release_memory: glibc's dynamic mmap threshold fragments the heap with activation-sized
    blocks; a threshold the user set in the environment is theirs. (In a child process: the
    setting is process-wide and would slow the rest of the suite.)"""
    code = "from tether.pipelines.stage import return_freed_memory_to_os as f; print(f())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    applied = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()
    assert applied == ("True" if sys.platform == "linux" else "False")
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout.strip()
    assert kept == "False"
