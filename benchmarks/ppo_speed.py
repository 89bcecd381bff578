"""tether against TRL 1.12's PPOTrainer on identical work, side by side, with the compute bound.

    .venv/bin/python benchmarks/ppo_speed.py [--rows tiny-b8,tiny-b32,gpt2-10m,smollm2] [--updates 3] [--repeats 2]

TRL 1.12.0 is the last TRL release with PPO (`trl.experimental.ppo.PPOTrainer`). It runs from its
own virtual environment (`.venv-trl`, created by this script on first use with the same torch and
transformers as tether's; never part of tether's install). For each row both tools get:

- the same model configs and initial weights (policy; reference = a copy of it; reward model and
  value model = one randomly initialised sequence classifier each, saved once and loaded by both;
  tether's critic takes the value model's backbone with a zero-initialised value head, as it does
  for any critic path, so its first value losses are smaller than TRL's);
- the same word-level tokenizer and prompts (4-12 words), batch, 4 PPO epochs, 1 minibatch, fp32,
  thread count, temperature, KL coefficient and clip ranges;
- the same number of generated tokens: TRL never stops at EOS (stop_token=None), tether is given
  min_new_tokens = max_new_tokens, so every response has exactly R tokens in both.

Each tool runs in a fresh process per repeat, the two alternating (tether, TRL, tether, TRL, ...);
the first update of each process is warm-up and not counted. (tether moves the first optimizer
step's policy and critic forwards into scoring, `reuse_scoring_forward`: its score phase does more
than the bound counts for it and its train phase less; the whole-update row compares like with like.) Printed per row: seconds per update by
phase (generate, score, train) for both, tether's speed-up, the first update's losses of both, and
a compute bound: the matmul FLOPs each phase needs at the fp32 matmul rate measured in the same run
at the row's thread count, and achieved/bound.

The SmolLM2-135M-Instruct row (batch 16, 48 new tokens) uses LoRA where both support it: the policy
adapter (rank 16, top 8 blocks, the same modules in both); TRL's critic and reward model are full
models (its PPO trainer cannot put them on adapters), tether's are adapters on the one base
(placement=shared_base).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl"
TRL_VERSION = "1.12.0"

ROWS = {
    "tiny-b8": dict(hidden=64, layers=2, heads=4, batch=8, response=16, threads=1),
    "tiny-b32": dict(hidden=64, layers=2, heads=4, batch=32, response=53, threads=1),
    "gpt2-10m": dict(hidden=384, layers=6, heads=6, batch=32, response=64, threads=2),
    "smollm2": dict(batch=16, response=48, threads=2, smollm2=True),
}
VOCAB = 320  # word-level: the builtin corpus's words plus filler words
COMMON = dict(temperature=0.7, kl_coef=0.05, vf_coef=0.1, clip=0.2, value_clip=0.2, epochs=4, lr=3e-6, seed=0)
LORA = dict(rank=16, alpha=32, top_layers=8)


# --- shared artifacts: tokenizer, prompts, initial weights ---------------------------------------


def word_tokenizer(directory: Path):
    """A word-level tokenizer (EOS, pad, unk, the corpus's words, fillers), left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tether.tiny import builtin_corpus

    words = sorted({w for line in builtin_corpus(400) for w in line.replace(".", " .").split()})
    vocab = ["<eos>", "<pad>", "<unk>", *words]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<eos>", padding_side="left")
    tokenizer.save_pretrained(directory)
    return tokenizer


def prompt_texts(count: int = 256, seed: int = 0) -> list[str]:
    """Prompts of 4-12 words cut from the builtin corpus."""
    from tether.tiny import builtin_corpus

    rng = random.Random(seed)
    words = " ".join(builtin_corpus(400)).replace(".", " .").split()
    out = []
    for _ in range(count):
        start, length = rng.randrange(len(words) - 12), rng.randint(4, 12)
        out.append(" ".join(words[start : start + length]))
    return out


def gpt2_row(directory: Path, row: dict) -> dict:
    """Tokenizer, prompts and the initial weights of policy, reward and value model, saved once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    tokenizer = word_tokenizer(directory / "tokenizer")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=row["hidden"], n_layer=row["layers"], n_head=row["heads"],
                        n_positions=128, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory / "policy")
    config.num_labels = 1
    for seed, name in ((1, "reward"), (2, "value")):
        torch.manual_seed(seed)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(directory / name)
    for name in ("policy", "reward", "value"):
        tokenizer.save_pretrained(directory / name)
    write_prompts(directory, prompt_texts())
    return dict(tokenizer=str(directory / "tokenizer"), policy=str(directory / "policy"),
                reward=str(directory / "reward"), value=str(directory / "value"))


def smollm2_row(directory: Path, base: Path) -> dict:
    """SmolLM2's converted base; a full reward/value classifier for TRL, a LoRA reward adapter for tether."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory import reward_models

    from tether.pipelines.demo_smollm2 import chat_prompt
    from tether.models import load_tokenizer

    if not (base / "config.json").is_file():
        from tether.pipelines.demo_smollm2 import stage_base

        base = stage_base(base.parent)
    rewards = reward_models(base, directory)
    tokenizer = load_tokenizer(str(base))
    texts = [tokenizer.apply_chat_template(chat_prompt(t), tokenize=False, add_generation_prompt=True)
             for t in prompt_texts(64)]
    write_prompts(directory, texts)
    return dict(tokenizer=str(base), policy=str(base), reward=str(rewards["full"]), value=str(rewards["full"]),
                lora_reward=str(rewards["lora"]))


def write_prompts(directory: Path, texts: list[str]) -> None:
    (directory / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))


# --- workers: one tool, one process ------------------------------------------------------------


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def tether_worker(spec: dict) -> dict:
    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    c = COMMON
    values = dict(policy=spec["policy"], tokenizer=spec["tokenizer"], prompts=spec["prompts"],
                  output_dir=spec["out"], batch_size=spec["batch"], num_minibatches=1, ppo_epochs=c["epochs"],
                  max_new_tokens=spec["response"], min_new_tokens=spec["response"], total_updates=spec["updates"],
                  temperature=c["temperature"], kl_coef=c["kl_coef"], vf_coef=c["vf_coef"], clip_eps=c["clip"],
                  value_clip_eps=c["value_clip"], learning_rate=c["lr"], seed=c["seed"], progress=False,
                  num_threads=spec["threads"], reward_append_eos=False, max_prompt_length=spec["max_prompt"],
                  sample_every=1000)
    if spec.get("smollm2"):
        values.update(placement="shared_base", lora_rank=LORA["rank"], lora_alpha=float(LORA["alpha"]),
                      lora_layers=LORA["top_layers"], reward_model=spec["lora_reward"])
    else:
        values.update(reward_model=spec["reward"], critic=spec["value"])
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values))  # sets num_threads itself
    updates, first = [], {}
    for index in range(spec["updates"]):
        m = trainer.step()
        updates.append(dict(generate=m["time/generate_s"], score=m["time/score_s"], train=m["time/train_s"],
                            total=m["time/update_s"], response_tokens=m["response/length"]))
        if index == 0:
            first = {"policy_loss": m["policy/loss"], "value_loss": m["value/loss"], "kl": m["kl/mean"],
                     "prompt_tokens": sum(map(len, trainer.prompts)) / len(trainer.prompts)}
    return dict(updates=updates, first=first)


def trl_worker(spec: dict) -> dict:
    """TRL's own PPOTrainer; its phases are timed by wrapping its module-level helpers."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    set_threads(spec["threads"])
    c = COMMON
    torch.manual_seed(c["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"], padding_side="left")
    texts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines()]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-spec["max_prompt"]:] for t in texts]
    dataset = Dataset.from_dict({"input_ids": ids})
    marks = {"generate": [], "scored": [], "step_end": []}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            marks[key].append((t0, time.perf_counter()))
            return out
        return wrapper

    trl_ppo.batch_generation = timed(trl_ppo.batch_generation, "generate")
    trl_ppo.get_reward = timed(trl_ppo.get_reward, "scored")
    logs = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            marks["step_end"].append(time.perf_counter())

        def on_step_end(self, *_a, **_k):
            marks["step_end"].append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs_=None, **kwargs):
            logs.append(dict(kwargs.get("logs") or logs_ or {}))

    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    peft_config, reference = None, None
    if spec.get("smollm2"):
        from peft import LoraConfig

        layers = policy.config.num_hidden_layers
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"],
                                 layers_to_transform=list(range(layers - LORA["top_layers"], layers)))
    else:
        reference = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["value"], num_labels=1, dtype=torch.float32)
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id
    args = PPOConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=c["epochs"], total_episodes=spec["batch"] * spec["updates"],
                     response_length=spec["response"], stop_token=None, temperature=c["temperature"],
                     learning_rate=c["lr"], kl_coef=c["kl_coef"], vf_coef=c["vf_coef"], cliprange=c["clip"],
                     cliprange_value=c["value_clip"], local_rollout_forward_batch_size=spec["batch"],
                     num_sample_generations=0, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                     bf16=False, fp16=False, seed=c["seed"], disable_tqdm=True, missing_eos_penalty=None)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset.select(range(spec["batch"])),
                         peft_config=peft_config, callbacks=[Marks()])
    set_threads(spec["threads"])  # the Trainer and accelerate may change it
    trainer.train()
    updates = []
    for k in range(spec["updates"]):
        start, end = marks["step_end"][k], marks["step_end"][k + 1]
        gen_start, gen_end = marks["generate"][k]
        scored = max(t1 for t0, t1 in marks["scored"] if gen_end <= t0 < end)
        updates.append(dict(generate=gen_end - gen_start, score=scored - gen_end, train=end - scored,
                            total=end - start, response_tokens=float(spec["response"])))
    first = next(log for log in logs if "loss/policy_avg" in log)
    prompt_tokens = sum(len(i) for i in ids) / len(ids)
    return dict(updates=updates, first={"policy_loss": first["loss/policy_avg"], "value_loss": first["loss/value_avg"],
                                        "kl": first["objective/kl"], "prompt_tokens": prompt_tokens})


# --- the TRL environment ------------------------------------------------------------------------


def ensure_trl_venv() -> Path:
    """`.venv-trl` with trl==1.12.0 on the same torch / transformers / peft / accelerate as tether's."""
    python = TRL_VENV / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", "import trl.experimental.ppo"],
                                           capture_output=True).returncode == 0:
        return python
    import accelerate
    import peft
    import torch
    import transformers

    print(f"creating {TRL_VENV} (trl=={TRL_VERSION}; once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *links]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}", f"transformers=={transformers.__version__}",
                    f"peft=={peft.__version__}", f"accelerate=={accelerate.__version__}", "datasets", "pandas"],
                   check=True)
    return python


# --- compute bound ------------------------------------------------------------------------------


def matmul_gflops(threads: int, repeats: int = 5) -> float:
    """The best fp32 matmul rate at this thread count, over square and tall GEMMs in both layouts a
    backward pass uses (A @ B and A.T @ B): the highest rate this machine shows now, so no phase
    can beat the bound by running its matmuls at a better shape than the one measured."""
    import torch

    torch.set_num_threads(threads)
    best_rate = 0.0
    for m, k, n, transposed in ((1024, 1024, 1024, False), (2048, 1024, 1024, False), (4096, 512, 2048, False),
                                (1024, 4096, 1024, True), (2048, 2048, 512, True)):
        a = torch.randn(k, m).t() if transposed else torch.randn(m, k)
        b = torch.randn(k, n)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best_rate


def phase_flops(dims: dict, batch: int, prompt: float, response: int, lora_top: int = 0) -> dict[str, float]:
    """Matmul FLOPs each phase needs (weights and attention; elementwise work not counted).

    Per token a block costs 2·P_block forward (P_block = its weight count) plus 4·d·context for the
    attention scores and their weighted sum; the LM head 2·d·V, needed only at response positions.
    generate: one forward per new token (KV cache); score: policy, reference, critic and reward
    over prompt + response; train: per epoch forward + backward (3x forward) of policy and critic.
    With LoRA on the top `lora_top` blocks (shared base) the blocks below run once per rollout for
    every role and never in the epochs, and the frozen weights need no weight gradient (2x forward)."""
    layers, d, vocab, p_block = dims["layers"], dims["hidden"], dims["vocab"], dims["block_params"]
    seq = prompt + response
    tokens = batch * seq
    block_token = 2 * p_block + 4 * d * seq / 2  # mean context over the sequence
    head = 2 * d * vocab * batch * response
    generate = batch * response * (layers * (2 * p_block + 4 * d * (prompt + response / 2)) + 2 * d * vocab) \
        + batch * prompt * layers * block_token  # the prompt's forward fills the cache
    if lora_top:
        lower, upper = layers - lora_top, lora_top
        score = tokens * block_token * (lower + 4 * upper) + 2 * head
        train = dims["epochs"] * (2 * tokens * block_token * upper * 2 + 2 * head)
    else:
        score = 4 * tokens * block_token * layers + 2 * head
        train = dims["epochs"] * 3 * (2 * tokens * block_token * layers + head)
    return {"generate": generate, "score": score, "train": train}


def model_dims(policy_dir: str) -> dict:
    config = json.loads((Path(policy_dir) / "config.json").read_text())
    d = config.get("n_embd") or config["hidden_size"]
    layers = config.get("n_layer") or config["num_hidden_layers"]
    if "n_embd" in config:
        block = 12 * d * d
    else:
        kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
        block = 2 * d * d + 2 * d * kv + 3 * d * config["intermediate_size"]
    return {"layers": layers, "hidden": d, "vocab": config["vocab_size"], "block_params": block,
            "epochs": COMMON["epochs"]}


# --- the run --------------------------------------------------------------------------------------


def run_worker(python: str, tool: str, spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    if tool == "trl":
        env.pop("PYTHONPATH", None)
    out = subprocess.run([python, __file__, "--worker", tool, json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if out.returncode:
        sys.exit(f"{tool} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_phases(results: list[dict]) -> dict[str, float]:
    """Mean seconds per update by phase, every process's first update left out (warm-up)."""
    counted = [u for r in results for u in r["updates"][1:]]
    return {k: sum(u[k] for u in counted) / len(counted) for k in ("generate", "score", "train", "total",
                                                                     "response_tokens")}


def bench_row(name: str, row: dict, args, trl_python: Path, root: Path) -> dict:
    directory = root / name
    directory.mkdir()
    paths = smollm2_row(directory, Path(args.base)) if row.get("smollm2") else gpt2_row(directory, row)
    spec = dict(paths, prompts=str(directory / "prompts.jsonl"), batch=row["batch"], response=row["response"],
                threads=row["threads"], updates=args.updates + 1, max_prompt=64, smollm2=row.get("smollm2", False))
    runs = {"tether": [], "trl": []}
    for repeat in range(args.repeats):
        for tool, python in (("tether", sys.executable), ("trl", str(trl_python))):
            result = run_worker(python, tool, dict(spec, out=str(directory / f"{tool}{repeat}")))
            runs[tool].append(result)
            phases = mean_phases([result])
            print(f"  {name} {tool:6s} repeat {repeat}: {phases['total']:.3f} s/update "
                  f"(generate {phases['generate']:.3f}, score {phases['score']:.3f}, train {phases['train']:.3f})",
                  flush=True)
    prompt = runs["tether"][0]["first"]["prompt_tokens"]
    flops = phase_flops(model_dims(paths["policy"]), row["batch"], prompt, row["response"],
                        LORA["top_layers"] if row.get("smollm2") else 0)
    return dict(tether=mean_phases(runs["tether"]), trl=mean_phases(runs["trl"]), flops=flops,
                gflops=matmul_gflops(row["threads"]), first={k: v[0]["first"] for k, v in runs.items()},
                prompt_tokens={k: v[0]["first"]["prompt_tokens"] for k, v in runs.items()}, row=row)


def report(results: dict) -> None:
    print("\n| row | tool | generate (s) | score (s) | train (s) | update (s) | tokens/response | tether speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        for tool in ("trl", "tether"):
            p = r[tool]
            speedup = f"**{r['trl']['total'] / r['tether']['total']:.2f}x**" if tool == "tether" else ""
            print(f"| {name} | {'TRL 1.12' if tool == 'trl' else 'tether'} | {p['generate']:.3f} | {p['score']:.3f} | "
                  f"{p['train']:.3f} | {p['total']:.3f} | {p['response_tokens']:.1f} | {speedup} |")
    print("\nCompute bound (matmul FLOPs of each phase at the fp32 matmul rate measured in this run):")
    print("| row | matmul GFLOP/s | phase | GFLOP | bound (s) | TRL achieved/bound | tether achieved/bound |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        flops = dict(r["flops"], total=sum(r["flops"].values()))  # total: the whole update
        for phase in ("generate", "score", "train", "total"):
            bound = flops[phase] / (r["gflops"] * 1e9)
            print(f"| {name} | {r['gflops']:.0f} | {'whole update' if phase == 'total' else phase} | "
                  f"{flops[phase] / 1e9:.1f} | {bound:.3f} | {bound / r['trl'][phase]:.0%} | "
                  f"{bound / r['tether'][phase]:.0%} |")
    print("\nFirst update (losses as each tool reports them; same initial weights, different random samples):")
    for name, r in results.items():
        t, l = r["first"]["tether"], r["first"]["trl"]
        same_prompts = abs(r["prompt_tokens"]["tether"] - r["prompt_tokens"]["trl"]) < 0.01
        a, b = t["policy_loss"], l["policy_loss"]
        comparable = a * b > 0 and 0.5 <= a / b <= 2  # same sign, within 2x: different samples, same objective
        print(f"  {name}: policy loss tether {a:+.4f} / TRL {b:+.4f} ({'comparable' if comparable else 'NOT COMPARABLE'}); value loss "
              f"tether {t['value_loss']:.4f} / TRL {l['value_loss']:.4f}; KL tether {t['kl']:.3f} / TRL {l['kl']:.3f}; "
              f"prompt tokens {t['prompt_tokens']:.2f} / {l['prompt_tokens']:.2f} ({'same' if same_prompts else 'DIFFER'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per tool and row, alternating")
    parser.add_argument("--base", default="runs/demo-smollm2/base", help="SmolLM2 safetensors directory "
                        "(converted from the packaged GGUF file when missing)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, spec = args.worker[0], json.loads(args.worker[1])
        print(json.dumps((tether_worker if tool == "tether" else trl_worker)(spec)))
        return
    trl_python = ensure_trl_venv()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows.split(","):
            print(f"{name}: {ROWS[name]}", flush=True)
            results[name] = bench_row(name, ROWS[name], args, trl_python, Path(tmp))
    report(results)


if __name__ == "__main__":
    main()
