"""PPO updates on 1 and 2 ranks under torchrun (CPU, gloo), side by side, with the time spent in
collectives: what data parallelism (DDP) and FSDP2 cost on top of the work itself.

    .venv/bin/python benchmarks/scaling.py [--updates 3] [--batch 32] [--response 64]

The model is the 10.8M-parameter GPT-2 of benchmarks/ppo_speed.py (6 blocks of 384, word-level
tokenizer, the same prompts; reward model and critic are sequence classifiers of the same shape),
with its settings (4 PPO epochs, one minibatch, fp32, every response exactly `--response` tokens).
Rows, each in fresh processes:

  1 rank         2 threads
  2 ranks, DDP   1 thread each (the machine's 2 cores shared), each rank half the batch
  2 ranks, FSDP2 the same, blocks of policy, critic, reference and reward model sharded

Per row: seconds per update (the first update is warm-up, not counted), response tokens per
second over the whole batch, and the share of an update rank 0 spends inside torch.distributed
collectives (communication plus waiting for the other rank: on one machine with 2 cores the
ranks also compete for memory bandwidth, so the point here is correctness and overhead, not
speed-up). FSDP2's gathers are asynchronous: what counts is the time it waits on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
ROWS = (("1 rank", 1, "ddp"), ("2 ranks, DDP", 2, "ddp"), ("2 ranks, FSDP2", 2, "fsdp2"))
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "all_gather_into_tensor", "reduce_scatter_tensor", "gather_object", "scatter")


class _TimedWork:
    """An asynchronous collective's handle whose wait() is timed."""

    def __init__(self, work, clock: list[float]):
        self._work, self._clock = work, clock

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._clock[0] += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._work, name)


def time_collectives() -> list[float]:
    """Wrap torch.distributed's collectives so the seconds spent in them add up in the returned cell."""
    import torch.distributed as dist

    clock = [0.0]

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - start
            return _TimedWork(result, clock) if kwargs.get("async_op") and result is not None else result
        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, timed(getattr(dist, name)))
    return clock


def worker(spec: dict) -> None:
    """One rank of a row: build the trainer, run the updates, rank 0 writes the figures."""
    clock = time_collectives()
    from ppo_speed import COMMON

    from tether import distributed
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    c = COMMON
    values = dict(policy=spec["policy"], tokenizer=spec["tokenizer"], prompts=spec["prompts"], output_dir=spec["out"],
                  reward_model=spec["reward"], critic=spec["value"], batch_size=spec["batch"], num_minibatches=1,
                  ppo_epochs=c["epochs"], max_new_tokens=spec["response"], min_new_tokens=spec["response"],
                  total_updates=spec["updates"], temperature=c["temperature"], kl_coef=c["kl_coef"],
                  vf_coef=c["vf_coef"], clip_eps=c["clip"], value_clip_eps=c["value_clip"], learning_rate=c["lr"],
                  seed=c["seed"], progress=False, reward_append_eos=False, max_prompt_length=16, sample_every=1000,
                  data_parallel=spec["data_parallel"])
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values))
    updates = []
    for _ in range(spec["updates"]):
        before, start = clock[0], time.perf_counter()
        metrics = trainer.step()
        updates.append(dict(update_s=time.perf_counter() - start, collective_s=clock[0] - before,
                            generate_s=metrics["time/generate_s"], score_s=metrics["time/score_s"],
                            train_s=metrics["time/train_s"], length=metrics["response/length"],
                            loss=metrics["policy/loss"]))
    if distributed.is_main():
        Path(spec["result"]).write_text(json.dumps(updates))
    distributed.shutdown()


def run_row(ranks: int, data_parallel: str, artifacts: dict, args, work: Path) -> list[dict]:
    out = work / f"run-{ranks}-{data_parallel}"
    spec = dict(artifacts, out=str(out), result=str(work / f"result-{ranks}-{data_parallel}.json"),
                batch=args.batch, response=args.response, updates=args.updates + 1, data_parallel=data_parallel)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(2 // ranks)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        first = max(done.stderr.find("Traceback"), 0)
        raise SystemExit(f"{ranks} rank(s), {data_parallel} failed:\n{done.stderr[first : first + 6000]}")
    return json.loads(Path(spec["result"]).read_text())[1:]  # the first update is warm-up


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def report(results: dict[str, list[dict]], batch: int) -> None:
    base = mean(results["1 rank"], "update_s")
    print(f"\n{'row':<16}{'s/update':>10}{'tokens/s':>10}{'vs 1 rank':>11}{'in collectives':>16}"
          f"{'generate':>10}{'score':>8}{'train':>8}")
    for name, rows in results.items():
        update = mean(rows, "update_s")
        tokens = batch * mean(rows, "length") / update
        share = mean(rows, "collective_s") / update
        print(f"{name:<16}{update:>10.2f}{tokens:>10.0f}{base / update:>10.2f}x{share:>15.1%}"
              f"{mean(rows, 'generate_s'):>10.2f}{mean(rows, 'score_s'):>8.2f}{mean(rows, 'train_s'):>8.2f}")
    print("\nfirst measured update's policy loss:", {n: round(r[0]["loss"], 6) for n, r in results.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=2, help="measured updates per row (after one warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    from ppo_speed import ROWS as SPEED_ROWS, gpt2_row

    with tempfile.TemporaryDirectory(prefix="tether-scaling-") as tmp:
        work = Path(tmp)
        artifacts = gpt2_row(work / "model", SPEED_ROWS["gpt2-10m"])
        artifacts["prompts"] = str(work / "model" / "prompts.jsonl")
        print(f"10.8M GPT-2, batch {args.batch} prompts x {args.response} tokens, 4 PPO epochs, "
              f"{args.updates} measured update(s) per row, CPU gloo")
        results = {name: run_row(ranks, dp, artifacts, args, work) for name, ranks, dp in ROWS}
    report(results, args.batch)


if __name__ == "__main__":
    main()
