"""The training doctor on four seeded runs of the demo, three of them deliberately mis-configured.

    .venv/bin/python benchmarks/doctor.py [--model smollm2|toy] [--updates N] [--only a_hacking,...]

Each run is a fresh process on the demo's PPO settings (`--model smollm2`: the SmolLM2-135M-Instruct
demo, LoRA on one shared base, its cached stages built when missing; `--model toy`: the toy demo)
with one mistake:

  a_hacking   kl_coef=0 (no adaptive KL) and 5x the demo's learning rate
  b_stalled   learning_rate=1e-9
  c_unstable  clip_eps=10 and 5x the demo's learning rate
  d_healthy   the demo's settings

Printed per run: the findings the live run printed (its doctor.jsonl), whether `tether doctor RUN_DIR`
finds the same ones again from the run directory, the gold gain, KL and distinct-2 of the held-out
evaluation at the end, and one held-out response of a_hacking beside d_healthy's for the same prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimators import RUNS, demo_ppo_values, run_worker  # noqa: E402  (the demo's settings, its stages)

DEFAULT_UPDATES = {"toy": 20, "smollm2": 16}  # reward_flat needs 15 flat updates


def mistakes(base: dict) -> dict[str, dict]:
    large = 5 * base["learning_rate"]
    return {
        "a_hacking": dict(kl_coef=0.0, adaptive_kl=False, learning_rate=large),
        "b_stalled": dict(learning_rate=1e-9),
        "c_unstable": dict(clip_eps=10.0, learning_rate=large),
        "d_healthy": dict(),
    }


def worker(model: str, name: str, updates: int, out: Path) -> None:
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    base = demo_ppo_values(model)
    values = dict(base, **mistakes(base)[name], output_dir=str(out), seed=0, overwrite=True, progress=False,
                  gold_reward_fn="tether.pipelines.demo:vader_compound", total_updates=updates, eval_every=updates)
    build_ppo_trainer(config_from_dict(PPOConfig, values)).train()


def summary(name: str, out: Path) -> dict:
    from tether.doctor import diagnose_run

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gold" in r]
    doctor = out / "doctor.jsonl"
    live = [json.loads(line)["message"] for line in doctor.read_text().splitlines()] if doctor.exists() else []
    replayed = [f.message for f in diagnose_run(out)]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    last = max(s["update"] for s in samples)
    held_out = {s["prompt"]: (s["response"], s["score"], s.get("gold"), s.get("kl")) for s in samples
                if s["update"] == last and s.get("split") == "eval"}
    return {"run": name, "findings": live, "tether_doctor_agrees": replayed == live,
            "gold_gain": evals[-1]["eval/gold"] - evals[0]["eval/gold"], "kl": evals[-1]["eval/kl"],
            "distinct_2": evals[-1]["eval/distinct_2"] / evals[0]["eval/distinct_2"], "held_out": held_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RUNS), default="smollm2")
    parser.add_argument("--updates", type=int, help="PPO updates per run (toy 20, smollm2 16)")
    parser.add_argument("--only", default="a_hacking,b_stalled,c_unstable,d_healthy", help="comma-separated runs")
    parser.add_argument("--reuse", action="store_true", help="summarise runs already finished instead of rerunning")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    updates = args.updates or DEFAULT_UPDATES[args.model]
    if args.worker:
        return worker(args.model, args.worker, updates, Path(args.out))
    demo_ppo_values(args.model)  # the cached stages, once, before the runs
    results = {}
    for name in args.only.split(","):
        out = RUNS[args.model] / "doctor" / name
        if not (args.reuse and (out / "final").exists()):
            run_worker(Path(__file__), name, ["--model", args.model, "--worker", name, "--updates", str(updates),
                                              "--out", str(out)])
        results[name] = summary(name, out)
        r = results[name]
        print(f"\n== {name}: gold {r['gold_gain']:+.3f}, KL {r['kl']:.2f} nats, distinct-2 {r['distinct_2']:.0%} of "
              f"the start; `tether doctor` finds the same: {r['tether_doctor_agrees']}", flush=True)
        for message in r["findings"] or ["(no finding)"]:
            print("  " + message, flush=True)
    if {"a_hacking", "d_healthy"} <= set(results):
        shared = sorted(set(results["a_hacking"]["held_out"]) & set(results["d_healthy"]["held_out"]))
        for prompt in shared[:2]:
            print(f"\nprompt: {prompt!r}")
            for name in ("a_hacking", "d_healthy"):
                response, score, gold, kl = results[name]["held_out"][prompt]
                print(f"  {name}: {response!r} (proxy {score:+.2f}, gold {gold:+.2f}, KL {kl:.1f} nats)")


if __name__ == "__main__":
    main()
