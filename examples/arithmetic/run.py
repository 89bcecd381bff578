"""The whole RLVR example in order: data -> SFT -> held-out eval -> PPO (GRPO) -> held-out eval.

    .venv/bin/python examples/arithmetic/run.py [--out runs/arithmetic] [--seed 0]     (or: make rlvr)

Each stage is the command a user would type (printed before it runs); the last line is the summary,
`held-out exact match: SFT X% -> PPO Y% (N prompts)`, also written to OUT/summary.json with the stage
times. About 7 minutes on 1 CPU thread. Runs from the repository root; re-running replaces OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import make_data  # noqa: E402


def tether(stage: str, config: Path, **overrides) -> None:
    """`tether STAGE --config CONFIG key=value ...` in a child process, as typed on the command line."""
    args = ["--config", str(config.relative_to(ROOT))] + [f"{k}={v}" for k, v in overrides.items()]
    print(f"\n$ .venv/bin/tether {stage} {shlex.join(args)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "tether", stage, *args], check=True, cwd=ROOT, env=env)


def held_out(model_dir: Path, eval_file: Path) -> tuple[float, int]:
    import evaluate  # imports torch and transformers: after the data are written

    accuracy, count, _ = evaluate.accuracy(model_dir, eval_file)
    print(f"held-out exact match of {model_dir}: {100 * accuracy:.1f}% ({count} prompts, greedy)", flush=True)
    return accuracy, count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="data -> SFT -> eval -> PPO -> eval, on 1 CPU thread")
    parser.add_argument("--out", default="runs/arithmetic", help="directory for the data and both runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, SFT and PPO")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    data, sft, ppo = out / "data", out / "sft", out / "ppo"
    times = {}
    start = time.perf_counter()

    # 1. The task: careless demonstrations for SFT, prompts with answers for PPO, held-out prompts.
    make_data.write_data(data, seed=args.seed)
    print(f"data written to {data}: sft.jsonl, prompts.jsonl, eval.jsonl")

    # 2. SFT from scratch, then its held-out accuracy.
    began = time.perf_counter()
    tether("sft", HERE / "sft.yaml", data=data / "sft.jsonl", output_dir=sft, seed=args.seed, overwrite="true")
    times["sft_s"] = time.perf_counter() - began
    import torch

    torch.set_num_threads(1)
    before, count = held_out(sft / "final", data / "eval.jsonl")

    # 3. GRPO with the exact-match reward, then the same held-out accuracy.
    began = time.perf_counter()
    tether("ppo", HERE / "ppo.yaml", policy=sft / "final", prompts=data / "prompts.jsonl",
           eval_prompts=data / "eval.jsonl", output_dir=ppo, seed=args.seed, overwrite="true")
    times["ppo_s"] = time.perf_counter() - began
    after, _ = held_out(ppo / "final", data / "eval.jsonl")

    times["total_s"] = time.perf_counter() - start
    summary = {"seed": args.seed, "sft_accuracy": before, "ppo_accuracy": after, "eval_prompts": count,
               **{k: round(v, 1) for k, v in times.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwall time {times['total_s'] / 60:.1f} min (SFT {times['sft_s']:.0f} s, PPO {times['ppo_s']:.0f} s); "
          f"runs in {sft} and {ppo}")
    print(f"held-out exact match: SFT {100 * before:.1f}% -> PPO {100 * after:.1f}% ({count} prompts)")
    return summary


if __name__ == "__main__":
    main()
