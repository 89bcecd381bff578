"""Supervised fine-tuning / pretraining: the causal LM loss on packed blocks of text.

The same `lm_loss` is PPO-ptx's pretraining term, so what SFT optimises is exactly what
PPO-ptx later protects.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tether import distributed
from tether.algo import lm_loss
from tether.checkpoint import restore_random_streams, with_random_streams
from tether.config import SFTConfig
from tether.data import BlockSampler
from tether.models import position_ids_from_mask
from tether.precision import FP32, Precision
from tether.tracking import JsonlSink
from tether.trainers import adamw, check_finite, clip_and_step, lr_lambda


def block_loss(model: nn.Module, blocks: Tensor, num_tokens: Optional[float] = None,
               trained: Optional[Tensor] = None):
    """LM loss of full blocks (every token real): logits[t] predicts blocks[t+1], counted where
    `trained` (B, L) is True (loss_on: the completion or assistant turns; None: every token)."""
    mask = torch.ones_like(blocks)
    logits = model(input_ids=blocks, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).logits
    return lm_loss(logits, blocks, mask if trained is None else trained, num_tokens=num_tokens)


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: Tensor, batch_size: int = 32,
                trained: Optional[Tensor] = None) -> dict[str, float]:
    """Held-out loss (nats/token) and perplexity over every eval block's counted tokens."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        chunk = blocks[start : start + batch_size]
        loss, stats = block_loss(model, chunk, trained=None if trained is None else trained[start : start + batch_size])
        n = int(stats["tokens"].item())
        total, tokens = total + loss.item() * n, tokens + n
    model.train()
    mean = total / max(tokens, 1)
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}


class SFTTrainer:
    """Handed a model and packed blocks; owns the optimizer, schedule and step counter.

    Under torchrun every rank draws the same global batch of blocks and trains on its contiguous
    share; the loss is normalised by the global token count and the gradients are summed over ranks,
    so N ranks make the update one process makes on the whole batch."""

    def __init__(self, cfg: SFTConfig, model: nn.Module, train_blocks: Tensor, eval_blocks: Optional[Tensor],
                 sink: Optional[JsonlSink] = None, device: torch.device = torch.device("cpu"),
                 save: Optional[Callable[["SFTTrainer"], None]] = None, precision: Precision = FP32,
                 train_trained: Optional[Tensor] = None, eval_trained: Optional[Tensor] = None):
        self.cfg, self.model, self.eval_blocks, self.sink, self.device = cfg, model, eval_blocks, sink, device
        self.eval_trained = eval_trained  # (N, L) bool: the eval targets that count (loss_on); None = all
        self.precision = precision  # bf16-mixed: forwards under bf16 autocast, fp32 weights and AdamW state
        self.save = save  # called with the trainer every save_every steps
        self.sampler = BlockSampler(train_blocks, seed=cfg.seed, trained=train_trained)
        self.optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, eps=cfg.adam_eps,
                               weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps))
        self.step_count = 0

    def train(self) -> dict[str, float]:
        """Train until max_steps or max_seconds; evaluate every eval_every steps and at the end."""
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        metrics: dict[str, float] = {}
        with tqdm(total=cfg.max_steps, initial=self.step_count, desc="sft", unit="step",
                  disable=not cfg.progress or not distributed.is_main(), dynamic_ncols=True) as bar:
            while self.step_count < cfg.max_steps:
                if cfg.max_seconds is not None and distributed.any_rank(time.perf_counter() - start > cfg.max_seconds):
                    break  # every rank stops at the same step
                metrics = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                if self.step_count % cfg.eval_every == 0:
                    metrics.update(self.evaluate())
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", eval=f"{metrics['eval/loss']:.3f}")
                self.log(metrics)
                if self.save is not None and cfg.save_every and self.step_count % cfg.save_every == 0:
                    self.save(self)
        final = {**metrics, **self.evaluate(), "train/steps": float(self.step_count),
                 "time/train_s": time.perf_counter() - start}
        self.log(final)
        return final

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        every, trained = self.sampler.next_batch_with_mask(cfg.batch_size)
        # Counted targets of the whole batch (every rank draws it): each micro-batch's loss is its
        # share of one token-level mean, exact under accumulation and across ranks.
        num_tokens = max(int(trained[:, 1:].sum().item()), 1)
        share = distributed.share(range(len(every)))
        blocks, trained = every[share].to(self.device), trained[share].to(self.device)  # this rank's share
        total = 0.0
        size = cfg.micro_batch_size // distributed.world_size()
        for micro, micro_trained in zip(blocks.split(size), trained.split(size)):
            with self.precision.forward_context(self.device):
                loss, _ = block_loss(self.model, micro, num_tokens=num_tokens, trained=micro_trained)
            check_finite([("SFT loss", loss)], f"non-finite SFT loss at step {self.step_count}; lower learning_rate",
                         [self.optimizer])
            loss.backward()
            total += loss.item()
        total = distributed.sum_floats([total])[0]
        norm = clip_and_step(self.optimizer, self.scheduler, [p for p in self.model.parameters() if p.grad is not None],
                             cfg.max_grad_norm, f"non-finite SFT gradient norm at step {self.step_count}; lower "
                             "learning_rate")
        self.step_count += 1
        return {"train/loss": total, "train/grad_norm": norm, "train/lr": self.scheduler.get_last_lr()[0]}

    def state(self) -> tuple[dict, dict]:
        """(JSON state, tensors) a checkpoint needs to continue exactly: step, data position, RNG
        streams (dropout draws; every rank's, gathered), optimizer and schedule. Every rank calls it."""
        return with_random_streams({"step": self.step_count, "sampler": self.sampler.state_dict()},
                                   {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()})

    def load_state(self, state: dict, tensors: dict) -> None:
        self.step_count = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        restore_random_streams(state, tensors, self.cfg.seed)

    def evaluate(self) -> dict[str, float]:
        if self.eval_blocks is None or len(self.eval_blocks) == 0:
            return {}
        with self.precision.forward_context(self.device):
            return evaluate_lm(self.model, self.eval_blocks.to(self.device), self.cfg.micro_batch_size,
                               None if self.eval_trained is None else self.eval_trained.to(self.device))

    def log(self, metrics: dict[str, float]) -> None:
        if self.sink is not None:
            self.sink.log(metrics, self.step_count)

