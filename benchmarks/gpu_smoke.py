"""One-GPU smoke benchmark: every main code path of a PPO update on one card, and how fast a 1B model trains.

On the GPU machine, from the repository root, as one command (nothing is downloaded; no run starts
after `--budget-s`, 420 s on CUDA, and the rest are reported "skipped: time budget"):

    python benchmarks/gpu_smoke.py --out "$OUT"

On CPU (`--device cpu`) it is a dry run of the same code paths on tiny models, to prepare the script:
its numbers are not a measurement (no GPU memory, no host syncs, no 1B model).

Everything is built here: a byte-level BPE trained on tether's built-in corpus (384 tokens), a tiny
Llama and a tiny GPT-2 from configs, a tiny GPT-2 reward model, and, on CUDA with `--big` (the default
there), a Llama-3.2-1B-shaped model with random weights (hidden 2048, 16 blocks, 32 heads / 8 KV heads,
MLP 8192: 0.97e9 parameters in its blocks). Its vocabulary is the local tokenizer's (padded to a multiple
of 64, which 384 already is), so its LM head is negligible (0.08% of the FLOPs) where a real 1B model
with a 128k vocabulary spends ~20% there. The reward is `letter_rate` below (no reward model) except in
the run that exercises one.

Runs, in this order (each a few PPO updates built with `build_ppo_trainer`, in its own run directory;
a failure is reported in its row and the next run goes on):

  1B Llama (CUDA, --big)  bf16-mixed, GAE with a 1B critic, 16 prompts x 128 new tokens, 2 updates; first:
                          the slowest run and the one that measures, so the budget only cuts tiny runs
  fp32                    the tiny Llama, precision=fp32, one minibatch (the first step reuses the scoring forward)
  bf16-mixed, reuse       the same in bf16-mixed: its weight movement is compared with fp32's
  fp32, 2 minibatches     the fp32 twin of the next run (same optimizer steps)
  bf16-mixed, no reuse    reuse_scoring_forward=false, 2 minibatches: the first minibatch is scored again
  shared_base LoRA        placement=shared_base, lora_rank=8, bf16-mixed
  GRPO + stop strings     advantage_estimator=grpo, 4 samples per prompt, stop_strings=["."]
  GPT-2 + reward model    a tiny GPT-2 policy, a tiny reward model (the critic starts from it)
  resume                  2 updates with checkpoints, resumed to 3; compared with 3 updates straight
                          (bitwise equality required on CPU; on CUDA the largest difference is reported)

The tiny runs use precision=auto where none is named (bf16-mixed on CUDA, fp32 on CPU); fp32 runs on
CUDA use TF32 matmuls, tether's default (tf32=true).

Per run: peak GPU memory (max_memory_allocated, reset per run; on CPU the process's VmHWM so far),
the first minibatch's approx-KL and ratio (0 and 1 when training sees the rollout's log-probs), the
policy's weight movement ||w_end - w_start|| and, for bf16-mixed, its ratio to the fp32 twin's (same
start, seed and learning rate; target >= 0.9), host syncs per micro-batch during one optimisation
phase (CUDA: torch.cuda.set_sync_debug_mode("warn")), and seconds per update (median, the first
update left out as warm-up when there are more).

For the 1B model, on its last update: generation tokens/s against the weight-bandwidth bound, and
scoring and training TFLOP/s against the card's bf16 matmul rate, both yardsticks measured in the same
process (a 2 GiB device-to-device copy; 8192 x 8192 bf16 matmuls).

  generate  tokens = B x R (rows x decode steps, prefill included in the time). Every decode step
            reads every block weight once: bound = B x bandwidth / (P x bytes per weight). Under
            bf16-mixed the policy's weights are fp32 (4 B); autocast caches its bf16 casts of leaf
            weights for as long as its region lasts, and the whole rollout is one region, so a step
            may read only the 2-B copies: both bounds are printed.
  score     2 x T x (P_policy + P_reference + P_critic): three forwards over T = B x (prompt + response)
            positions as computed (padding included: the GPU computes it).
  train     ppo_epochs x 6 x T x (P_policy + P_critic) (forward + backward is 3 forwards' worth),
            less the first step's two forwards when it reuses the scoring forward (counted in score).
  P counts the weights of the Linear layers inside the transformer blocks (the matmuls); attention
  scores (~1% here at ~190 positions), norms and the LM head are left out, so the rates are a floor.

Targets: train >= 35% and score >= 40% of the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402  (after the environment above)
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from peak_memory import peak_resident_mb  # noqa: E402  (a sibling script's helper)
from tether.config import PPOConfig, config_from_dict  # noqa: E402
from tether.doctor import DoctorThresholds  # noqa: E402
from tether.pipelines.ppo import build_ppo_trainer  # noqa: E402
from tether.tiny import (  # noqa: E402
    build_tiny_causal_lm,
    build_tiny_reward_model,
    builtin_corpus,
    train_tokenizer,
)

# By module name (benchmarks/ is on sys.path, above): loaded by file path, this module's dataclasses
# would fail, as that loader does not register the module in sys.modules.
REWARD_FN = "gpu_smoke:letter_rate"
BIG_UPDATES = 2  # the first is warm-up (kernels chosen, allocator grown); the second is measured
BIG_BATCH, BIG_NEW_TOKENS = 16, 128
LEARNING_RATE = 1e-5  # realistic: a step this small is what bf16 weights would round away


def letter_rate(responses: list[str]) -> list[float]:
    """A learnable reward with no model: the share of characters that are letters a-z. A random policy
    samples byte tokens and word tokens alike, so the scores differ from the first update on."""
    return [sum("a" <= c <= "z" for c in r) / max(1, len(r)) for r in responses]


# --- what the runs are built from -------------------------------------------------------------------


@dataclass
class Assets:
    root: Path
    tokenizer: object
    llama: Path
    gpt2: Path
    reward_model: Path
    prompts: Path
    big_prompts: Path


def build_assets(root: Path) -> Assets:
    """Tokenizer, tiny models and prompt files in `root` (the 1B model is its run's to build)."""
    # 400 asks for every merge the corpus has (384 tokens): words as well as bytes for the policy to sample.
    tokenizer = train_tokenizer(builtin_corpus(400), vocab_size=400)
    paths = {}
    for arch in ("llama", "gpt2"):
        paths[arch] = save(build_tiny_causal_lm(arch, tokenizer, seed=0), tokenizer, root / arch)
    paths["reward_model"] = save(build_tiny_reward_model("gpt2", tokenizer, seed=1), tokenizer, root / "reward")
    # Prompts are the first words of sentences: the rest is the policy's to write.
    openings = [" ".join(s.split()[:2]) for s in builtin_corpus(64, seed=5)]
    # The 1B run's prompts are longer (~60 tokens): scoring and training then see ~190 positions per row.
    sentences = builtin_corpus(400, seed=7)
    paragraphs = [" ".join(sentences[i * 6 : i * 6 + 6]) for i in range(64)]
    return Assets(root, tokenizer, **paths, prompts=write_prompts(root / "prompts.jsonl", openings),
                  big_prompts=write_prompts(root / "big_prompts.jsonl", paragraphs))


def save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def build_big_llama(tokenizer, device):
    """A Llama-3.2-1B-shaped model with random weights, stored in bf16 (half the bytes to write and read)."""
    vocab = -(-len(tokenizer) // 64) * 64  # padded to a multiple of 64, as real vocabularies are
    config = LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds, where the CPU takes a minute
        model = AutoModelForCausalLM.from_config(config)
    return model.to(torch.bfloat16)


# --- one run ------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    status: str = "ok"
    peak_mb: Optional[float] = None
    first_kl: Optional[float] = None
    first_ratio: Optional[float] = None
    movement: Optional[float] = None
    movement_ratio: Optional[float] = None
    syncs_per_micro: Optional[float] = None
    s_per_update: Optional[float] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Probe:
    """What one optimisation phase showed: its host syncs (CUDA) and the batch's shapes."""
    syncs: Optional[int] = None
    micro_batches: int = 0
    sequence_shape: tuple = ()  # (B, P+R) as computed
    response_shape: tuple = ()  # (B, R): R decode steps


@dataclass
class Trained:
    """A finished run's per-update metrics, what its optimisation showed, how far its policy moved."""
    rows: list[dict]
    probe: Probe
    movement: Optional[float]
    facts: dict = field(default_factory=dict)  # facts_of(trainer)


def base_values(assets: Assets, out: Path, threads: int, **overrides) -> dict:
    """Settings every tiny run shares: batch 8, 8 new tokens, 2 PPO epochs, one seed."""
    values = dict(policy=str(assets.llama), prompts=str(assets.prompts), reward_fn=REWARD_FN, output_dir=str(out),
                  batch_size=8, num_minibatches=1, ppo_epochs=2, max_new_tokens=8, learning_rate=LEARNING_RATE,
                  total_updates=100, progress=False, seed=0, num_threads=threads, sample_every=1)
    values.update(overrides)
    return values


def train_updates(values: dict, updates: int, track_movement: bool = True,
                  watch: Optional[Callable] = None) -> Trained:
    """Build a trainer (handed to `watch` first), run `updates` updates with trainer.step(), and let go
    of the run directory."""
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values))
    try:
        if watch is not None:
            watch(trainer)
        policy = trainer.roles.trainable("policy")
        start = [p.detach().clone() for p in policy] if track_movement else None
        probe = watch_optimisation(trainer)
        rows = []
        for _ in range(updates):
            rows.append(trainer.step())
            if "reward/score" not in rows[-1]:  # skip_update: no weights changed, and the reason is the story
                raise RuntimeError(f"update {trainer.update} was skipped: {trainer.first_skip_reason}")
        movement = distance(policy, start) if track_movement else None
        return Trained(rows, probe, movement, facts_of(trainer))
    finally:
        if trainer.tracker is not None:
            trainer.tracker.close()
        if trainer.lock is not None:
            trainer.lock.release()


def distance(params, start) -> float:
    """||w - w_start|| over a list of tensors, in fp64 (small steps on large weights)."""
    total = sum(float(((p.detach().double() - s.double()) ** 2).sum()) for p, s in zip(params, start))
    return total ** 0.5


def watch_optimisation(trainer) -> Probe:
    """Wrap trainer.optimise: record the batch's shapes every time, and on CUDA count the host syncs
    of the first call (the sync warnings of set_sync_debug_mode, recorded, not printed)."""
    probe, plain = Probe(), trainer.optimise

    def optimise(batch):
        probe.sequence_shape, probe.response_shape = tuple(batch.input_ids.shape), tuple(batch.response_mask.shape)
        if trainer.device.type != "cuda" or probe.syncs is not None:
            return plain(batch)
        torch.cuda.synchronize()  # the rollout's work is not charged to this phase
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every sync, not one warning per call site
            torch.cuda.set_sync_debug_mode("warn")
            try:
                metrics = plain(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        probe.syncs = sum("synchroniz" in str(w.message) for w in caught)
        probe.micro_batches = int(metrics["ppo/optimizer_steps"]) * trainer.cfg.gradient_accumulation_steps
        return metrics

    trainer.optimise = optimise
    return probe


def facts_of(trainer) -> dict:
    """What the 1B arithmetic needs from the roles: matmul weights per model, the reuse decision."""
    roles = trainer.roles
    models = {name: getattr(roles, name, None) for name in ("policy", "reference", "critic")}
    return {"block_params": {k: block_matmul_params(m) for k, m in models.items() if m is not None},
            "reused_scoring_forward": trainer.reuses_scoring_forward(),
            "ppo_epochs": trainer.cfg.ppo_epochs, "weight_bytes": policy_weight_bytes(roles)}


def block_matmul_params(model) -> int:
    """Weights of the Linear layers inside the transformer blocks: what a token's forward multiplies by."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in f".{name}")


def policy_weight_bytes(roles) -> int:
    policy = getattr(roles, "policy", None)
    return next(policy.parameters()).element_size() if policy is not None else 0


def summarise(result: Result, trained: Trained) -> Result:
    """Fill a row from a finished run's metrics."""
    # The worst over the updates: every update's first minibatch should read approx-KL 0 and ratio 1.
    result.first_kl = max((r["policy/first_minibatch_approx_kl"] for r in trained.rows), key=abs)
    result.first_ratio = max((r["policy/first_minibatch_ratio_mean"] for r in trained.rows), key=lambda x: abs(x - 1))
    times = [r["time/update_s"] for r in trained.rows]
    result.s_per_update = statistics.median(times[1:] or times)
    result.movement = trained.movement
    if trained.probe.syncs is not None:
        result.syncs_per_micro = trained.probe.syncs / max(1, trained.probe.micro_batches)
    return result


# --- the measured runs ----------------------------------------------------------------------------------


class Bench:
    """Runs each measurement in turn: its own directory, memory reset, time budget, errors kept to its row."""

    def __init__(self, root: Path, device, budget_s: float):
        self.root, self.device, self.budget_s = root, device, budget_s
        self.results: list[Result] = []

    def run(self, name: str, measure: Callable[[Result, Path], None]) -> Result:
        result = Result(name)
        self.results.append(result)
        if self.budget_s and time.perf_counter() - START > self.budget_s:
            result.status = "skipped: time budget"
            return result
        out = self.root / f"run{len(self.results)}"
        reset_peak_memory(self.device)
        try:
            measure(result, out)
        except Exception as err:  # noqa: BLE001 - one failure must not hide the other runs
            first_line = (str(err).strip().splitlines() or [""])[0]
            # A "|" in the message would split the markdown table's cell.
            result.status = f"FAIL: {type(err).__name__}: {first_line[:160]}".replace("|", "/")
            traceback.print_exc()
        result.peak_mb = peak_memory_mb(self.device)
        print(f"[{time.perf_counter() - START:6.1f} s] {name}: {result.status}", flush=True)
        return result

    def by_name(self, name: str) -> Optional[Result]:
        return next((r for r in self.results if r.name == name), None)


def reset_peak_memory(device) -> None:
    gc.collect()  # the previous run's trainer goes before this one's peak is read
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mb()


def measure_plain(assets: Assets, threads: int, updates: int, **overrides) -> Callable[[Result, Path], None]:
    """A run of `updates` updates with these settings over the tiny Llama."""

    def measure(result: Result, out: Path) -> None:
        summarise(result, train_updates(base_values(assets, out, threads, **overrides), updates))

    return measure


def compare_movement(bench: Bench, name: str, twin: str) -> None:
    """bf16-mixed's weight movement over its fp32 twin's: master weights in fp32 should keep every small step."""
    row, reference = bench.by_name(name), bench.by_name(twin)
    if row and reference and row.movement and reference.movement:
        row.movement_ratio = row.movement / reference.movement
        row.notes.append(f"fp32 twin: {twin}")


def measure_grpo(assets: Assets, threads: int, updates: int) -> Callable[[Result, Path], None]:
    """GRPO over groups of 4 with "." as a stop string: every sampled response must end at its first '.'.
    (The corpus's "." is a token of its own, so a response that says "." ends with it.)"""

    def measure(result: Result, out: Path) -> None:
        responses: list[str] = []
        trained = train_updates(base_values(assets, out, threads, samples_per_prompt=4, advantage_estimator="grpo",
                                            stop_strings=["."], max_new_tokens=16), updates,
                                watch=lambda trainer: keep_responses(trainer, responses))
        summarise(result, trained)
        past_stop = [r for r in responses if "." in r[:-1]]
        if past_stop:
            raise AssertionError(f"a response runs past the stop string '.': {past_stop[0]!r}")
        stopped = sum(r.endswith(".") for r in responses)
        ended = statistics.mean(r["response/eos_rate"] for r in trained.rows)
        result.notes.append(f"{stopped} of {len(responses)} responses end at a '.', none runs past one; "
                            f"ended (EOS or '.') {ended:.0%}")

    return measure


def keep_responses(trainer, responses: list[str]) -> None:
    """Wrap trainer.rollout so every sampled response text lands in `responses`."""
    plain = trainer.rollout

    def rollout(indices):
        sampled = plain(indices)
        responses.extend(sampled.responses)
        return sampled

    trainer.rollout = rollout


def measure_reward_model(assets: Assets, threads: int, updates: int) -> Callable[[Result, Path], None]:
    def measure(result: Result, out: Path) -> None:
        values = base_values(assets, out, threads, policy=str(assets.gpt2), reward_fn=None,
                             reward_model=str(assets.reward_model))
        trained = train_updates(values, updates)
        summarise(result, trained)
        result.notes.append(f"score {trained.rows[-1]['reward/score']:+.3f} from the reward model")

    return measure


def measure_resume(assets: Assets, threads: int, exact: bool) -> Callable[[Result, Path], None]:
    """2 updates with a checkpoint after each, resumed to 3, against 3 straight. A constant learning
    rate: the linear schedule's length is total_updates, which the resumed run changes."""

    def measure(result: Result, out: Path) -> None:
        def values(run: str, **extra) -> dict:
            return base_values(assets, out / run, threads, save_every=1, lr_schedule="constant", **extra)

        straight = build_ppo_trainer(config_from_dict(PPOConfig, values("straight", total_updates=3)))
        straight.train()
        build_ppo_trainer(config_from_dict(PPOConfig, values("resumed", total_updates=2))).train()
        resumed = build_ppo_trainer(config_from_dict(PPOConfig, values("resumed", total_updates=3, resume=True)))
        started_at = resumed.update
        resumed.train()
        if (started_at, resumed.update) != (2, 3):
            raise AssertionError(f"resume started at update {started_at} and ended at {resumed.update}, not 2 and 3")
        gap = max_abs_difference(straight.roles.trainable("policy"), resumed.roles.trainable("policy"))
        if exact and gap != 0:
            raise AssertionError(f"resumed weights differ from the straight run's: max |diff| {gap:.3g}")
        rows = [json.loads(line) for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
        summarise(result, Trained([r for r in rows if "time/update_s" in r], Probe(), None))
        result.notes.append(f"resumed at update 2, ended at 3; vs 3 straight: "
                            + ("bitwise equal" if gap == 0 else f"max |diff| {gap:.3g}"))

    return measure


def max_abs_difference(a, b) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


# --- the 1B model on CUDA -------------------------------------------------------------------------------


@dataclass
class Yardsticks:
    bandwidth_gbs: float   # device memory, bytes read + written per second / 1e9
    bf16_tflops: float     # 8192 x 8192 x 8192 bf16 matmuls


def measure_yardsticks(device) -> Yardsticks:
    return Yardsticks(copy_bandwidth_gbs(device), bf16_matmul_tflops(device))


def cuda_seconds(work: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    """Seconds per call of `work`, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        work()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        work()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / repeats


def copy_bandwidth_gbs(device, gib: int = 2) -> float:
    """A 2 GiB device-to-device copy: every byte read once and written once."""
    source = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = cuda_seconds(lambda: target.copy_(source), repeats=20)
    del source, target
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / seconds / 1e9


def bf16_matmul_tflops(device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = cuda_seconds(lambda: torch.matmul(a, b), repeats=50)
    return 2 * n**3 / seconds / 1e12


@dataclass
class BigNumbers:
    """The 1B run's last update against the yardsticks."""
    yardsticks: Yardsticks
    params: int
    weight_bytes: int
    shape: tuple
    decode_tokens_per_s: float
    bound_fp32: float
    bound_bf16: float
    score_tflops: float
    train_tflops: float


def measure_big(assets: Assets, device, measured: dict) -> Callable[[Result, Path], None]:
    """bf16-mixed PPO (GAE: a 1B critic beside the 1B policy) on the 1B model, every response 128 tokens;
    its numbers go to measured["big"]."""

    def measure(result: Result, out: Path) -> None:
        yardsticks = measure_yardsticks(device)  # before the models take the memory
        model = save(build_big_llama(assets.tokenizer, device), assets.tokenizer, assets.root / "llama-1b")
        reset_peak_memory(device)  # the row's peak is training's, not the copy's 4 GiB or the initialisation's
        values = dict(policy=str(model), prompts=str(assets.big_prompts), reward_fn=REWARD_FN,
                      output_dir=str(out), precision="bf16-mixed", batch_size=BIG_BATCH, num_minibatches=1,
                      ppo_epochs=2, max_new_tokens=BIG_NEW_TOKENS, min_new_tokens=BIG_NEW_TOKENS,
                      learning_rate=LEARNING_RATE, total_updates=100, progress=False, seed=0)
        trained = train_updates(values, BIG_UPDATES, track_movement=False)  # a fp32 copy of 1B weights: 4 GB
        summarise(result, trained)
        measured["big"] = big_numbers(trained, yardsticks)
        result.notes.append("movement not tracked (a copy of the weights would take 4 GB)")

    return measure


def big_numbers(trained: Trained, yardsticks: Yardsticks) -> BigNumbers:
    """Rates of the last update (the formulas are in the module docstring)."""
    last, facts, probe = trained.rows[-1], trained.facts, trained.probe
    p = facts["block_params"]
    rows, positions = probe.sequence_shape
    _, steps = probe.response_shape
    tokens = rows * positions
    score_flops = 2 * tokens * (p["policy"] + p["reference"] + p.get("critic", 0))
    trained_params = p["policy"] + p.get("critic", 0)
    train_flops = facts["ppo_epochs"] * 6 * tokens * trained_params
    if facts["reused_scoring_forward"]:
        train_flops -= 2 * tokens * trained_params  # the first step's forwards ran (and are counted) in score
    decode = rows * steps / last["time/generate_s"]
    steps_per_s_at_one_byte = yardsticks.bandwidth_gbs * 1e9 / p["policy"]  # each step reads every block weight
    return BigNumbers(yardsticks, p["policy"], facts["weight_bytes"], (rows, positions, steps), decode,
                      rows * steps_per_s_at_one_byte / 4, rows * steps_per_s_at_one_byte / 2,
                      score_flops / last["time/score_s"] / 1e12, train_flops / last["time/train_s"] / 1e12)


# --- the report -----------------------------------------------------------------------------------------


def fmt(value: Optional[float], spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[Result], device) -> str:
    memory = "peak GPU MB" if device.type == "cuda" else "VmHWM so far (MB)"
    syncs_na = "n/a (cuda only)"
    lines = [f"| run | status | {memory} | first-mb approx-KL | first-mb ratio | policy ‖Δw‖ | "
             "‖Δw‖ / fp32 twin (≥ 0.9) | host syncs / micro-batch | s / update | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        syncs = fmt(r.syncs_per_micro, ".1f") if device.type == "cuda" else syncs_na
        lines.append(f"| {r.name} | {r.status} | {fmt(r.peak_mb, '.0f')} | {fmt(r.first_kl, '.2e')} | "
                     f"{fmt(r.first_ratio, '.6f')} | {fmt(r.movement, '.3e')} | {fmt(r.movement_ratio, '.3f')} | "
                     f"{syncs} | {fmt(r.s_per_update, '.2f')} | {'; '.join(r.notes)} |")
    return "\n".join(lines)


def big_lines(big: Optional[BigNumbers]) -> list[str]:
    if big is None:
        return []
    y = big.yardsticks
    rows, positions, steps = big.shape
    dtype = {4: "fp32", 2: "bf16"}.get(big.weight_bytes, f"{big.weight_bytes}-byte")
    return [
        "",
        f"1B Llama, bf16-mixed (policy weights stored {dtype}), P = {big.params / 1e9:.3f}e9 block weights, "
        f"{rows} rows x {positions} positions, {steps} decode steps; update {BIG_UPDATES} of {BIG_UPDATES}:",
        f"- yardsticks: copy bandwidth {y.bandwidth_gbs:.0f} GB/s (read + write), bf16 matmul "
        f"{y.bf16_tflops:.0f} TFLOP/s (8192^3)",
        f"- generate: {big.decode_tokens_per_s:.0f} tokens/s = {big.decode_tokens_per_s / big.bound_fp32:.0%} of the "
        f"fp32-weight bound ({big.bound_fp32:.0f} tokens/s, 4 B/weight per step), "
        f"{big.decode_tokens_per_s / big.bound_bf16:.0%} of the bf16 bound ({big.bound_bf16:.0f}, 2 B/weight: "
        "autocast's cached casts)",
        f"- score: {big.score_tflops:.0f} TFLOP/s = {big.score_tflops / y.bf16_tflops:.0%} of the bf16 matmul rate "
        "(target >= 40%)",
        f"- train: {big.train_tflops:.0f} TFLOP/s = {big.train_tflops / y.bf16_tflops:.0%} of the bf16 matmul rate "
        "(target >= 35%)",
    ]


def report(bench: Bench, device, big: Optional[BigNumbers], args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    header = [f"## tether GPU smoke: {name}, torch {torch.__version__}, transformers {transformers.__version__}", ""]
    if device.type != "cuda":
        header += ["CPU dry run of the code paths on tiny models: not a measurement.", ""]
    tolerance = DoctorThresholds().mismatch_approx_kl_bf16
    footer = big_lines(big) + [
        "",
        f"doctor's tolerance for the first-minibatch approx-KL under bf16 (mismatch_approx_kl_bf16): {tolerance:g}; "
        "compare the bf16-mixed rows' first-mb approx-KL",
        f"total wall time: {time.perf_counter() - START:.1f} s",
    ]
    return "\n".join(header + [table(bench.results, device)] + footer)


# --- main -------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per tiny run (the 1B run makes 2)")
    parser.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                        help="the 1B Llama run (CUDA only; default on there)")
    parser.add_argument("--out", help="also write the report to OUT/gpu_smoke.md")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or
                        min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the runs still to start after this many seconds (default 420 on CUDA, none on CPU)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    transformers_logging.disable_progress_bar()  # a bar per model saved or loaded would bury the table

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    big = device.type == "cuda" if args.big is None else args.big
    if big and device.type != "cuda":
        sys.exit("--big runs a 1B model: CUDA only")
    budget = args.budget_s if args.budget_s is not None else (420.0 if device.type == "cuda" else 0.0)
    threads = args.threads if device.type == "cpu" else 0  # 0: tether takes every core
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="tether-gpu-smoke-") as tmp:
        root = Path(tmp)
        assets = build_assets(root)
        print(f"[{time.perf_counter() - START:6.1f} s] tokenizer, tiny models and prompts built in {root}", flush=True)
        bench = Bench(root, device, budget)
        measured: dict = {}
        run_all(bench, assets, device, threads, args.updates, big, measured)
    text = report(bench, device, measured.get("big"), args)
    print("\n" + text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_smoke.md").write_text(text + "\n")


def run_all(bench: Bench, assets: Assets, device, threads: int, updates: int, big: bool, measured: dict) -> None:
    """Every run in order. The 1B run goes first: it is the slowest and the one that measures, and the
    time budget then only ever cuts tiny runs of a few seconds each."""
    if big:
        bench.run("1B Llama bf16-mixed", measure_big(assets, device, measured))
    plain = lambda **o: measure_plain(assets, threads, updates, **o)  # noqa: E731
    bench.run("fp32", plain(precision="fp32"))
    bench.run("bf16-mixed, reuse", plain(precision="bf16-mixed", reuse_scoring_forward=True))
    compare_movement(bench, "bf16-mixed, reuse", "fp32")
    bench.run("fp32, 2 minibatches", plain(precision="fp32", reuse_scoring_forward=False, num_minibatches=2))
    bench.run("bf16-mixed, no reuse", plain(precision="bf16-mixed", reuse_scoring_forward=False, num_minibatches=2))
    compare_movement(bench, "bf16-mixed, no reuse", "fp32, 2 minibatches")
    bench.run("shared_base LoRA r8", plain(precision="bf16-mixed", placement="shared_base", lora_rank=8))
    bench.run("GRPO + stop strings", measure_grpo(assets, threads, updates))
    bench.run("GPT-2 + reward model", measure_reward_model(assets, threads, updates))
    bench.run("resume 2 -> 3", measure_resume(assets, threads, exact=device.type == "cpu"))


if __name__ == "__main__":
    main()
