"""Kill PPO runs at random points (SIGKILL, some inside a checkpoint write), resume them to the
end, and compare with an uninterrupted run: bitwise-equal weights and equal metrics.jsonl
(timings aside), and no checkpoint that fails to load.

    .venv/bin/python benchmarks/chaos.py [--trials 20] [--updates 8] [--seed 0]

Every run is the real CLI in its own process (`python -m tether ppo ... save_every=1`) on a tiny
GPT-2 built here. A trial starts a run, kills it after a random delay (or, in every third trial,
through the fault-injection hook TETHER_FAULT_KILL_IN_SAVE halfway through a random checkpoint
write), checks every checkpoint it left, then resumes with resume=true (overwrite=true when the
kill came before the first checkpoint) until the run completes.

Then two fault-injection cases:
  damaged newest checkpoint  a run killed in its 5th checkpoint write has its newest complete
                             checkpoint truncated; resume=true must refuse it naming the file and the
                             way on (exit 2), and after it is moved aside the run must resume from the
                             previous checkpoint and still end bitwise-identical
  non-finite step            TETHER_FAULT_NONFINITE_STEP makes the 2nd optimizer step of update 3
                             see a non-finite gradient norm: that update must be skipped (counted in
                             ppo/skipped_updates) and its checkpoint must hold exactly the weights of
                             the one before (the update's first step undone)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_assets(root: Path) -> dict[str, Path]:
    from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer

    tokenizer = train_tokenizer(builtin_corpus(400), vocab_size=256)
    model = build_tiny_causal_lm("gpt2", tokenizer, seed=0, hidden=32, layers=2, heads=2)
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(s.split()[:2])}) + "\n"
                               for s in builtin_corpus(64, seed=5)))
    reward = root / "reward.py"
    reward.write_text("def letter_o(responses):\n    return [r.count('o') / max(1, len(r)) for r in responses]\n")
    return {"policy": root / "policy", "prompts": prompts, "reward": reward}


def command(assets: dict, out: Path, updates: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tether", "ppo", f"policy={assets['policy']}", f"prompts={assets['prompts']}",
            f"reward_fn={assets['reward']}:letter_o", f"output_dir={out}", f"total_updates={updates}",
            "save_every=1", "batch_size=8", "num_minibatches=2", "ppo_epochs=2", "max_new_tokens=8",
            "learning_rate=1e-3", "progress=false", "num_threads=1", "seed=0", *extra]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], env: dict | None = None) -> int:
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True).returncode


def fingerprint(run_dir: Path) -> tuple[dict, list]:
    """Final weights (bytes per tensor) and metrics rows without timings."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    weights = {}
    for f in sorted(final.glob("*.safetensors")) + sorted((final / "critic").glob("*.safetensors")):
        weights.update({f"{f.parent.name}/{k}": v.numpy().tobytes() for k, v in load_file(str(f)).items()})
    rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, rows


def corrupt_checkpoints(run_dir: Path) -> int:
    """Checkpoints (complete by their name) whose state or weights do not load."""
    from safetensors.torch import load_file

    from tether.checkpoint import load_trainer_tensors
    from tether.rundir import CHECKPOINT

    bad = 0
    for path in run_dir.iterdir() if run_dir.is_dir() else []:
        if not CHECKPOINT.match(path.name):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
            load_trainer_tensors(path)
            for f in list(path.glob("*.safetensors")) + list((path / "critic").glob("*.safetensors")):
                load_file(str(f))
        except Exception:  # noqa: BLE001 - any failure to load is what is counted
            bad += 1
    return bad


def trial(assets: dict, out: Path, updates: int, rng: random.Random, duration: float, in_save: bool) -> dict:
    env = dict(ENV)
    if in_save:
        env["TETHER_FAULT_KILL_IN_SAVE"] = str(rng.randint(1, updates - 1))
        killed_by = f"fault in save #{env['TETHER_FAULT_KILL_IN_SAVE']}"
        code = run(command(assets, out, updates), env)
    else:
        delay = rng.uniform(0.3, 0.95) * duration
        process = subprocess.Popen(command(assets, out, updates), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        code = process.wait()
        killed_by = f"SIGKILL after {delay:.1f} s"
    corrupt = corrupt_checkpoints(out)
    resumes = 0
    while not (out / "final").is_dir() or code != 0:
        has_checkpoint = any(p.name.startswith("checkpoint-") for p in out.iterdir()) if out.is_dir() else False
        code = run(command(assets, out, updates, "resume=true" if has_checkpoint else "overwrite=true"))
        resumes += 1
        if resumes > 3:
            break
    return {"killed_by": killed_by, "corrupt": corrupt, "resumes": resumes, "finished": code == 0}


def damaged_newest_checkpoint(assets: dict, out: Path, updates: int) -> tuple[bool, str]:
    """(passed, what happened): see the module docstring."""
    env = {**ENV, "TETHER_FAULT_KILL_IN_SAVE": "5"}
    run(command(assets, out, updates), env)
    from tether.rundir import checkpoints

    newest = checkpoints(out)[-1][1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused = subprocess.run(command(assets, out, updates, "resume=true"), env=ENV, capture_output=True, text=True)
    named = refused.returncode == 2 and f"cannot resume from {newest}" in refused.stderr and "mv " in refused.stderr
    newest.rename(newest.with_name(newest.name + ".damaged"))
    finished = run(command(assets, out, updates, "resume=true")) == 0
    return named and finished, f"{newest.name} truncated: refused and named {named}, resumed from the one before {finished}"


def nonfinite_step(assets: dict, out: Path, updates: int) -> tuple[bool, str]:
    """(passed, what happened): see the module docstring. 2 minibatches x 2 epochs = 4 policy steps
    per update, so step 10 is the second step of update 3."""
    from safetensors.torch import load_file

    env = {**ENV, "TETHER_FAULT_NONFINITE_STEP": "10"}
    finished = run(command(assets, out, updates), env) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["update"] for r in rows if "reward/score" not in r]
    before, after = (load_file(str(out / f"checkpoint-{k}" / "model.safetensors")) for k in (2, 3))
    unchanged = before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    moved_on = rows[-1].get("ppo/skipped_updates") == 1.0 and "reward/score" in rows[-1]
    return finished and skipped == [3] and unchanged and moved_on, (
        f"skipped updates {skipped}, checkpoint-3 weights == checkpoint-2 {unchanged}, finished {finished}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = make_assets(root)
        start = time.perf_counter()
        assert run(command(assets, root / "reference", args.updates)) == 0, "the uninterrupted run failed"
        duration = time.perf_counter() - start
        reference = fingerprint(root / "reference")
        identical = corrupt = 0
        for i in range(args.trials):
            out = root / f"trial{i}"
            result = trial(assets, out, args.updates, rng, duration, in_save=(i % 3 == 2))
            same = result["finished"] and fingerprint(out) == reference
            identical += same
            corrupt += result["corrupt"]
            print(f"trial {i + 1:2d}: {result['killed_by']:24s} resumes {result['resumes']}  corrupt checkpoints "
                  f"{result['corrupt']}  {'identical' if same else 'DIFFERENT'}", flush=True)
        print(f"\n{identical}/{args.trials} runs ended bitwise-identical to the uninterrupted run; "
              f"{corrupt} corrupt checkpoints (an uninterrupted run takes {duration:.1f} s)")
        passed, said = damaged_newest_checkpoint(assets, root / "damaged", args.updates)
        same = passed and fingerprint(root / "damaged") == reference
        print(f"damaged newest checkpoint: {said}; bitwise-identical {same}")
        passed, said = nonfinite_step(assets, root / "nonfinite", args.updates)
        print(f"non-finite step: {said}: {'ok' if passed else 'FAILED'}")


if __name__ == "__main__":
    main()
