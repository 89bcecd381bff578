"""PPO with a critic (GAE) against the critic-free estimators, side by side on the demo.

    .venv/bin/python benchmarks/estimators.py [--updates 32] [--only gae,grpo,...]

Uses the demo's SFT policy and reward model (`runs/demo`, built by `make demo`; built here if
absent) and its PPO settings: 64 responses per update (GAE: 64 prompts x 1; the group estimators:
16 prompts x 4 samples), 20 new tokens, 4 PPO epochs, 2 minibatches, PPO-ptx, the same learning rate,
entropy bonus and KL coefficient. Each estimator runs with the loss and KL handling it is
published with:

  gae                    KL (k1) in the reward, token-mean loss, a critic (the demo as it is)
  grpo                   KL (k3) in the loss, mean per response then over responses
  dr_grpo                KL (k1) in the reward, sum / (responses x max_new_tokens)
  rloo                   KL (k1) in the reward, token-mean loss
  reinforce_pp           KL (k1) in the reward, returns-to-go whitened over the batch
  reinforce_pp_baseline  the same after subtracting each group's mean score

Each run is a fresh process. Printed per estimator, on the demo's 256 held-out prompts: gold
(VADER) gain from update 0 to the end, KL to the reference at the end, distinct-2 at the end
relative to update 0, proxy gain, seconds per update, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "demo"
GROUP = dict(batch_size=16, samples_per_prompt=4)
ESTIMATORS = {
    "gae": dict(),
    "grpo": dict(GROUP, kl_placement="loss", kl_estimator="k3", loss_aggregation="seq_mean_token_mean"),
    "dr_grpo": dict(GROUP, loss_aggregation="seq_mean_token_sum_norm"),
    "rloo": dict(GROUP),
    "reinforce_pp": dict(GROUP),
    "reinforce_pp_baseline": dict(GROUP),
}


def demo_artifacts():
    """The demo's corpus, SFT model and reward model (cached stages; built when missing)."""
    from tether.pipelines.demo import DemoSettings, stage_corpus, stage_preferences, stage_reward, stage_sft
    from tether.pipelines.ppo import set_threads

    settings = DemoSettings()
    set_threads(0)
    files = stage_corpus(RUN)
    stage_sft(RUN, files, settings)
    stage_preferences(RUN, files, settings)
    stage_reward(RUN, files, settings)
    return settings, files


def worker(name: str, updates: int, out: Path) -> None:
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    settings, files = demo_artifacts()
    values = dict(settings.ppo, policy=str(RUN / "sft" / "final"), reward_model=str(RUN / "reward" / "final"),
                  gold_reward_fn="tether.pipelines.demo:vader_compound", prompts=str(files["prompts"]),
                  eval_prompts=str(files["eval_prompts"]), output_dir=str(out), seed=0, overwrite=True,
                  ptx_data=str(files["sft_text"]) if settings.ppo_ptx else None, progress=False,
                  total_updates=updates, eval_every=updates, advantage_estimator=name)
    if name != "gae":
        values.pop("critic_learning_rate", None)  # no critic to train
    values.update(ESTIMATORS[name])
    build_ppo_trainer(config_from_dict(PPOConfig, values)).train()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (out / "peak.json").write_text(json.dumps({"peak_mb": peak_mb}))


def summary(name: str, out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gold" in r]
    updates = [r for r in rows if "time/update_s" in r]
    first, last = evals[0], evals[-1]
    return {"estimator": name, "gold_gain": last["eval/gold"] - first["eval/gold"],
            "proxy_gain": last["eval/score"] - first["eval/score"], "kl": last["eval/kl"],
            "distinct_2": last["eval/distinct_2"] / first["eval/distinct_2"],
            "s_per_update": sum(r["time/update_s"] for r in updates[1:]) / max(1, len(updates) - 1),
            "peak_mb": json.loads((out / "peak.json").read_text())["peak_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=32)
    parser.add_argument("--only", default=",".join(ESTIMATORS), help="comma-separated estimators")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.updates, Path(args.out))
    demo_artifacts()  # once, before the timed runs
    results = []
    for name in args.only.split(","):
        out = RUN / "estimators" / name
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--updates",
                               str(args.updates), "--out", str(out)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results.append(summary(name, out))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n| estimator | gold gain | proxy gain | KL (nats) | distinct-2 vs start | s/update | peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['estimator']} | {r['gold_gain']:+.3f} | {r['proxy_gain']:+.3f} | {r['kl']:.2f} | "
              f"{r['distinct_2']:.2f} | {r['s_per_update']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
