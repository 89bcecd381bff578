"""How far top_k / top_p sampling is from the distribution PPO scores, on a tiny trained model.

    .venv/bin/python benchmarks/truncated_sampling.py [--steps 300] [--responses 64]

tether samples with top_k / top_p from the truncated, renormalised distribution q, and scores the
samples (old log-probs, ratio, KL) under the policy's full softmax(logits / T), π, with its own
forward, as verl and OpenRLHF do. For each setting this prints, over the sampled response tokens:

  gap            mean log q(a) - log π(a) (nats): what `generation/truncation_gap` logs
  tether         the first minibatch's approx-KL and ratio spread as tether computes them (the old
                 log-probs from the same forward as the new ones: 0 and 0 with any truncation)
  sampler-as-old the same two figures had the old log-probs been the sampler's own (log q, e.g. an
                 engine's processed log-probs) while the new ones are log π: ratio = π/q = exp(-gap),
                 the importance ratios far from 1 that users of such setups report

The model is a small GPT trained for --steps on tether's built-in corpus (a random model is near
uniform, which would exaggerate every gap). Fixed seeds: the figures repeat on every machine.
"""

from __future__ import annotations

import argparse

import torch

from tether.algo.logprobs import logprobs_from_logits
from tether.data import left_pad
from tether.sampling import GenerationSettings, response_logits, sample_responses
from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer

SETTINGS = [(0, 1.0), (50, 1.0), (20, 1.0), (5, 1.0), (0, 0.95), (0, 0.9), (0, 0.5), (5, 0.9)]


def trained_tiny_model(steps: int):
    torch.manual_seed(0)
    texts = builtin_corpus(2000, seed=0)
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = build_tiny_causal_lm("gpt2", tokenizer, seed=0, hidden=64, layers=2, heads=4)
    ids = [tokenizer(t)["input_ids"][:48] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = [ids[(step * 32 + i) % len(ids)] for i in range(32)]
        width = max(len(b) for b in batch)
        x = torch.tensor([b + [tokenizer.pad_token_id] * (width - len(b)) for b in batch])
        labels = torch.where(x == tokenizer.pad_token_id, -100, x)
        loss = model(input_ids=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"tiny GPT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) trained {steps} steps: "
          f"final LM loss {loss.item():.2f} (0 steps: the random model)")
    return model.eval(), tokenizer, texts


def measure(model, tokenizer, prompts, top_k: int, top_p: float, max_new_tokens: int) -> dict[str, float]:
    settings = GenerationSettings(max_new_tokens=max_new_tokens, eos_ids=[tokenizer.eos_token_id],
                                  pad_id=tokenizer.pad_token_id, top_k=top_k, top_p=top_p)
    prompt_ids, prompt_mask = prompts
    gaps = []
    torch.manual_seed(1)
    with torch.no_grad():
        response_ids, mask, _ = sample_responses(model, prompt_ids, prompt_mask, settings, tokenizer, gaps)
        input_ids = torch.cat([prompt_ids, response_ids], 1)
        attention = torch.cat([prompt_mask.long(), mask.long()], 1)
        old = logprobs_from_logits(response_logits(model, input_ids, attention, response_ids.shape[1],
                                                   tokenizer.pad_token_id), response_ids)
        new = logprobs_from_logits(response_logits(model, input_ids, attention, response_ids.shape[1],
                                                   tokenizer.pad_token_id), response_ids)
    gap = torch.stack(gaps, 1)[:, : mask.shape[1]][mask]
    tether_ratio = (new - old)[mask].exp()
    sampler_ratio = (-gap).exp()  # π(a) / q(a)
    k3 = lambda r: ((r - 1) - r.log()).mean().item()  # noqa: E731 - the approx-KL tether logs
    return {"gap": gap.mean().item(), "tether_kl": k3(tether_ratio), "tether_spread": (tether_ratio - 1).abs().max().item(),
            "sampler_kl": k3(sampler_ratio), "sampler_min": sampler_ratio.min().item(),
            "sampler_mean": sampler_ratio.mean().item(), "tokens": int(mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="LM training steps of the tiny model")
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer, texts = trained_tiny_model(args.steps)
    prompts = left_pad([tokenizer(" ".join(t.split()[:4]))["input_ids"] for t in texts[: args.responses]],
                       tokenizer.pad_token_id)
    print(f"\n{args.responses} responses of up to {args.max_new_tokens} tokens per setting\n")
    print(f"{'top_k':>5} {'top_p':>5} {'tokens':>6} | {'gap (nats)':>10} | {'tether: approx-KL':>17} "
          f"{'|ratio-1| max':>13} | {'sampler-as-old: approx-KL':>25} {'ratio min':>9} {'ratio mean':>10}")
    for top_k, top_p in SETTINGS:
        m = measure(model, tokenizer, prompts, top_k, top_p, args.max_new_tokens)
        print(f"{top_k:>5} {top_p:>5} {m['tokens']:>6} | {m['gap']:>10.4f} | {m['tether_kl']:>17.2e} "
              f"{m['tether_spread']:>13.2e} | {m['sampler_kl']:>25.4f} {m['sampler_min']:>9.4f} {m['sampler_mean']:>10.4f}")


if __name__ == "__main__":
    main()
