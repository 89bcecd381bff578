"""PPO with a critic (GAE) against the critic-free estimators, side by side on the demo.

    .venv/bin/python benchmarks/estimators.py [--model toy|smollm2] [--updates N] [--only gae,grpo,...]

`--model toy` (default): the demo's SFT policy and reward model (`runs/demo`, built by `make demo`;
built here if absent) and its PPO settings: 64 responses per update (GAE: 64 prompts x 1; the group
estimators: 16 prompts x 4 samples), 20 new tokens, 4 PPO epochs, 2 minibatches, PPO-ptx, the same
learning rate, entropy bonus and KL coefficient; 32 updates.

`--model smollm2`: the SmolLM2-135M-Instruct demo (`runs/demo-smollm2`, `make demo-smollm2`; its
cached stages are built here if absent) with its PPO settings: LoRA on the top 8 blocks,
placement=shared_base, 16 responses per update (GAE: 16 prompts x 1; the group estimators: 4 prompts
x 4 samples), 32 new tokens, 4 PPO epochs, 1 minibatch, adaptive KL toward 2 nats; the demo's 36
updates (18 measured too little: GAE gained +0.085 gold at 0.28 nats, since the adaptive KL starts at
beta 0.2), evaluated on 64 held-out prompts. About 15 minutes per estimator here: run them a few at
a time with --only (each run directory is kept).

Each estimator runs with the loss and KL handling it is published with:

  gae                    KL (k1) in the reward, token-mean loss, a critic (the demo as it is)
  grpo                   KL (k3) in the loss, mean per response then over responses
  dr_grpo                KL (k1) in the reward, sum / (responses x max_new_tokens)
  rloo                   KL (k1) in the reward, token-mean loss
  reinforce_pp           KL (k1) in the reward, returns-to-go whitened over the batch
  reinforce_pp_baseline  the same after subtracting each group's mean score

Each run is a fresh process. Printed per estimator, on the demo's held-out prompts: gold
(VADER) gain from update 0 to the end, KL to the reference at the end, distinct-2 at the end
relative to update 0, gold gain per √KL (Gao et al. 2022: early in optimisation gold grows like
√KL, so this compares runs that moved different distances), proxy gain, the median seconds per
update (a neighbour's burst on a shared machine moves the mean, not the median), and the process's
peak resident memory. `--reuse` summarises runs that already finished instead of rerunning them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_resident_mb  # noqa: E402  (a sibling script's helper)

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"toy": ROOT / "runs" / "demo", "smollm2": ROOT / "runs" / "demo-smollm2"}
DEFAULT_UPDATES = {"toy": 32, "smollm2": 36}
# Group estimators sample each prompt this often; they get batch/GROUP_SIZE prompts (equal responses).
GROUP_SIZE = 4
ESTIMATORS = {
    "gae": dict(),
    "grpo": dict(kl_placement="loss", kl_estimator="k3", loss_aggregation="seq_mean_token_mean"),
    "dr_grpo": dict(loss_aggregation="seq_mean_token_sum_norm"),
    "rloo": dict(),
    "reinforce_pp": dict(),
    "reinforce_pp_baseline": dict(),
}
CRITIC_KEYS = ("critic_learning_rate", "vf_coef")  # settings of the critic that critic-free runs drop


def toy_ppo_values() -> dict:
    """The toy demo's PPO settings over its corpus, SFT model and reward model (built when missing)."""
    from tether.pipelines.demo import DemoSettings, stage_corpus, stage_preferences, stage_reward, stage_sft

    run, settings = RUNS["toy"], DemoSettings()
    files = stage_corpus(run)
    stage_sft(run, files, settings)
    stage_preferences(run, files, settings)
    stage_reward(run, files, settings)
    return dict(settings.ppo, policy=str(run / "sft" / "final"), reward_model=str(run / "reward" / "final"),
                prompts=str(files["prompts"]), eval_prompts=str(files["eval_prompts"]),
                ptx_data=str(files["sft_text"]) if settings.ppo_ptx else None)


def smollm2_ppo_values() -> dict:
    """The SmolLM2 demo's PPO settings over its base, prompts and LoRA reward model (built when missing)."""
    from tether.pipelines.demo_smollm2 import SmolSettings, stage_base, stage_preferences, stage_prompts, stage_reward

    run, settings = RUNS["smollm2"], SmolSettings()
    run.mkdir(parents=True, exist_ok=True)
    base = stage_base(run)
    files = stage_prompts(run)
    stage_preferences(run, base, files, settings)
    stage_reward(run, base, files, settings)
    return dict(settings.ppo, **settings.lora, placement="shared_base", policy=str(base),
                reward_model=str(run / "reward" / "final"), prompts=str(files["prompts"]),
                eval_prompts=str(files["eval_prompts"]), max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature)


def demo_ppo_values(model: str) -> dict:
    from tether.pipelines.stage import set_threads

    set_threads(0)
    return toy_ppo_values() if model == "toy" else smollm2_ppo_values()


def estimator_values(base: dict, name: str) -> dict:
    """The demo's PPO settings for one estimator: same responses per update, its published options."""
    values = dict(base, advantage_estimator=name, **ESTIMATORS[name])
    if name != "gae":
        values.update(batch_size=base["batch_size"] // GROUP_SIZE, samples_per_prompt=GROUP_SIZE)
        for key in CRITIC_KEYS:
            values.pop(key, None)
    return values


def worker(model: str, name: str, updates: int, out: Path) -> None:
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    values = dict(estimator_values(demo_ppo_values(model), name), output_dir=str(out), seed=0, overwrite=True,
                  gold_reward_fn="tether.pipelines.demo:vader_compound", progress=False,
                  total_updates=updates, eval_every=updates)
    build_ppo_trainer(config_from_dict(PPOConfig, values)).train()
    (out / "peak.json").write_text(json.dumps({"peak_mb": peak_resident_mb()}))


def summary(name: str, out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gold" in r]
    updates = [r for r in rows if "time/update_s" in r]
    first, last = evals[0], evals[-1]
    return {"estimator": name, "gold_gain": last["eval/gold"] - first["eval/gold"],
            "proxy_gain": last["eval/score"] - first["eval/score"], "kl": last["eval/kl"],
            "distinct_2": last["eval/distinct_2"] / first["eval/distinct_2"],
            "s_per_update": statistics.median(r["time/update_s"] for r in updates[1:] or updates),
            "peak_mb": json.loads((out / "peak.json").read_text())["peak_mb"]}


def run_worker(script: Path, name: str, args: list[str]) -> None:
    """`script args` in a fresh process (its own peak memory, no state carried between runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(Path(script).resolve()), *args], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RUNS), default="toy")
    parser.add_argument("--updates", type=int, help="PPO updates per estimator (toy 32, smollm2 36)")
    parser.add_argument("--only", default=",".join(ESTIMATORS), help="comma-separated estimators")
    parser.add_argument("--reuse", action="store_true", help="summarise runs already finished instead of rerunning")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    updates = args.updates or DEFAULT_UPDATES[args.model]
    if args.worker:
        return worker(args.model, args.worker, updates, Path(args.out))
    demo_ppo_values(args.model)  # the cached stages, once, before the timed runs
    results = []
    for name in args.only.split(","):
        out = RUNS[args.model] / "estimators" / name
        if not (args.reuse and (out / "peak.json").exists()):
            run_worker(Path(__file__), name, ["--model", args.model, "--worker", name, "--updates", str(updates),
                                              "--out", str(out)])
        results.append(summary(name, out))
        print(json.dumps(results[-1]), flush=True)
    print("\n| estimator | gold gain | proxy gain | KL (nats) | gold / √KL | distinct-2 vs start | s/update | peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        per_root_kl = r["gold_gain"] / r["kl"] ** 0.5 if r["kl"] > 0 else float("nan")
        print(f"| {r['estimator']} | {r['gold_gain']:+.3f} | {r['proxy_gain']:+.3f} | {r['kl']:.2f} | "
              f"{per_root_kl:+.3f} | {r['distinct_2']:.2f} | {r['s_per_update']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
