"""Generation backends: who samples the responses of a rollout (DESIGN §2, one of the real swaps).

  BuiltinSampler  tether's own batched sampler on the policy modules (any device; the default)
  VLLMBackend     a vLLM engine in the trainer's process on each rank's GPU (`pip install 'tether[vllm]'`)

A backend only samples. Log-probs for PPO are always recomputed by the trainer's own forward
(never taken from the engine), and when an engine reports the log-probs of what it sampled,
the gap between the two is logged (`generation/logprob_gap`): a silent mismatch between the
sampler and the trainer is a known cause of collapse (verl #6780, AReaL #1290).
After every update the trainer calls `sync_weights`, so the engine samples from the new policy.

The vLLM backend is written against one release, vLLM 0.33.0 (the `tether[vllm]` pin). Every
keyword and method it passes to vLLM is declared below (`LLM_KEYWORDS`, ...), calls are built
only through `declared`, and `tools/check_vllm_standin.py` checks each declared name against that
release's source. It has never run against a real vLLM on a GPU: tests/test_generation.py runs it
against a stand-in with the release's signatures (DESIGN §8: an engine is a guest in our process).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from tether import distributed
from tether.config import VLLM_RELEASE, engine_lora_rank
from tether.sampling import truncates
from tether.sharding import whole_state

log = logging.getLogger(__name__)

# --- what tether asks of vLLM 0.33.0 (checked by tools/check_vllm_standin.py) -------------------

# LLM(...): its own parameters, the rest go to EngineArgs (vllm/entrypoints/llm.py, vllm/engine/arg_utils.py).
LLM_KEYWORDS = ("model", "tokenizer", "dtype", "seed", "tensor_parallel_size", "distributed_executor_backend",
                "gpu_memory_utilization", "max_model_len", "enable_prefix_caching", "enable_lora", "max_lora_rank",
                "enable_sleep_mode", "logprobs_mode", "generation_config")
# The LLM methods the backend calls, and the keywords it passes them (vllm/entrypoints/llm.py).
LLM_METHODS = {
    "generate": ("prompts", "sampling_params", "use_tqdm", "lora_request"),
    "apply_model": ("func",),
    "reset_prefix_cache": (),
    "sleep": ("level",),
    "wake_up": ("tags",),
}
SAMPLING_PARAMS_KEYWORDS = ("n", "temperature", "top_k", "top_p", "max_tokens", "min_tokens", "stop",
                            "stop_token_ids", "logprobs", "logit_bias")  # vllm/sampling_params.py
LORA_REQUEST_KEYWORDS = ("lora_name", "lora_int_id", "lora_path")  # vllm/lora/request.py
# One engine per torchrun process, built from RANK / LOCAL_RANK, its core in this process
# (vllm/v1/executor/uniproc_executor.py ExecutorWithExternalLauncher; config/parallel.py).
EXECUTOR_BACKEND = "external_launcher"
IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": EngineCore stays in this process (v1/engine/llm_engine.py)
# Log-probs after temperature, top-k/top-p and logit bias: the distribution actually sampled
# (vllm/config/model.py LogprobsMode; the default, raw_logprobs, is before temperature).
LOGPROBS_MODE = "processed_logprobs"
# Level 1 offloads the engine's weights to CPU and drops its KV cache; level 2 would discard the
# weights (vllm/v1/worker/gpu_worker.py sleep), which only a push right after waking could refill:
# chunked rollouts, dynamic-sampling rounds and skipped updates generate again without one.
SLEEP_LEVEL = 1
ENGINE_MEMORY = ("weights", "kv_cache")  # wake_up tags (vllm/v1/executor/abstract.py SLEEP_TAGS)
PAD_LOGIT_BIAS = -100.0  # the most negative bias vLLM's own requests use (sampling_params.py clamps to ±100)


def declared(allowed: tuple, call: str, **keywords) -> dict:
    """`keywords`, refused when one is not among the names checked against the pinned release."""
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise TypeError(f"{call}: {unknown} not declared for vLLM {VLLM_RELEASE} in tether/generation.py; declare "
                        "it there and run tools/check_vllm_standin.py against the release's source")
    return keywords


# --- the backends ------------------------------------------------------------------------------


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
    """tether's batched KV-cache sampler on the live policy module: nothing to sync.

    With top_k / top_p / min_new_tokens it samples from a truncated distribution q while PPO scores
    under the policy's π (as verl and OpenRLHF do); it measures the gap log q(a) - log π(a) over
    the response tokens it samples, for `generation/truncation_gap`."""

    def __init__(self):
        self.gap_sum, self.gap_tokens = 0.0, 0

    def generate(self, roles, prompt_ids, prompt_mask, settings, tokenizer) -> Generation:
        gaps = [] if truncates(settings) else None
        generation = Generation(*roles.sample(prompt_ids, prompt_mask, settings, tokenizer, gaps=gaps))
        if gaps:
            real = generation.response_mask[:, : len(gaps)]
            self.gap_sum += (torch.stack(gaps, 1) * real).sum().item()
            self.gap_tokens += int(real.sum())
        return generation

    def take_truncation_gap(self) -> Optional[float]:
        """Mean nats per response token since the last call (None: nothing truncated)."""
        if not self.gap_tokens:
            return None
        gap, (self.gap_sum, self.gap_tokens) = self.gap_sum / self.gap_tokens, (0.0, 0)
        return gap

    def sync_weights(self, roles) -> None:
        pass


class VLLMBackend:
    """A vLLM 0.33.0 `LLM` in this process, on this rank's GPU, as the sampler.

    Weights after each update: placement=separate pushes the policy's full state dict into the
    engine's model (`load_weights`, Hugging Face names, through `LLM.apply_model`);
    placement=shared_base saves only the policy adapter and samples with it as a new `LoRARequest`
    (the engine holds the base once). Either way the prefix cache is reset after the push: its KV
    was computed with the old weights.

    With `sleeps`, the engine releases its GPU memory (KV cache dropped, weights offloaded to CPU)
    as soon as a generation is done, so scoring and optimisation have the GPU; it wakes its weights
    for a push, and everything before it samples again. The trainer calls nothing new."""

    def __init__(self, engine: Any, scratch_dir: Optional[Path] = None, vocab_size: Optional[int] = None,
                 sleeps: bool = False):
        self.engine = engine
        self.scratch_dir = Path(scratch_dir) if scratch_dir else None
        self.vocab_size = vocab_size  # the engine's vocabulary: the model config's vocab_size (None: unknown)
        self.sleeps = sleeps
        self.asleep: set[str] = set()  # the engine memories (ENGINE_MEMORY) released now
        self.adapter_version = 0
        self.lora_request = None

    @classmethod
    def start(cls, model_path: str, cfg, scratch_dir: Path, seed: int) -> "VLLMBackend":
        """An engine on this rank's GPU, in this process (tensor parallel 1, a share of the GPU's memory)."""
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("generation_backend=vllm needs vLLM: pip install 'tether[vllm]' (CUDA GPUs only)") \
                from err
        local_rank = place_engine_on_this_rank()
        engine = LLM(**engine_arguments(model_path, cfg, seed))
        log.info("vLLM engine on cuda:%d (%s, sleeps between rollouts: %s)", local_rank, engine_dtype(cfg),
                 cfg.vllm_sleep)
        return cls(engine, scratch_dir, vocab_size=model_vocab_size(model_path), sleeps=cfg.vllm_sleep)

    def generate(self, roles, prompt_ids, prompt_mask, settings, tokenizer) -> Generation:
        self._wake(*ENGINE_MEMORY)
        prompts = [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in zip(prompt_ids, prompt_mask)]
        outputs = self._call("generate", prompts=prompts, sampling_params=self.sampling_params(settings),
                             use_tqdm=False, lora_request=self.lora_request)
        self._sleep()  # scoring and optimisation get the GPU memory
        return responses_from_outputs([o.outputs[0] for o in outputs], settings, prompt_ids.device)

    def sampling_params(self, settings):
        from vllm import SamplingParams

        # logprobs=0: the log-prob of each sampled token only. top_k=0 is "off" in both tether and
        # vLLM (sampling_params.py). pad is never sampled, as with the built-in sampler, but a bias
        # is sent only for an id the engine has: vLLM rejects the request otherwise (_validate_logit_bias).
        bias = {settings.pad_id: PAD_LOGIT_BIAS} if self.in_vocabulary(settings.pad_id) else None
        return SamplingParams(**declared(
            SAMPLING_PARAMS_KEYWORDS, "SamplingParams", n=1, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, max_tokens=settings.max_new_tokens, min_tokens=settings.min_new_tokens,
            stop=list(settings.stop_strings) or None, stop_token_ids=list(settings.eos_ids), logprobs=0,
            logit_bias=bias))

    def in_vocabulary(self, token_id: int) -> bool:
        return self.vocab_size is None or 0 <= token_id < self.vocab_size

    def sync_weights(self, roles) -> None:
        if hasattr(roles, "policy_adapter"):
            self._push_adapter(roles)
        else:
            self._wake("weights")  # the KV cache stays released until the next generation
            self._push_full_weights(roles)
        # KV computed with the old weights (or adapter) must not serve the next rollout's prompts.
        if not self._call("reset_prefix_cache"):
            raise RuntimeError("vLLM did not reset its prefix cache after the weight push (requests still running?); "
                               "its cached KV was computed with the previous policy")

    def _push_full_weights(self, roles) -> None:
        weights = whole_state(roles.policy) or roles.policy.state_dict()  # FSDP2: the engine takes whole tensors
        weights = engine_vocabulary_rows(weights, roles.policy.get_input_embeddings().num_embeddings, self.vocab_size)
        self._call("apply_model", func=weight_loader(weights))

    def _push_adapter(self, roles) -> None:
        from vllm.lora.request import LoRARequest

        if self.scratch_dir is None:
            raise ValueError("VLLMBackend needs a scratch_dir to hand the policy adapter to the engine")
        self.adapter_version += 1
        path = self.scratch_dir / f"policy-adapter-{self.adapter_version}"
        roles.policy_adapter(path)
        # A new id, name and path: the engine loads the new adapter instead of its cached one, and
        # its prefix-cache keys (name, path) change with it (vllm/v1/core/kv_cache_utils.py).
        self.lora_request = LoRARequest(**declared(
            LORA_REQUEST_KEYWORDS, "LoRARequest", lora_name=f"policy-{self.adapter_version}",
            lora_int_id=self.adapter_version, lora_path=str(path)))
        shutil.rmtree(self.scratch_dir / f"policy-adapter-{self.adapter_version - 1}", ignore_errors=True)

    def _sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self._call("sleep", level=SLEEP_LEVEL)
            self.asleep = set(ENGINE_MEMORY)

    def _wake(self, *memories: str) -> None:
        # Only what is asleep: vLLM ignores the whole call when one tag is already awake (abstract.py).
        tags = [m for m in memories if m in self.asleep]
        if tags:
            self._call("wake_up", tags=tags)
            self.asleep -= set(tags)

    def _call(self, method: str, **keywords):
        if method not in LLM_METHODS:
            raise TypeError(f"LLM.{method} is not declared for vLLM {VLLM_RELEASE} in tether/generation.py")
        return getattr(self.engine, method)(**declared(LLM_METHODS[method], f"LLM.{method}", **keywords))


def weight_loader(weights: dict[str, Tensor]):
    """What `LLM.apply_model` runs on the engine's model: its `load_weights` takes (Hugging Face name,
    tensor) pairs and copies them into its own layout. The engine core is in this process, so the
    function is called directly, never pickled (vllm/v1/executor/uniproc_executor.py, run_method)."""

    def load(model) -> None:
        model.load_weights(weights.items())

    return load


def engine_vocabulary_rows(weights: dict[str, Tensor], trainer_rows: int, engine_rows: Optional[int]) -> dict:
    """The trainer's embedding and LM head grow by a pad row when the tokenizer has no spare id
    (GPT-2: tether/models.py `pad_token_inside_embeddings`); the engine keeps the rows it was
    saved with and asserts that size on load (vllm/model_executor/layers/vocab_parallel_embedding.py).
    Tensors whose first dimension is the trainer's vocabulary are cut to the engine's: the extra
    row is the pad, which the engine is never fed (prompts go unpadded) and never samples."""
    if engine_rows is None or trainer_rows <= engine_rows:
        return weights
    return {name: w[:engine_rows] if w.dim() and w.shape[0] == trainer_rows else w for name, w in weights.items()}


# --- engine settings ---------------------------------------------------------------------------


def engine_arguments(model_path: str, cfg, seed: int) -> dict:
    """LLM(...) keywords for this run's engine."""
    lora = cfg.placement == "shared_base"
    extra = {"max_lora_rank": engine_lora_rank(cfg.lora_rank)} if lora else {}
    return declared(
        LLM_KEYWORDS, "LLM", model=model_path, tokenizer=getattr(cfg, "tokenizer", None) or model_path,
        dtype=engine_dtype(cfg), seed=seed, tensor_parallel_size=1, distributed_executor_backend=EXECUTOR_BACKEND,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        max_model_len=cfg.max_prompt_length + cfg.max_new_tokens + 8, enable_prefix_caching=True,
        enable_lora=lora, enable_sleep_mode=cfg.vllm_sleep, logprobs_mode=LOGPROBS_MODE,
        # vLLM's neutral defaults, not the model's generation_config.json (whose max_new_tokens would
        # cap every request); tether passes every sampling setting itself (config/model.py).
        generation_config="vllm", **extra)


def place_engine_on_this_rank() -> int:
    """Set up this process for its engine; returns the GPU index it gets.

    external_launcher takes the engine's rank and GPU from RANK and LOCAL_RANK, joins an existing
    process group or makes one with env:// (vllm/v1/executor/uniproc_executor.py _distributed_args,
    distributed/parallel_state.py); each torchrun rank is then an engine of tensor parallel 1. One
    process outside torchrun gets the variables of a world of one."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ[IN_PROCESS_ENV] = "0"  # the weight push needs the model in this process (external_launcher sets it too)
    local_rank = distributed.local_rank()
    torch.cuda.set_device(local_rank)
    return local_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINE_DTYPES = {"fp32": "float32", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "fp16-mixed": "float16"}


def engine_dtype(cfg) -> str:
    """The engine's weights in the dtype the trainer's forwards run in: bf16 for bf16-mixed (the
    trainer's fp32 master weights are cast on load), else what the config's dtype says."""
    precision = getattr(cfg, "precision", None)
    if precision in ENGINE_DTYPES:
        return ENGINE_DTYPES[precision]
    return getattr(cfg, "dtype", None) or "float32"


def model_vocab_size(path: str) -> int:
    """Rows of the model's embedding as saved: an engine's vocabulary (vLLM's ModelConfig.get_vocab_size)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).get_text_config().vocab_size


def engine_embedding_rows(cfg) -> Optional[int]:
    """The vocabulary an engine will hold, when one is configured: the pad token must fit inside it."""
    return model_vocab_size(cfg.policy) if cfg.generation_backend == "vllm" else None


# --- outputs -----------------------------------------------------------------------------------


def responses_from_outputs(outputs: list, settings, device) -> Generation:
    """vLLM CompletionOutputs (token_ids, logprobs: one {token_id: Logprob} per token, finish_reason)
    -> right-padded tensors. finish_reason "stop": EOS, a stop token or a stop string (vllm/outputs.py)."""
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
            logprobs[row, col] = entry[token].logprob
    return Generation(ids.to(device), mask.to(device), ended.to(device), logprobs.to(device))


def logprob_gap(engine_logprobs: Tensor, logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, max) of |engine − trainer| log-prob over real response tokens: the caller divides the
    sum by the token count (over every rank)."""
    gap = torch.where(mask.bool(), (engine_logprobs - logprobs).abs(), torch.zeros((), device=logprobs.device))
    return gap.sum(), gap.max() if gap.numel() else torch.zeros(())
