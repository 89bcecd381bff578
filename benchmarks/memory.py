"""Peak resident memory of one whole PPO update on SmolLM2-135M, per placement, side by side.

    .venv/bin/python benchmarks/memory.py [--base runs/demo-smollm2/base] [--batch 16] [--response 48]

Each configuration runs in a fresh process (peak RSS only ever grows within one), on the same
prompts, batch and lengths, and reports the peak resident memory of: loading its models plus
whole PPO updates — rollout (generation), scoring by all four roles, optimisation — or, for
the yardstick, plain LoRA SFT steps on sequences of the same size. `--updates 2` (the default)
measures a steady-state update: AdamW creates its state at the first step, so only from the
second update on does the backward pass run with optimizer state resident, as it does for the
whole of a real run. Printed: every peak, the
two ratios the design is held to (shared_base / LoRA SFT <= 1.3, shared_base / separate <= 0.5),
and what each memory/compute lever (gradient checkpointing, adapters on the top blocks only)
does to memory and to the time of the update.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_resident_mb  # noqa: E402  (a sibling script's helper)

ROOT = Path(__file__).resolve().parents[1]


def prompts_file(root: Path, batch: int) -> Path:
    from tether.pipelines.demo_smollm2 import chat_prompt

    openings = ["The film was", "This movie is", "The actors were", "Last night the", "The story of",
                "The director has", "The new album", "In the end"]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": chat_prompt(openings[i % len(openings)])}) + "\n"
                            for i in range(batch)))
    return path


def reward_models(base: Path, root: Path) -> dict[str, Path]:
    """A full reward model (for separate) and a LoRA reward adapter (for shared_base), untrained:
    memory does not depend on what the weights hold."""
    from transformers import AutoModelForSequenceClassification

    from tether.lora import LoraSettings, build_lora_reward_model
    from tether.models import load_causal_lm, load_tokenizer

    full, lora = root / "rm_full", root / "rm_lora"
    tokenizer = load_tokenizer(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(full)
    tokenizer.save_pretrained(full)
    build_lora_reward_model(load_causal_lm(str(base)), LoraSettings(rank=16, alpha=32, top_layers=8)).save_pretrained(lora)
    tokenizer.save_pretrained(lora)
    return {"full": full, "lora": lora}


def child(spec: dict) -> dict:
    """One configuration in this process: load, one update (or SFT step), peak RSS."""
    import torch

    from tether.pipelines.stage import return_freed_memory_to_os

    torch.set_num_threads(spec["threads"])
    if spec["release_memory"]:  # the same allocator setting for every configuration, the yardstick too
        return_freed_memory_to_os()
    start_mb = peak_resident_mb()
    if spec["kind"] == "sft":
        return {**sft_step(spec), "import_mb": start_mb, "peak_mb": peak_resident_mb()}
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    values = dict(policy=spec["base"], prompts=spec["prompts"], reward_model=spec["reward_model"],
                  output_dir=spec["out"], batch_size=spec["batch"], num_minibatches=1, ppo_epochs=1,
                  max_new_tokens=spec["response"], total_updates=spec["updates"], progress=False, seed=0, temperature=1.0,
                  num_threads=spec["threads"], release_memory=spec["release_memory"], **spec["options"])
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values))
    load_mb = peak_resident_mb()
    for _ in range(spec["updates"]):  # the last one is timed
        t0 = time.perf_counter()
        metrics = trainer.step()
    return {"import_mb": start_mb, "load_mb": load_mb, "peak_mb": peak_resident_mb(), "update_s": time.perf_counter() - t0,
            "generate_s": metrics["time/generate_s"], "score_s": metrics["time/score_s"],
            "train_s": metrics["time/train_s"], "response_length": metrics["response/length"]}


def sft_step(spec: dict) -> dict:
    """LoRA SFT steps (forward, backward, AdamW) on batch x (prompt + response) tokens; the last is timed."""
    import torch

    from tether.algo import lm_loss
    from tether.lora import LoraSettings, add_lora
    from tether.models import load_causal_lm

    model = add_lora(load_causal_lm(spec["base"]), LoraSettings(rank=16, alpha=32, top_layers=spec["sft_layers"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (spec["batch"], spec["sequence"]))
    mask = torch.ones_like(ids)
    for _ in range(spec["updates"]):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        loss.backward()
        optimizer.step()
    return {"update_s": time.perf_counter() - t0}


CONFIGS = {
    "LoRA SFT step (yardstick)": {"kind": "sft", "sft_layers": 0},
    "separate (4 full models)": {"kind": "ppo", "reward": "full", "options": {}},
    "shared_base, adapters on all 30 blocks": {"kind": "ppo", "reward": "lora", "options": dict(
        placement="shared_base", lora_rank=16, lora_alpha=32.0)},
    "shared_base + gradient checkpointing": {"kind": "ppo", "reward": "lora", "options": dict(
        placement="shared_base", lora_rank=16, lora_alpha=32.0, gradient_checkpointing=True)},
    "shared_base, adapters on the top 8 blocks": {"kind": "ppo", "reward": "lora", "options": dict(
        placement="shared_base", lora_rank=16, lora_alpha=32.0, lora_layers=8)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/demo-smollm2/base", help="SmolLM2 safetensors directory "
                        "(converted from the packaged GGUF file when missing)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response", type=int, default=48)
    parser.add_argument("--updates", type=int, default=2, help="updates (SFT steps) per configuration; the "
                        "peak covers all of them, the time is the last one's")
    parser.add_argument("--release-memory", action="store_true", help="run every configuration with "
                        "release_memory=true (glibc returns freed blocks of >= 1 MiB to the OS)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = Path(args.base)
    if not (base / "config.json").is_file():
        from tether.pipelines.demo_smollm2 import stage_base

        base = stage_base(base.parent)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts, rewards = prompts_file(root, args.batch), reward_models(base, root)
        results = {}
        for name, config in CONFIGS.items():
            spec = dict(config, base=str(base), prompts=str(prompts), batch=args.batch, response=args.response,
                        threads=args.threads, updates=args.updates, release_memory=args.release_memory, out=str(root / f"run{len(results)}"),
                        sequence=40 + args.response, reward_model=str(rewards.get(config.get("reward"), "")))
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:45s} peak {results[name]['peak_mb']:7.0f} MB  time {results[name]['update_s']:6.1f} s",
                  flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    sft = results["LoRA SFT step (yardstick)"]["peak_mb"]
    separate = results["separate (4 full models)"]["peak_mb"]
    print(f"\nSmolLM2-135M, batch {args.batch}, prompts ~40 tokens, up to {args.response} new tokens, "
          f"{args.threads} threads, fp32, release_memory={args.release_memory}; peak resident memory of load + "
          f"{args.updates} whole update(s) (process baseline "
          f"~{results['separate (4 full models)']['import_mb']:.0f} MB after imports)\n")
    print(f"| configuration | peak RSS (MB) | / LoRA SFT | / separate | update (s) | generate | score | train |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        phases = (f"{r['generate_s']:.1f} | {r['score_s']:.1f} | {r['train_s']:.1f}" if "train_s" in r
                  else "– | – | –")
        print(f"| {name} | {r['peak_mb']:.0f} | {r['peak_mb'] / sft:.2f} | {r['peak_mb'] / separate:.2f} | "
              f"{r['update_s']:.1f} | {phases} |")
    shared = results["shared_base, adapters on all 30 blocks"]["peak_mb"]
    print(f"\nshared_base / LoRA SFT step = {shared / sft:.2f} (target <= 1.3); "
          f"shared_base / separate = {shared / separate:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
