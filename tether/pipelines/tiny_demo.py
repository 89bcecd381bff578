"""`tether demo`: a small offline PPO run on CPU that shows the score rising.

1. a byte-level BPE and a tiny GPT-2, briefly pretrained on built-in sentences (cached);
2. PPO against a reward function that pays for the word "good" in the response;
3. the score and sample responses before and after.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from tether.algo import lm_loss
from tether.config import PPOConfig, config_from_dict
from tether.data import BlockSampler, pack_texts
from tether.models import position_ids_from_mask
from tether.pipelines.ppo import build_ppo_trainer, set_threads
from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer

log = logging.getLogger(__name__)
TARGET_WORD = "good"


def says_good(responses: list[str]) -> list[float]:
    """Reward: 1 when the response says "good" (the demo's learnable target), else 0.

    Paying once, not per occurrence, leaves nothing to gain from "good good good".
    """
    return [float(TARGET_WORD in r.replace(".", " ").split()) for r in responses]


def pretrain_tiny_policy(directory: Path, steps: int = 300, seed: int = 0) -> Path:
    """A tiny GPT-2 that writes template sentences: enough language for PPO to shape."""
    torch.manual_seed(seed)
    texts = builtin_corpus(n=2000, seed=seed)
    tokenizer = train_tokenizer(texts, vocab_size=256)
    model = build_tiny_causal_lm("gpt2", tokenizer, seed=seed, hidden=64, layers=2, heads=4)
    sampler = BlockSampler(pack_texts(texts, tokenizer, block_size=32), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        blocks = sampler.next_batch(32)
        mask = torch.ones_like(blocks)
        logits = model(input_ids=blocks, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        loss, stats = lm_loss(logits, blocks, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    log.info("pretrained tiny policy: LM loss %.3f after %d steps", stats["loss"].item(), steps)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_prompts(path: Path, n: int = 256) -> Path:
    """Prompts: the first two words of held-out template sentences."""
    with path.open("w") as f:
        for sentence in builtin_corpus(n=n, seed=123):
            f.write(json.dumps({"prompt": " ".join(sentence.split()[:2])}) + "\n")
    return path


def demo_config(output_dir: Path) -> PPOConfig:
    return config_from_dict(PPOConfig, dict(
        policy=str(output_dir / "base"), prompts=str(output_dir / "prompts.jsonl"),
        reward_fn="tether.pipelines.tiny_demo:says_good", output_dir=str(output_dir / "ppo"),
        total_updates=40, batch_size=32, num_minibatches=2, ppo_epochs=4, max_new_tokens=20,
        learning_rate=3e-4, kl_coef=0.1, temperature=1.0, sample_every=10, num_samples=4, seed=0))


def run_tiny_demo(output_dir: str | Path, fresh: bool = False) -> dict[str, float]:
    output_dir = Path(output_dir)
    if fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_threads(0)
    start = time.perf_counter()
    if not (output_dir / "base" / "config.json").is_file():
        print("stage 1/2: pretraining a tiny GPT-2 on built-in sentences ...", flush=True)
        pretrain_tiny_policy(output_dir / "base")
    else:
        print("stage 1/2: reusing the cached tiny policy (--fresh recomputes)", flush=True)
    write_prompts(output_dir / "prompts.jsonl")
    if (output_dir / "ppo").exists():
        shutil.rmtree(output_dir / "ppo")
    print(f"stage 2/2: PPO toward responses that say {TARGET_WORD!r} ...", flush=True)
    trainer = build_ppo_trainer(demo_config(output_dir))
    trainer.train()
    summary = summarize(output_dir / "ppo", time.perf_counter() - start)
    return summary


def summarize(run_dir: Path, seconds: float) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[:5], rows[-5:]
    before = sum(r["reward/score"] for r in first) / len(first)
    after = sum(r["reward/score"] for r in last) / len(last)
    kl = sum(r["kl/mean"] for r in last) / len(last)
    print("\nupdate  score   kl     clipfrac  length")
    for r in rows[:: max(1, len(rows) // 10)] + ([rows[-1]] if (len(rows) - 1) % max(1, len(rows) // 10) else []):
        print(f"{r['update']:>6}  {r['reward/score']:6.3f}  {r['kl/mean']:5.2f}  {r['policy/clipfrac']:8.3f}"
              f"  {r['response/length']:6.1f}")
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    for update in (samples[0]["update"], samples[-1]["update"]):
        print(f"\nsamples at update {update}:")
        for s in [s for s in samples if s["update"] == update]:
            print(f"  [{s['score']:.0f}] {s['prompt']!r} -> {s['response']!r}")
    print(f"\nmean score, first 5 updates: {before:.3f}; last 5 updates: {after:.3f} "
          f"(KL to reference {kl:.2f} nats); {seconds:.0f} s. Run directory: {run_dir}")
    return {"score_before": before, "score_after": after, "kl": kl, "seconds": seconds}
