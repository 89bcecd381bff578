"""Peak memory of the log-prob step, before and after the hand-written chunked backward.

    .venv/bin/python benchmarks/logprob_memory.py [--batch 16] [--response 256] [--vocab 49152]

The step is what the PPO loss does with the policy's logits: ``logprobs_from_logits`` and
``entropy_from_logits`` on (B, R, V) logits that require grad, then backward through both.
It depends only on the logits' shape and dtype, not on the model that made them, so random
logits stand in for SmolLM2-135M's (vocab 49152; default batch 16 x 256 response tokens) and
no weights are loaded.

Compared, for fp32 and bf16 logits (fp32 on CPU; bf16 under autocast on GPUs):

  previous  ``reference_logprobs`` / ``reference_entropy`` below: tether's implementation before
            this change, chunked in the forward pass only, so autograd kept every chunk's
            float32 intermediates (upcast, / T, log-softmax, probabilities) for backward.
  lean      ``tether.algo.logprobs``: the forward saves the logits and a few numbers per row;
            the backward recomputes the softmax one chunk at a time.

Each variant runs in a fresh process, so one's peak never hides another's. Its peak resident
memory (VmHWM, benchmarks/peak_memory.py) is read after the logits are allocated and again after
forward + backward; the difference is the step's peak extra memory. It includes the gradient of
the logits (one logits-sized buffer in their dtype, which any implementation must produce).
Printed too: the forward + backward time, and the no-grad forward time (how rollouts are scored;
best of 3, measured after the peak is read so its transients cannot raise it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_resident_mb  # noqa: E402  (a sibling script's helper)

from tether.algo.logprobs import (  # noqa: E402
    _check_temperature,
    _compute_dtype,
    _row_chunks,
    entropy_from_logits,
    logprobs_from_logits,
)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- the previous implementation, kept here only to compare against -------------------


def reference_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Previous ``logprobs_from_logits``: chunked forward, plain autograd backward."""
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    dtype = _compute_dtype(logits)
    flat_logits = logits.reshape(-1, vocab)  # (N, V)
    flat_tokens = tokens.reshape(-1, 1).long()  # (N, 1)
    out = []
    for lo, hi in _row_chunks(flat_logits.shape[0], vocab):
        chunk = flat_logits[lo:hi].to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        chosen = chunk.gather(-1, flat_tokens[lo:hi]).squeeze(-1)  # (n,)
        out.append(chosen - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).reshape(tokens.shape)


def reference_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Previous ``entropy_from_logits``: chunked forward, plain autograd backward."""
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    dtype = _compute_dtype(logits)
    flat_logits = logits.reshape(-1, vocab)
    out = []
    for lo, hi in _row_chunks(flat_logits.shape[0], vocab):
        chunk = flat_logits[lo:hi].to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        logp = torch.log_softmax(chunk, dim=-1)
        p = logp.exp()
        logp = torch.where(p > 0, logp, torch.zeros((), dtype=dtype, device=logp.device))
        out.append(-(p * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


VARIANTS = {
    "previous": (reference_logprobs, reference_entropy),
    "lean": (logprobs_from_logits, entropy_from_logits),
}


# --- one variant, in its own process ---------------------------------------------------


def log_prob_step(logprobs_fn, entropy_fn, logits: Tensor, tokens: Tensor, advantages: Tensor,
                  temperature: float) -> None:
    """Forward and backward as the PPO loss uses them: policy-gradient term plus an entropy bonus."""
    logprobs = logprobs_fn(logits, tokens, temperature)
    entropy = entropy_fn(logits, temperature)
    loss = -(logprobs * advantages).mean() - 0.01 * entropy.mean()
    loss.backward()


def no_grad_forward_s(logprobs_fn, entropy_fn, logits: Tensor, tokens: Tensor, temperature: float) -> float:
    """Seconds of both functions without grad, as rollout scoring runs them."""
    with torch.no_grad():
        start = time.perf_counter()
        logprobs_fn(logits, tokens, temperature)
        entropy_fn(logits, temperature)
        return time.perf_counter() - start


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    logprobs_fn, entropy_fn = VARIANTS[spec["variant"]]
    shape = (spec["batch"], spec["response"], spec["vocab"])
    tiny = torch.randn(2, 3, 7, requires_grad=True)  # first-call set-up outside the measurement
    log_prob_step(logprobs_fn, entropy_fn, tiny, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), 1.0)
    gen = torch.Generator().manual_seed(0)
    # Filled in place: a float32 randn cast to bf16 would leave a float32-sized peak behind.
    logits = torch.empty(shape, dtype=DTYPES[spec["dtype"]]).normal_(0.0, 3.0, generator=gen).requires_grad_()
    tokens = torch.randint(0, spec["vocab"], shape[:2], generator=gen)
    advantages = torch.randn(shape[:2], generator=gen)
    baseline_mb = peak_resident_mb()
    start = time.perf_counter()
    log_prob_step(logprobs_fn, entropy_fn, logits, tokens, advantages, spec["temperature"])
    step_s = time.perf_counter() - start
    peak_mb = peak_resident_mb()
    no_grad_s = min(no_grad_forward_s(logprobs_fn, entropy_fn, logits, tokens, spec["temperature"]) for _ in range(3))
    logits_mb = logits.numel() * logits.element_size() / 2**20
    return {"extra_mb": peak_mb - baseline_mb, "logits_mb": logits_mb, "step_s": step_s, "no_grad_s": no_grad_s}


def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        sys.exit(f"{spec['variant']} {spec['dtype']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    print(f"logits ({args.batch}, {args.response}, {args.vocab}), T = {args.temperature}, {args.threads} threads; "
          f"peak extra = VmHWM after forward + backward minus VmHWM with the logits allocated\n")
    print("| variant | dtype | logits (MB) | peak extra (MB) | extra / logits | lean / previous "
          "| fwd+bwd (s) | no-grad fwd (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in args.dtypes.split(","):
        previous_mb = None
        for variant in VARIANTS:
            spec = {"variant": variant, "dtype": dtype, "batch": args.batch, "response": args.response,
                    "vocab": args.vocab, "temperature": args.temperature, "threads": args.threads}
            r = run_child(spec)
            previous_mb = previous_mb or r["extra_mb"]
            ratio = f"{r['extra_mb'] / previous_mb:.2f}" if variant == "lean" else "1.00"
            print(f"| {variant} | {dtype} | {r['logits_mb']:.0f} | {r['extra_mb']:.0f} | "
                  f"{r['extra_mb'] / r['logits_mb']:.2f} | {ratio} | {r['step_s']:.2f} | {r['no_grad_s']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
