"""Numeric precision of a stage, named as the ecosystem names it (DESIGN §8).

  fp32        every weight, gradient and optimizer state in float32; no autocast
  bf16-mixed  trainable weights and AdamW state in float32 (the master copy), forward and backward
              under bfloat16 autocast; frozen roles (reference, reward model, the frozen base of
              placement=shared_base) stored in bfloat16; FSDP2 gathers bf16 weights and reduces
              gradients in fp32 (MixedPrecisionPolicy). What TRL (fp32 weights + bf16 autocast),
              verl (FSDP mixed precision) and OpenRLHF (bf16 with fp32 masters) train with.
  bf16-true   everything in bfloat16, as `dtype=bfloat16` was: a step smaller than half a unit in
              the last place of a bf16 weight (2^-8 relative) rounds away, so small learning rates
              barely move it (measured: 14% of weights changed in 16 steps at lr 1e-5; fp32: 100%).
  auto        bf16-mixed on a CUDA device that supports bf16, fp32 elsewhere (CPUs: bf16 matmuls are
              slower than fp32 on most of them).

fp16-mixed is refused: float16 gradients under- and overflow without a dynamic loss scaler, which
tether does not have. Log-probs, KL, advantages and losses are float32 at every precision
(tether/algo upcasts the logits; autocast lowers matmuls only).
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
LEGACY_DTYPES = {"float32": "fp32", "bfloat16": "bf16-true"}  # what the old `dtype` key meant


@dataclass(frozen=True)
class Precision:
    name: str                       # fp32 | bf16-mixed | bf16-true
    trainable: torch.dtype          # weights that learn, their gradients and optimizer state
    frozen: torch.dtype             # weights that never learn (reference, reward model, a shared base)
    autocast: Optional[torch.dtype]  # forward/backward compute dtype under torch.autocast; None = off

    @property
    def mixed(self) -> bool:
        return self.autocast is not None

    def model_dtype(self, lora: bool) -> torch.dtype:
        """A model's stored dtype: under LoRA its base never learns (the frozen dtype; peft keeps the
        adapters in fp32, autocast_adapter_dtype), a fully trained model does (the trainable dtype)."""
        return self.frozen if lora else self.trainable

    def forward_context(self, device: torch.device):
        """Where models run their forwards (backward follows the dtypes autocast chose)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)


FP32 = Precision("fp32", torch.float32, torch.float32, None)
BF16_MIXED = Precision("bf16-mixed", torch.float32, torch.bfloat16, torch.bfloat16)
BF16_TRUE = Precision("bf16-true", torch.bfloat16, torch.bfloat16, None)
BY_NAME = {p.name: p for p in (FP32, BF16_MIXED, BF16_TRUE)}


class PrecisionError(ValueError):
    """A precision that cannot run here; the message says what to use."""


def precision_name(precision: str, dtype: Optional[str]) -> str:
    """The configured precision, reading the old `dtype` key where it is set (float32 -> fp32,
    bfloat16 -> bf16-true); refuses what cannot run."""
    if dtype is not None:
        if precision != "auto":
            raise PrecisionError(f"dtype={dtype} and precision={precision} are both set; dtype is replaced by "
                                 "precision: remove dtype")
        if dtype not in LEGACY_DTYPES:
            raise PrecisionError(f"dtype={dtype} is not supported: float16 training needs a loss scaler, which "
                                 "tether does not have; use precision=bf16-mixed (GPUs from Ampere on) or fp32")
        precision = LEGACY_DTYPES[dtype]
    if precision == "fp16-mixed":
        raise PrecisionError("precision=fp16-mixed is not supported: float16 gradients need a dynamic loss "
                             "scaler, which tether does not have; use precision=bf16-mixed (GPUs from Ampere "
                             "on, and CPUs) or fp32")
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, dtype: Optional[str], device: torch.device) -> Precision:
    """`auto` made concrete for `device`; a bf16 precision on a GPU without bf16 refused."""
    name = precision_name(precision, dtype)
    if name == "auto":
        name = "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name != "fp32" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"precision={name}: this GPU has no bfloat16 support; use precision=fp32")
    if name == "bf16-true":
        log.warning("precision=bf16-true keeps the weights and optimizer state in bfloat16: updates smaller than "
                    "2^-8 of a weight round away, so small learning rates barely move the model; "
                    "precision=bf16-mixed keeps float32 master weights at bf16 speed")
    return BY_NAME[name]


def keep_lm_head_fp32(model: nn.Module) -> None:
    """Run the output projection in float32 even under autocast: the logits PPO's ratio is taken
    from then carry fp32 rounding only (the head's weights are converted once, here)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_tether_fp32", False):
        return
    head.float()
    plain_forward = head.forward

    def forward(self, hidden):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return plain_forward(hidden.float())

    head.forward = types.MethodType(forward, head)
    head._tether_fp32 = True
