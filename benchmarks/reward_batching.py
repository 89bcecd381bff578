"""Reward-model training cost with and without ``batch_by_prompt``, measured side by side.

InstructGPT-style data ranks K responses per prompt and uses all K(K-1)/2 pairs. With
``batch_by_prompt`` a batch holds whole prompts, and each distinct sequence in a micro-batch
is scored once, so a step costs about K forward/backward passes per prompt instead of K(K-1).

    python benchmarks/reward_batching.py [--threads 2] [--steps 12]

Prints sequences scored per step, seconds per step and pairs per second for both orders,
and their ratio. A demo-sized backbone (hidden 192, 4 layers); timings vary with the machine.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tether.config import RewardConfig, config_from_dict
from tether.tiny import build_tiny_reward_model, builtin_corpus, train_tokenizer
from tether.trainers.reward import PreferencePairs, RewardTrainer


def ranked_pairs(tokenizer, prompts: int, per_prompt: int, seed: int = 0) -> PreferencePairs:
    """All pairs of ``per_prompt`` randomly ranked responses for each of ``prompts`` prompts."""
    rng = random.Random(seed)
    sentences = builtin_corpus(prompts * (per_prompt + 1), seed=seed)
    pairs = PreferencePairs([], [], [])
    for p in range(prompts):
        prompt = tokenizer(" ".join(sentences[p].split()[:3]))["input_ids"]
        responses = [tokenizer(" " + s)["input_ids"][:24] + [tokenizer.eos_token_id]
                     for s in rng.sample(sentences, per_prompt)]
        for i in range(per_prompt):
            for j in range(i + 1, per_prompt):
                pairs.chosen.append(prompt + responses[i])
                pairs.rejected.append(prompt + responses[j])
                pairs.prompt_keys.append(str(p))
    return pairs


def time_steps(batch_by_prompt: bool, pairs: PreferencePairs, tokenizer, steps: int) -> dict[str, float]:
    cfg = config_from_dict(RewardConfig, dict(model="benchmark", data="benchmark", batch_size=64, epochs=1.0,
                                              learning_rate=1e-3, progress=False, batch_by_prompt=batch_by_prompt))
    model = build_tiny_reward_model("gpt2", tokenizer, seed=0, hidden=192, layers=4, heads=4)
    trainer = RewardTrainer(cfg, model, tokenizer.pad_token_id, pairs)
    scored: list[int] = []
    hook = model.score.register_forward_hook(lambda module, args, out: scored.append(args[0].shape[0]))
    trainer.train_step()  # warm-up step, not timed
    scored.clear()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = (time.perf_counter() - start) / steps
    hook.remove()
    return {"sequences_per_step": sum(scored) / steps, "seconds_per_step": seconds,
            "pairs_per_second": cfg.batch_size / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--responses", type=int, default=8, help="ranked responses per prompt (K)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(builtin_corpus(2000), vocab_size=512)
    pairs = ranked_pairs(tokenizer, prompts=48, per_prompt=args.responses)
    print(f"{len(pairs)} pairs: 48 prompts x K={args.responses} ranked responses, batch 64 pairs, "
          f"{args.threads} threads, {args.steps} timed steps each")
    results = {name: time_steps(flag, pairs, tokenizer, args.steps)
               for name, flag in (("shuffled pairs", False), ("batch_by_prompt", True))}
    for name, r in results.items():
        print(f"  {name:16s} {r['sequences_per_step']:6.1f} sequences/step  {r['seconds_per_step']:.3f} s/step  "
              f"{r['pairs_per_second']:7.1f} pairs/s")
    ratio = results["batch_by_prompt"]["pairs_per_second"] / results["shuffled pairs"]["pairs_per_second"]
    print(f"batch_by_prompt trains {ratio:.2f}x the pairs per second")


if __name__ == "__main__":
    main()
