"""Reward-model trainer: Bradley-Terry loss on preference pairs (Ouyang et al. 2022 eq. 1).

One optimizer step, top to bottom:
  1. batch      the next ``batch_size`` pairs of a seeded shuffled stream over the epochs
                (with ``batch_by_prompt``: shuffled prompts, each prompt's pairs kept together)
  2. forward    chosen and rejected sequences in one padded forward pass per micro-batch, each
                distinct sequence once; the score is read at the last real token (N-details item 5).
                With a LoRA adapter on the top blocks only, the frozen blocks below run once per
                distinct sequence (the trunk cache, up to ``trunk_cache_mb``), not once per epoch
  3. loss       ``-log σ(r_c - r_r)`` summed and divided by the pairs in the *whole* batch,
                so ``gradient_accumulation_steps`` micro-batches give exactly one batch's gradient
  4. step       a non-finite loss or gradient norm raises before anything reaches the weights;
                clip, AdamW, learning-rate schedule
  5. evaluate   every ``eval_every`` steps and at the end: held-out loss, accuracy, margin

Score normalisation lives here too: the policy's responses sampled and scored, and the gain/bias
that makes them score mean 0, std 1 (Ziegler et al. 2019 §2.2; N-details item 7). The scorer and
the head init of N-details item 6 are in tether/models.py.

Metrics (one JSON row per optimizer step in ``metrics.jsonl``, key ``update`` = step):

- ``train/loss``      Bradley-Terry loss of this step's batch, before the step (nats per pair).
                      Starts near log 2 ≈ 0.693 (a fresh head scores near 0); falls.
- ``train/accuracy``  share of the batch's pairs with ``r_chosen > r_rejected`` strictly (ties are wrong).
- ``train/margin``    mean ``r_chosen - r_rejected`` over the batch. Grows; unbounded growth with flat
                      eval accuracy is over-fitting.
- ``train/grad_norm`` global gradient norm before clipping.
- ``train/lr``        learning rate used for this step.
- ``train/epoch``     passes over the training pairs completed (fractional).
- ``eval/loss``, ``eval/accuracy``, ``eval/margin``: the same on the held-out pairs, on rows where an
                      evaluation ran (every ``eval_every`` steps and the last step). Human preference data
                      typically tops out at 0.65–0.75 accuracy; near 1.0 means the task is easy or leaked.
- ``eval/score_mean``, ``eval/score_std``: mean and (biased) std of all held-out scores (chosen and rejected).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tether.algo import pairwise_loss
from tether import distributed
from tether.checkpoint import restore_random_streams, with_random_streams
from tether.config import RewardConfig
from tether.data import PromptSampler, left_pad, right_pad
from tether.models import (
    eos_token_ids,
    last_hidden_state,
    lower_blocks_output,
    reward_model_forward,
    score_head,
    start_at_block,
)
from tether.lora import LoraRewardModel, adapter_layers
from tether.precision import FP32, Precision
from tether.sampling import GenerationSettings, sample_responses
from tether.tracking import MetricSink
from tether.trainers import adamw, check_finite, clip_and_step, lr_lambda

log = logging.getLogger(__name__)

__all__ = [
    "PreferencePairs",
    "prompt_groups",
    "distinct_sequences",
    "RewardTrainer",
    "reward_model_forward",
    "score_head",
    "right_pad",
    "sample_policy_sequences",
    "score_sequences",
    "normalize_reward_head",
    "final_norm",
]


@dataclass
class PreferencePairs:
    """Tokenised preference pairs: prompt + response (+ EOS), at most ``max_length`` ids each."""

    chosen: list[list[int]]    # N sequences of token ids: prompt + preferred response + EOS
    rejected: list[list[int]]  # N sequences of token ids: prompt + dispreferred response + EOS
    prompt_keys: list[str] = field(default_factory=list)  # N: prompt identity, to split by prompt

    def __post_init__(self) -> None:
        if len(self.chosen) != len(self.rejected):
            raise ValueError(f"{len(self.chosen)} chosen but {len(self.rejected)} rejected sequences")
        if self.prompt_keys and len(self.prompt_keys) != len(self.chosen):
            raise ValueError(f"{len(self.prompt_keys)} prompt keys for {len(self.chosen)} pairs")

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, indices: Sequence[int]) -> "PreferencePairs":
        return PreferencePairs([self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
                               [self.prompt_keys[i] for i in indices] if self.prompt_keys else [])


def prompt_groups(pairs: PreferencePairs) -> list[list[int]]:
    """Pair indices grouped by prompt, in order of first appearance (each pair alone without keys)."""
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(pairs.prompt_keys or map(str, range(len(pairs)))):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def distinct_sequences(sequences: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct sequences in order of first appearance, and each input's index among them."""
    position: dict[tuple[int, ...], int] = {}
    where = [position.setdefault(tuple(seq), len(position)) for seq in sequences]
    return [list(seq) for seq in position], where


# --- the trunk cache ------------------------------------------------------------------


def frozen_trunk_end(model: nn.Module) -> int:
    """Index of the lowest block a LoRA reward model adapts (0: every block trains, nothing to cache)."""
    if not isinstance(model, LoraRewardModel):
        return 0
    layers = adapter_layers(model.peft, "reward")
    return 0 if layers is None else min(layers)


def has_base_dropout(model: nn.Module) -> bool:
    """Dropout outside the adapters (modules or config rates): a cached trunk would freeze one draw."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0 and "lora_dropout" not in name:
            return True
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in config.items() if k.endswith(("dropout", "pdrop")))


class TrunkCache:
    """Output of the frozen blocks below a reward adapter, per distinct sequence, up to `max_bytes`.

    Those blocks are the same function in every epoch, so each sequence's trunk is computed
    once and the adapted blocks start from it (`start_at_block`); right padding keeps each
    row's hidden states independent of the batch it was padded in.
    """

    def __init__(self, backbone: nn.Module, end: int, max_bytes: int):
        self.backbone, self.end, self.max_bytes = backbone, end, max_bytes
        self.width = backbone.config.get_text_config().hidden_size
        self.dtype = next(backbone.parameters()).dtype
        self.rows: dict[tuple[int, ...], Tensor] = {}  # sequence -> (len, H)
        self.bytes = 0

    def trunk(self, sequences: list[list[int]], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(U, L, H) trunk of the right-padded batch `input_ids` of `sequences`; computes the missing rows."""
        keys = [tuple(seq) for seq in sequences]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        computed = {}
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            hidden = lower_blocks_output(self.backbone, self.end, input_ids[rows], attention_mask[rows])
            for j, i in enumerate(missing):
                computed[i] = hidden[j, : len(keys[i])]
                self._keep(keys[i], computed[i])
        out = input_ids.new_zeros((*input_ids.shape, self.width), dtype=self.dtype)
        for i, key in enumerate(keys):
            row = computed.get(i, self.rows.get(key))
            out[i, : len(key)] = row
        return out

    def fill(self, sequences: Sequence[Sequence[int]], pad_id: int, chunk: int, device: torch.device) -> None:
        """Compute the trunks of `sequences` (distinct, in order) in fixed chunks, up to the cap. Done
        once before training, so a resumed run computes each trunk exactly as the first run did."""
        unique, _ = distinct_sequences(sequences)
        for start in range(0, len(unique), chunk):
            if self.bytes >= self.max_bytes:
                return
            part = unique[start : start + chunk]
            input_ids, attention_mask = right_pad(part, pad_id)
            self.trunk(part, input_ids.to(device), attention_mask.to(device))

    def _keep(self, key: tuple[int, ...], row: Tensor) -> None:
        size = row.numel() * row.element_size()
        if self.bytes + size <= self.max_bytes:
            self.rows[key] = row.clone()
            self.bytes += size


# --- the trainer ----------------------------------------------------------------------


class RewardTrainer:
    """Handed its model, tokenised pairs, config and metric sink; owns the optimizer and data order.

    Under torchrun every rank draws the same batch of pair indices and trains on its contiguous
    share; the loss is divided by the pairs of the whole batch and the gradients are summed over
    ranks, so N ranks make the step one process makes. Evaluation runs whole on every rank."""

    def __init__(self, cfg: RewardConfig, model: nn.Module, pad_id: int, train_pairs: PreferencePairs,
                 eval_pairs: Optional[PreferencePairs] = None, sink: Optional[MetricSink] = None,
                 device: torch.device = torch.device("cpu"), save: Optional[Callable[["RewardTrainer"], None]] = None,
                 precision: Precision = FP32):
        if len(train_pairs) == 0:
            raise ValueError("RewardTrainer needs at least one training pair")
        self.cfg, self.model, self.pad_id, self.device = cfg, model, pad_id, device
        self.precision = precision  # bf16-mixed: forwards under bf16 autocast, fp32 weights and AdamW state
        self.train_pairs, self.eval_pairs, self.sink = train_pairs, eval_pairs, sink
        self.save = save  # called with the trainer every save_every steps
        if len(train_pairs) < cfg.batch_size:
            log.warning("only %d training pairs for batch_size=%d: each batch repeats pairs", len(train_pairs),
                        cfg.batch_size)
        # Enough full batches to cover `epochs` passes; the last pass may be partial.
        self.total_steps = max(1, math.ceil(cfg.epochs * len(train_pairs) / cfg.batch_size))
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, self.total_steps))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.trunks = self.make_trunk_cache(model, cfg.trunk_cache_mb)
        self._order: list[int] = []  # rest of the current epoch's permutation
        self.pairs_seen = 0
        self.step = 0

    @staticmethod
    def make_trunk_cache(model: nn.Module, megabytes: int) -> Optional[TrunkCache]:
        end = frozen_trunk_end(model)
        if end == 0 or megabytes <= 0:
            return None
        if has_base_dropout(model):
            log.info("the base model has dropout: the frozen blocks run in every epoch (no trunk cache)")
            return None
        return TrunkCache(model.base_model, end, megabytes * 2**20)

    # --- the run -------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """All optimizer steps with a progress bar; returns the last step's metrics (with the final eval)."""
        bar = tqdm(total=self.total_steps, initial=self.step, desc="reward", unit="step",
                   disable=not self.cfg.progress or not distributed.is_main(), dynamic_ncols=True)
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        if self.trunks is not None:
            pairs = [self.train_pairs] + ([self.eval_pairs] if self.eval_pairs is not None else [])
            self.trunks.fill([s for p in pairs for s in p.chosen + p.rejected], self.pad_id,
                             self.cfg.micro_batch_size, self.device)
        try:
            with logging_redirect_tqdm():
                while self.step < self.total_steps:
                    metrics = self.train_step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.2f}",
                                    **({"eval_acc": f"{metrics['eval/accuracy']:.3f}"}
                                       if "eval/accuracy" in metrics else {}))
        finally:
            bar.close()
        metrics["time/train_s"] = time.perf_counter() - start
        if self.trunks is not None:
            metrics["train/trunk_cached_sequences"] = float(len(self.trunks.rows))
        return metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step, its metrics logged (with an evaluation when due)."""
        cfg = self.cfg
        # 1. The next batch of a seeded shuffled stream: every pair once per epoch.
        indices = self.next_indices(cfg.batch_size)
        lr = self.scheduler.get_last_lr()[0]
        # 2-4. Forward, loss, backward, clip and step.
        metrics = self.optimizer_step(indices)
        self.step += 1
        self.pairs_seen += len(indices)
        metrics.update({"train/lr": lr, "train/epoch": self.pairs_seen / len(self.train_pairs)})
        # 5. Evaluate every eval_every steps and after the last one.
        if self.eval_pairs is not None and len(self.eval_pairs) and (
                self.step % cfg.eval_every == 0 or self.step == self.total_steps):
            metrics.update(self.evaluate(self.eval_pairs))
        if self.sink is not None:
            self.sink.log(metrics, self.step)
        if self.save is not None and cfg.save_every and self.step % cfg.save_every == 0 \
                and self.step < self.total_steps:
            self.save(self)
        return metrics

    def state(self) -> tuple[dict, dict]:
        """(JSON state, tensors) to continue exactly: step, data position (the rest of this epoch's
        order and the shuffling stream), RNG streams (every rank's), optimizer and schedule. Every
        rank calls it."""
        return with_random_streams({"step": self.step, "pairs_seen": self.pairs_seen, "order": list(self._order)},
                                   {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                    "shuffle_rng": self.generator.get_state()})

    def load_state(self, state: dict, tensors: dict) -> None:
        self.step, self.pairs_seen, self._order = state["step"], state["pairs_seen"], list(state["order"])
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        self.generator.set_state(tensors["shuffle_rng"])
        restore_random_streams(state, tensors, self.cfg.seed)

    def next_indices(self, count: int) -> list[int]:
        """``count`` pair indices; a batch crossing an epoch boundary continues into a fresh permutation."""
        indices: list[int] = []
        while len(indices) < count:
            if not self._order:
                self._order = self.epoch_order()
            take = min(count - len(indices), len(self._order))
            indices += self._order[:take]
            self._order = self._order[take:]
        return indices

    def epoch_order(self) -> list[int]:
        """One epoch's pair order: a seeded permutation, or with ``batch_by_prompt`` shuffled prompts
        whose pairs stay adjacent, so a batch holds whole prompts and scores their responses once."""
        if not self.cfg.batch_by_prompt:
            return torch.randperm(len(self.train_pairs), generator=self.generator).tolist()
        groups = prompt_groups(self.train_pairs)
        order: list[int] = []
        for group in torch.randperm(len(groups), generator=self.generator).tolist():
            members = groups[group]
            order += [members[i] for i in torch.randperm(len(members), generator=self.generator).tolist()]
        return order

    # --- optimisation --------------------------------------------------------------

    def optimizer_step(self, indices: Sequence[int]) -> dict[str, float]:
        """Accumulate the batch's gradient over micro-batches, then clip and step."""
        stats = self.accumulate_gradients(indices)
        stats["train/grad_norm"] = self._clip_and_step()
        return stats

    def accumulate_gradients(self, indices: Sequence[int]) -> dict[str, float]:
        """Backward of the batch's loss, micro-batch by micro-batch; returns the batch's stats.

        Each micro-batch's summed loss is divided by the pairs in the whole batch, so the
        accumulated gradient equals the gradient of one pass over the batch (DESIGN.md §5).
        """
        self.model.train()
        batch_pairs = len(indices)  # the whole batch, over every rank
        mine = distributed.share(list(indices))  # under torchrun: this rank's contiguous share
        micro_size = self.cfg.micro_batch_size // distributed.world_size()
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for start in range(0, len(mine), micro_size):
            micro = self.train_pairs.select(mine[start : start + micro_size])
            chosen, rejected = self.pair_scores(micro)
            loss, stats = pairwise_loss(chosen, rejected, num_pairs=batch_pairs)  # Ouyang et al. 2022 eq. 1
            check_finite([("reward-model loss", loss)], f"non-finite {{what}} ({{value}}) at step {self.step + 1}; "
                         "nothing was applied to the weights. Lower learning_rate, or check the data and the model "
                         "for NaN/inf.", [self.optimizer])
            loss.backward()
            for key in totals:  # stats are means over the micro-batch: weight by its share of pairs
                totals[key] += stats[key].item() * len(micro) / batch_pairs
        summed = distributed.sum_floats(list(totals.values()))
        return {f"train/{k}": v for k, v in zip(totals, summed)}

    def pair_scores(self, pairs: PreferencePairs) -> tuple[Tensor, Tensor]:
        """(N,) chosen and (N,) rejected scores from one padded forward pass over both.

        A sequence shared by several pairs (K ranked responses to one prompt give up to K(K-1)/2
        pairs) is scored once; with dropout off its gradient is the same as scoring every copy.
        """
        unique, where = distinct_sequences(pairs.chosen + pairs.rejected)
        input_ids, attention_mask = right_pad(unique, self.pad_id)  # (U, L), U <= 2N
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        start = nullcontext()
        if self.trunks is not None:
            trunk = self.trunks.trunk(unique, input_ids, attention_mask)  # (U, L, H)
            start = start_at_block(self.trunks.backbone, self.trunks.end, trunk)
        with start, self.precision.forward_context(self.device):
            scores = reward_model_forward(self.model, input_ids, attention_mask)
        scores = scores[torch.tensor(where, device=scores.device)]  # (2N,)
        return scores[: len(pairs)], scores[len(pairs):]

    def _clip_and_step(self) -> float:
        return clip_and_step(self.optimizer, self.scheduler, [p for p in self.model.parameters() if p.grad is not None],
                             self.cfg.max_grad_norm, f"non-finite reward-model gradient norm at step {self.step + 1}; "
                             "the step was not applied. Lower learning_rate, or check the data for extreme inputs.")

    # --- evaluation ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, pairs: PreferencePairs) -> dict[str, float]:
        """Held-out Bradley-Terry loss, accuracy (ties are wrong), margin and score statistics."""
        chosen, rejected = self.score_pairs(pairs)
        _, stats = pairwise_loss(chosen, rejected)
        scores = torch.cat([chosen, rejected])
        return {"eval/loss": stats["loss"].item(), "eval/accuracy": stats["accuracy"].item(),
                "eval/margin": stats["margin"].item(), "eval/score_mean": scores.mean().item(),
                "eval/score_std": scores.std(unbiased=False).item()}

    @torch.no_grad()
    def score_pairs(self, pairs: PreferencePairs) -> tuple[Tensor, Tensor]:
        """(N,) chosen and (N,) rejected scores on CPU, in micro-batches, model in eval mode."""
        was_training = self.model.training
        self.model.eval()
        chosen, rejected = [], []
        for start in range(0, len(pairs), self.cfg.micro_batch_size):
            c, r = self.pair_scores(pairs.select(range(start, min(start + self.cfg.micro_batch_size, len(pairs)))))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        self.model.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)


# --- score normalisation (Ziegler et al. 2019 §2.2; N-details item 7) ------------------


@torch.no_grad()
def sample_policy_sequences(policy: nn.Module, tokenizer, prompts: list[list[int]], num_samples: int,
                            max_new_tokens: int, seed: int, chunk_size: int = 32,
                            device: torch.device = torch.device("cpu"), temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``num_samples`` prompt + response sequences sampled at ``temperature``, as PPO's rollout lays them out.

    Prompts are visited in seeded shuffled epochs (every prompt once before any repeats). Returns
    input_ids (N, P+R) — prompt left-padded, response right-padded, R = max_new_tokens — and the
    (N, P+R) attention mask. The same ``seed`` and ``chunk_size`` give the same samples.
    """
    order = PromptSampler(len(prompts), seed=seed).next_batch(num_samples)
    prompt_ids, prompt_mask = left_pad([prompts[i] for i in order], tokenizer.pad_token_id)  # (N, P)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, eos_ids=eos_token_ids(tokenizer, policy),
                                  pad_id=tokenizer.pad_token_id, temperature=temperature)
    policy.eval()
    torch.manual_seed(seed)
    ids, masks = [], []
    for start in range(0, num_samples, chunk_size):
        p_ids = prompt_ids[start : start + chunk_size].to(device)
        p_mask = prompt_mask[start : start + chunk_size].to(device)
        response, response_mask, _ = sample_responses(policy, p_ids, p_mask, settings, tokenizer)
        pad = max_new_tokens - response.shape[1]  # generation stops early when every row has ended
        response = nn.functional.pad(response, (0, pad), value=tokenizer.pad_token_id)
        response_mask = nn.functional.pad(response_mask.long(), (0, pad), value=0)
        ids.append(torch.cat([p_ids, response], dim=1).cpu())
        masks.append(torch.cat([p_mask.long(), response_mask], dim=1).cpu())
    return torch.cat(ids), torch.cat(masks)


@torch.no_grad()
def score_sequences(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, chunk_size: int = 32,
                    device: torch.device = torch.device("cpu")) -> Tensor:
    """(N,) float32 scores on CPU, in chunks, model in eval mode."""
    model.eval()
    chunks = [
        reward_model_forward(model, input_ids[i : i + chunk_size].to(device),
                             attention_mask[i : i + chunk_size].to(device)).cpu()
        for i in range(0, input_ids.shape[0], chunk_size)
    ]
    return torch.cat(chunks)


def normalize_reward_head(model: nn.Module, mean: float, std: float) -> str:
    """Rescale the scores to ``(s - mean) / std``: ``w ← w/std``, ``b ← (b - mean)/std``.

    Decoder heads in transformers have no bias (``nn.Linear(..., bias=False)``), and a bias added
    to them would be dropped by ``from_pretrained``. The shift then goes into the bias of the final
    norm, whose output feeds only the head: adding ``c·w/|w|²`` there adds exactly ``c`` to every
    score. Returns where the shift went ("head bias" or the norm's module name).
    """
    head = score_head(model)
    if head is None or head.weight.shape[0] != 1:
        raise ValueError("score normalisation needs a decoder reward model with a one-output `score` head")
    if not math.isfinite(std) or std <= 0 or not math.isfinite(mean):
        raise ValueError(f"cannot normalise scores with mean {mean} and std {std}: the policy's responses must "
                         "score differently (raise normalize_samples or normalize_max_new_tokens)")
    shift = -mean / std
    with torch.no_grad():
        head.weight.div_(std)
        if head.bias is not None:
            head.bias.sub_(mean).div_(std)
            return "head bias"
        name, norm = final_norm(model)
        weight = head.weight[0].to(norm.bias.dtype)  # (H,)
        norm.bias.add_(shift * weight / weight.dot(weight))
    return name


def final_norm(model: nn.Module) -> tuple[str, nn.Module]:
    """The norm module (with a bias) whose output is the backbone's last_hidden_state.

    Found by watching one forward pass rather than by name, so it works for ``ln_f`` (GPT-2),
    ``final_layer_norm`` (OPT, GPT-NeoX) and friends alike.
    """
    base = model.base_model
    candidates = {name: module for name, module in base.named_modules()
                  if "norm" in type(module).__name__.lower()
                  and isinstance(getattr(module, "bias", None), nn.Parameter)}
    outputs: dict[str, Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, module in candidates.items()]
    try:
        device = next(model.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        with torch.no_grad():
            hidden = last_hidden_state(base, ids, torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
    for name, out in outputs.items():
        if isinstance(out, Tensor) and out.shape == hidden.shape and torch.equal(out, hidden):
            return name, candidates[name]
    raise ValueError(
        f"cannot normalise the scores of {type(model).__name__}: its score head has no bias and its final norm "
        "has none either (e.g. RMSNorm), so a constant shift cannot be stored in weights that "
        "AutoModelForSequenceClassification loads. Unset normalize_policy, or apply the shift at PPO time "
        "(e.g. normalize_scores=true)."
    )
