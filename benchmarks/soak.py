"""Resident memory over a long PPO run of a tiny model: does anything accumulate per update?

    .venv/bin/python benchmarks/soak.py [--updates 1000] [--warmup 100]

One process, one trainer (tiny GPT-2 policy, a function reward, eval and samples files on, so
every per-update path runs), RSS read from /proc every 10 updates. Prints the curve's start
(after warm-up), end, growth and a least-squares slope in MB per 100 updates. Target: growth
< 5% after warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from chaos import make_assets

    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = make_assets(root)
        cfg = config_from_dict(PPOConfig, dict(
            policy=str(assets["policy"]), prompts=str(assets["prompts"]), eval_prompts=str(assets["prompts"]),
            reward_fn=f"{assets['reward']}:letter_o", output_dir=str(root / "run"), total_updates=args.updates,
            batch_size=8, num_minibatches=2, ppo_epochs=2, max_new_tokens=8, learning_rate=1e-4, eval_every=50,
            eval_max_prompts=8, sample_every=10, progress=False, num_threads=1, seed=0))
        trainer = build_ppo_trainer(cfg)
        trainer.log_evaluation()
        points, start = [], time.perf_counter()
        for update in range(1, args.updates + 1):
            metrics = trainer.step()
            if update % 10 == 0 and update >= args.warmup:
                points.append((update, rss_mb()))
        elapsed = time.perf_counter() - start
        rows = len((root / "run" / "metrics.jsonl").read_text().splitlines())
    (first_u, first), (last_u, last) = points[0], points[-1]
    per_100 = 100 * slope([u for u, _ in points], [m for _, m in points])
    growth = (last - first) / first
    print(f"{args.updates} updates in {elapsed:.0f} s ({rows} metrics rows); RSS after warm-up (update {first_u}) "
          f"{first:.1f} MB, at update {last_u} {last:.1f} MB: growth {growth:+.2%} (target < 5%), slope "
          f"{per_100:+.2f} MB per 100 updates; peak {max(m for _, m in points):.1f} MB; last score "
          f"{metrics.get('reward/score', float('nan')):.3f}")
    print("curve (update: MB):", "  ".join(f"{u}: {m:.0f}" for u, m in points[:: max(1, len(points) // 10)]))


if __name__ == "__main__":
    main()
