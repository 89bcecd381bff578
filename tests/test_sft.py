"""`tether sft` on a tiny model and a few dozen documents: it learns, saves loadable models, rejects bad data."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.config import ConfigError, SFTConfig, config_from_dict
from tether.data import DataError
from tether.metrics import SFT_METRIC_NAMES
from tether.pipelines.sft import run_sft
from tether.tiny import builtin_corpus, save_tiny_policy, train_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{{ eos_token }}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_cfg(data: Path, output_dir: Path, **extra) -> SFTConfig:
    # One thread: a tiny model gains nothing from two, and two spin-wait badly on a busy machine.
    values = dict(data=str(data), output_dir=str(output_dir), init="scratch", vocab_size=256, hidden=32, layers=1,
                  heads=2, block_size=32, batch_size=8, max_steps=40, learning_rate=3e-3, warmup_steps=4,
                  eval_every=10, eval_fraction=0.1, progress=False, num_threads=1, seed=0)
    values.update(extra)
    return config_from_dict(SFTConfig, values)


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = write_jsonl(root / "text.jsonl", [{"text": t} for t in builtin_corpus(120, seed=2)])
    threads = torch.get_num_threads()
    cfg = sft_cfg(data, root / "run", save_every=20)
    summary = run_sft(cfg)
    torch.set_num_threads(threads)
    return root / "run", summary


def test_sft_from_scratch_loss_falls_and_perplexity_is_reported(scratch_run):
    run, summary = scratch_run
    rows = read_rows(run)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0  # a 256-token vocabulary starts near log(256) = 5.5
    assert evals[-1] < evals[0]
    assert summary["eval/perplexity"] == pytest.approx(math.exp(summary["eval/loss"]))
    assert summary["train/steps"] == 40 and summary["train/blocks"] > 0


def test_sft_logs_exactly_the_documented_metrics(scratch_run):
    run, _ = scratch_run
    logged = {k for r in read_rows(run) for k in r} - {"update"}
    assert logged == SFT_METRIC_NAMES


def test_sft_saves_plain_transformers_models_and_intermediate_checkpoints(scratch_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, summary = scratch_run
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "final",
                                                "checkpoint-20", "checkpoint-40"}
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    ids = torch.tensor([tokenizer("the cat is good today.")["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < math.log(len(tokenizer))  # the saved weights are the trained ones, not a fresh init
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.0  # dropout=0 default for init=scratch
    early = AutoModelForCausalLM.from_pretrained(run / "checkpoint-20")
    assert not torch.equal(early.lm_head.weight, model.lm_head.weight)


def test_sft_fine_tunes_a_pretrained_model_on_chat_data(tmp_path):
    texts = builtin_corpus(200, seed=3)
    tokenizer = train_tokenizer(texts + ["user: assistant:"], vocab_size=256, chat_template=CHAT_TEMPLATE)
    policy = tmp_path / "policy"
    save_tiny_policy(policy, texts=texts, hidden=32, layers=1, heads=2)
    tokenizer.save_pretrained(policy)  # the same vocabulary, now with a chat template
    chats = [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
             for a, b in zip(texts[::2], texts[1::2])]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    summary = run_sft(sft_cfg(data, tmp_path / "run", init="pretrained", model=str(policy), max_steps=30))
    rows = read_rows(tmp_path / "run")
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5
    assert summary["train/steps"] == 30


def test_chat_data_without_a_chat_template_names_the_fix(tmp_path):
    chats = [{"messages": [{"role": "user", "content": t}]} for t in builtin_corpus(40)]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    policy = save_tiny_policy(tmp_path / "policy", hidden=32, layers=1, heads=2)
    with pytest.raises(DataError, match="chat template"):
        run_sft(sft_cfg(data, tmp_path / "run", init="pretrained", model=str(policy)))


def test_bad_sft_data_is_a_clear_error(tmp_path):
    wrong_field = write_jsonl(tmp_path / "wrong.jsonl", [{"body": t} for t in builtin_corpus(40)])
    with pytest.raises(DataError, match="text"):
        run_sft(sft_cfg(wrong_field, tmp_path / "run1"))
    too_little = write_jsonl(tmp_path / "little.jsonl", [{"text": "a cat."}, {"text": "a dog."}])
    with pytest.raises(DataError, match="block_size"):
        run_sft(sft_cfg(too_little, tmp_path / "run2", block_size=64, eval_fraction=0.0))
    with pytest.raises(ConfigError, match="dropout"):
        run_sft(sft_cfg(too_little, tmp_path / "run4", dropout=1.0))
    with pytest.raises(ConfigError, match="model is required"):
        run_sft(sft_cfg(too_little, tmp_path / "run3", init="pretrained"))


def test_cli_sft_run_as_a_user_types_it(tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in builtin_corpus(80)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [f"data={data}", f"output_dir={tmp_path / 'run'}", "init=scratch", "vocab_size=256", "hidden=32",
            "layers=1", "heads=2", "block_size=32", "batch_size=4", "max_steps=3", "eval_every=3",
            "dropout=0.2", "progress=false", "num_threads=1"]
    result = subprocess.run([sys.executable, "-m", "tether.cli", "sft", *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "save_every: 0" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["resid_pdrop"] == 0.2


def test_lora_sft_trains_only_an_adapter_and_exports_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.cli import main
    from tether.lora import LoraError

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in builtin_corpus(200)])
    base = save_tiny_policy(tmp_path / "base", arch="llama", hidden=32, layers=2, heads=2)
    run = tmp_path / "run"
    summary = run_sft(sft_cfg(docs, run, init="pretrained", model=str(base), lora_rank=8, lora_alpha=16.0,
                              learning_rate=1e-2, max_steps=30))
    rows = read_rows(run)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.1
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert main(["export", str(final), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    original = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, original(ids).logits)  # the adapter is in it
    assert summary["eval/loss"] < math.log(256)
    with pytest.raises(LoraError, match=r"match no layer.*o_proj"):
        run_sft(sft_cfg(docs, tmp_path / "bad", init="pretrained", model=str(base), lora_rank=8,
                        lora_target_modules=["nope"]))
