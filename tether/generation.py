"""Generation backends: who samples the responses of a rollout (DESIGN §2, one of the real swaps).

  BuiltinSampler  tether's own batched sampler on the policy modules (any device; the default)
  VLLMBackend     a vLLM engine colocated on the training GPU (`pip install 'tether[vllm]'`)

A backend only samples. Log-probs for PPO are always recomputed by the trainer's own forward
(never taken from the engine), and when an engine reports the log-probs of what it sampled,
the gap between the two is logged (`generation/logprob_gap`): a silent mismatch between the
sampler and the trainer is a known cause of collapse (verl #6780, AReaL #1290).
After every update the trainer calls `sync_weights`, so the engine samples from the new policy.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

@dataclass
class Generation:
    response_ids: Tensor                      # (B, R) right-padded with pad_id
    response_mask: Tensor                     # (B, R) True up to and including EOS / the stop string's last token
    ended: Tensor                             # (B,)   True when EOS or a stop string ended the response
    engine_logprobs: Optional[Tensor] = None  # (B, R) the engine's own log-probs of its samples, if it reports them


class GenerationBackend(Protocol):
    def generate(self, roles, prompt_ids: Tensor, prompt_mask: Tensor, settings, tokenizer) -> Generation:
        """Sample one response per left-padded prompt row."""
        ...

    def sync_weights(self, roles) -> None:
        """Called after every update: from now on, sample from the roles' current policy."""
        ...


class BuiltinSampler:
    """tether's batched KV-cache sampler on the live policy module: nothing to sync."""

    def generate(self, roles, prompt_ids, prompt_mask, settings, tokenizer) -> Generation:
        return Generation(*roles.sample(prompt_ids, prompt_mask, settings, tokenizer))

    def sync_weights(self, roles) -> None:
        pass


class VLLMBackend:
    """A vLLM `LLM` (or anything with its `generate` and weight-loading surface) as the sampler.

    Weights after each update: placement=separate pushes the policy's full state dict into the
    engine's model (`load_weights`, Hugging Face names); placement=shared_base saves only the
    policy adapter and samples with it as a new `LoRARequest` (the engine holds the base once)."""

    def __init__(self, engine: Any, scratch_dir: Optional[Path] = None):
        self.engine = engine
        self.scratch_dir = Path(scratch_dir) if scratch_dir else None
        self.adapter_version = 0
        self.lora_request = None

    @classmethod
    def start(cls, model_path: str, cfg, scratch_dir: Path, seed: int) -> "VLLMBackend":
        """A colocated engine on this rank's GPU (tensor parallel 1, a share of its memory)."""
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("generation_backend=vllm needs vLLM: pip install 'tether[vllm]' (CUDA GPUs only)") from err
        engine = LLM(model=model_path, dtype=cfg.dtype, seed=seed, enable_lora=cfg.placement == "shared_base",
                     max_lora_rank=max(cfg.lora_rank, 8), gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                     max_model_len=cfg.max_prompt_length + cfg.max_new_tokens + 8)
        return cls(engine, scratch_dir)

    def generate(self, roles, prompt_ids, prompt_mask, settings, tokenizer) -> Generation:
        prompts = [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in zip(prompt_ids, prompt_mask)]
        extra = {"lora_request": self.lora_request} if self.lora_request is not None else {}
        outputs = self.engine.generate(prompts, self.sampling_params(settings), use_tqdm=False, **extra)
        return responses_from_outputs([o.outputs[0] for o in outputs], settings, prompt_ids.device)

    def sampling_params(self, settings):
        from vllm import SamplingParams

        # logprobs=0: the log-prob of each sampled token only. pad is never sampled (as the built-in sampler).
        return SamplingParams(n=1, temperature=settings.temperature, top_k=settings.top_k or -1, top_p=settings.top_p,
                              max_tokens=settings.max_new_tokens, min_tokens=settings.min_new_tokens,
                              stop=list(settings.stop_strings) or None, stop_token_ids=list(settings.eos_ids),
                              logprobs=0, logit_bias={settings.pad_id: -100.0})

    def sync_weights(self, roles) -> None:
        if hasattr(roles, "policy_adapter"):
            self._sync_adapter(roles)
        else:
            from tether.sharding import whole_state

            weights = whole_state(roles.policy) or roles.policy.state_dict()  # FSDP2: the engine takes whole tensors
            engine_model(self.engine).load_weights(weights.items())

    def _sync_adapter(self, roles) -> None:
        from vllm.lora.request import LoRARequest

        if self.scratch_dir is None:
            raise ValueError("VLLMBackend needs a scratch_dir to hand the policy adapter to the engine")
        self.adapter_version += 1
        path = self.scratch_dir / f"policy-adapter-{self.adapter_version}"
        roles.policy_adapter(path)
        self.lora_request = LoRARequest("policy", self.adapter_version, str(path))
        old = self.scratch_dir / f"policy-adapter-{self.adapter_version - 1}"
        shutil.rmtree(old, ignore_errors=True)


def engine_model(engine: Any):
    """The torch model inside a vLLM engine (its `load_weights` takes Hugging Face names); a stand-in
    engine may expose `load_weights` itself."""
    if hasattr(engine, "load_weights"):
        return engine
    executor = engine.llm_engine.model_executor
    return executor.driver_worker.model_runner.model


def responses_from_outputs(outputs: list, settings, device) -> Generation:
    """vLLM completion outputs (token_ids, logprobs, finish_reason) -> right-padded tensors."""
    width = max(1, max(len(o.token_ids) for o in outputs))
    ids = torch.full((len(outputs), width), settings.pad_id, dtype=torch.long)
    mask = torch.zeros(len(outputs), width, dtype=torch.bool)
    logprobs = torch.zeros(len(outputs), width)
    ended = torch.zeros(len(outputs), dtype=torch.bool)
    for row, out in enumerate(outputs):
        tokens = list(out.token_ids)
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
        ended[row] = out.finish_reason == "stop"
        for col, (token, entry) in enumerate(zip(tokens, out.logprobs or [])):
            value = entry[token]
            logprobs[row, col] = getattr(value, "logprob", value)
    return Generation(ids.to(device), mask.to(device), ended.to(device), logprobs.to(device))


def logprob_gap(engine_logprobs: Tensor, logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, max) of |engine − trainer| log-prob over real response tokens: the caller divides the
    sum by the token count (over every rank)."""
    gap = torch.where(mask.bool(), (engine_logprobs - logprobs).abs(), torch.zeros((), device=logprobs.device))
    return gap.sum(), gap.max() if gap.numel() else torch.zeros(())
