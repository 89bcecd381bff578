"""Generation backends: the vLLM adapter against a stand-in engine with vLLM 0.33.0's signatures
(no vLLM on CPU machines; tools/check_vllm_standin.py checks these signatures against the release's
source), the pad token an engine needs, and the engine/trainer log-prob gap."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
from torch import nn

from tether.generation import (
    BuiltinSampler,
    VLLMBackend,
    declared,
    engine_arguments,
    engine_dtype,
    logprob_gap,
    model_vocab_size,
)
from tether.config import engine_lora_rank
from tether.sampling import GenerationSettings

REPO = Path(__file__).resolve().parents[1]


# --- the stand-in: vLLM 0.33.0's objects, the parts tether uses, same names ------------------------


@dataclass
class Logprob:  # vllm/logprobs.py
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:  # vllm/outputs.py
    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float]
    logprobs: Optional[list]
    finish_reason: Optional[str] = None


@dataclass
class RequestOutput:  # vllm/outputs.py
    request_id: str
    outputs: list


@dataclass(kw_only=True)
class SamplingParams:  # vllm/sampling_params.py, its defaults
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Any = None
    stop_token_ids: Optional[list] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    logit_bias: Optional[dict] = None


@dataclass
class LoRARequest:  # vllm/lora/request.py
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


class StandInModel:
    """The engine's model: `load_weights` takes (Hugging Face name, tensor) pairs and, like vLLM's
    VocabParallelEmbedding, refuses an embedding or LM head of another vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.loaded = vocab_size, []

    def load_weights(self, weights):
        weights = {name: w.clone() for name, w in weights}
        for name, w in weights.items():
            if any(part in name for part in ("wte", "embed_tokens", "lm_head")) and w.shape[0] != self.vocab_size:
                raise AssertionError(f"{name}: {w.shape[0]} rows, the engine's vocabulary has {self.vocab_size}")
        self.loaded.append(weights)
        return set(weights)


class StandInLLM:
    """vLLM 0.33.0's `LLM` as tether uses it (vllm/entrypoints/llm.py), with its parameter names.
    Where a mistake would show on the real engine, it fails too: generate or a weight load on a
    sleeping engine, a logit bias outside the vocabulary (sampling_params.py _validate_logit_bias),
    sleep without enable_sleep_mode. Every call is recorded in `events`."""

    def __init__(self, model, *, tokenizer=None, tensor_parallel_size=1, dtype="auto", seed=0,
                 gpu_memory_utilization=0.92, **kwargs):
        self.kwargs = dict(model=model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                           seed=seed, gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        self.environment = dict(os.environ)  # what the engine saw when it was built
        self.vocab_size = model_vocab_size(model) if Path(model).is_dir() else 16
        self.model = StandInModel(self.vocab_size)
        self.asleep: set[str] = set()
        self.events: list = []

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None):
        if self.asleep:
            raise RuntimeError(f"generate on a sleeping engine ({sorted(self.asleep)} released)")
        bias = sampling_params.logit_bias or {}
        if any(not 0 <= t < self.vocab_size for t in bias):
            raise ValueError(f"token_id(s) {sorted(bias)} in logit_bias contain out-of-vocab token ids")
        self.events.append(("generate", lora_request))
        self.last_request = (prompts, sampling_params, lora_request)
        return [RequestOutput(str(i), [self.completion(i, sampling_params)]) for i in range(len(prompts))]

    @staticmethod
    def completion(i: int, params) -> CompletionOutput:
        tokens = [5 + i, 6, 0] if i % 2 == 0 else [7, 8, 9, 10]  # even rows end with EOS (id 0)
        tokens = tokens[: params.max_tokens]
        logprobs = [{t: Logprob(-0.5 * (k + 1), rank=1)} for k, t in enumerate(tokens)]
        return CompletionOutput(0, "", tokens, None, logprobs, "stop" if tokens[-1] == 0 else "length")

    def apply_model(self, func):
        if "weights" in self.asleep:
            raise RuntimeError("weights loaded into a sleeping engine")
        self.events.append(("apply_model",))
        return [func(self.model)]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.events.append(("reset_prefix_cache",))
        return True

    def sleep(self, level=1, mode="abort"):
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("sleep mode is not enabled")
        self.events.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags) if tags is not None else None))
        self.asleep -= set(tags) if tags is not None else set(self.asleep)
        return not self.asleep


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm, vllm.lora.request as the stand-in: vLLM itself is imported lazily and is absent here."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = StandInLLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


class TinyLM(nn.Module):
    """An embedding and an LM head of `rows` tokens, named as Hugging Face names GPT-2's."""

    def __init__(self, rows: int = 16):
        super().__init__()
        self.wte = nn.Embedding(rows, 4)
        self.lm_head = nn.Linear(4, rows, bias=False)

    def get_input_embeddings(self):
        return self.wte


def names(events):
    return [e[0] for e in events]


SETTINGS = GenerationSettings(max_new_tokens=4, eos_ids=[0], pad_id=1, temperature=0.7, min_new_tokens=1,
                              stop_strings=["."])


# --- sampling -------------------------------------------------------------------------------------


def test_engine_outputs_become_right_padded_responses_with_the_engine_logprobs(fake_vllm):
    engine = StandInLLM("model")
    backend = VLLMBackend(engine, vocab_size=engine.vocab_size)
    prompt_ids = torch.tensor([[1, 1, 4, 5], [3, 4, 5, 6]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = backend.generate(None, prompt_ids, prompt_mask, SETTINGS, None)
    prompts, params, _ = engine.last_request
    assert prompts == [{"prompt_token_ids": [4, 5]}, {"prompt_token_ids": [3, 4, 5, 6]}]  # left padding dropped
    assert (params.temperature, params.max_tokens, params.min_tokens, params.stop, params.stop_token_ids) == \
           (0.7, 4, 1, ["."], [0])
    assert (params.top_k, params.logprobs) == (0, 0)  # 0: no top-k in vLLM as in tether; the sampled token's log-prob
    assert params.logit_bias == {1: -100.0}  # pad is never sampled, as with the built-in sampler
    assert out.response_ids.tolist() == [[5, 6, 0, 1], [7, 8, 9, 10]]
    assert out.response_mask.tolist() == [[True, True, True, False], [True] * 4]
    assert out.ended.tolist() == [True, False]
    assert out.engine_logprobs[1].tolist() == [-0.5, -1.0, -1.5, -2.0]
    assert out.engine_logprobs[0, 3] == 0


def test_a_pad_id_outside_the_engine_vocabulary_gets_no_logit_bias(fake_vllm):
    engine = StandInLLM("model")  # 16 tokens: GPT-2's case, where the trainer's pad is the 17th
    settings = GenerationSettings(max_new_tokens=4, eos_ids=[0], pad_id=16)
    with pytest.raises(ValueError, match="out-of-vocab"):  # what vLLM does with such a bias
        engine.generate([{"prompt_token_ids": [3]}], SamplingParams(logit_bias={16: -100.0}))
    out = VLLMBackend(engine, vocab_size=16).generate(None, torch.tensor([[3, 4]]), torch.ones(1, 2), settings, None)
    assert engine.last_request[1].logit_bias is None
    assert out.response_ids.tolist() == [[5, 6, 0]]


# --- weights --------------------------------------------------------------------------------------


def test_sync_pushes_the_updated_policy_weights_through_the_in_process_model(fake_vllm):
    engine = StandInLLM("model")
    policy = TinyLM(16)
    backend = VLLMBackend(engine, vocab_size=16)
    backend.sync_weights(SimpleNamespace(policy=policy))
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)  # an update
    backend.sync_weights(SimpleNamespace(policy=policy))
    first, second = engine.model.loaded
    assert torch.equal(second["lm_head.weight"], policy.lm_head.weight)
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])
    assert names(engine.events) == ["apply_model", "reset_prefix_cache"] * 2  # stale KV never reused


def test_a_pad_row_the_engine_lacks_is_cut_from_the_weight_push(fake_vllm):
    engine = StandInLLM("model")
    policy = TinyLM(17)  # the trainer's model grew a pad row (GPT-2)
    with pytest.raises(AssertionError, match="17 rows"):  # what vLLM's embedding loader does with it
        engine.model.load_weights(policy.state_dict().items())
    VLLMBackend(engine, vocab_size=16).sync_weights(SimpleNamespace(policy=policy))
    loaded = engine.model.loaded[-1]
    assert loaded["wte.weight"].shape == (16, 4) and loaded["lm_head.weight"].shape == (16, 4)
    assert torch.equal(loaded["wte.weight"], policy.wte.weight[:16])


def test_sync_with_a_shared_base_hands_over_only_the_new_policy_adapter(fake_vllm, tmp_path):
    saved = []

    def policy_adapter(path):
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_text(f"version {len(saved)}")
        saved.append(path)

    engine = StandInLLM("model")
    backend = VLLMBackend(engine, scratch_dir=tmp_path)
    roles = SimpleNamespace(policy_adapter=policy_adapter)
    for _ in range(3):
        backend.sync_weights(roles)
    backend.generate(None, torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), SETTINGS, None)
    request = engine.last_request[2]
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("policy-3", 3, str(saved[-1]))
    assert [p.exists() for p in saved] == [False, False, True]  # older adapters cleaned up
    assert engine.model.loaded == []  # never the full weights
    assert names(engine.events) == ["reset_prefix_cache"] * 3 + ["generate"]  # reset after every adapter push


# --- sleep and wake -------------------------------------------------------------------------------


def test_the_engine_sleeps_after_generating_and_wakes_its_weights_for_the_push(fake_vllm):
    engine = StandInLLM("model", enable_sleep_mode=True)
    backend = VLLMBackend(engine, vocab_size=16, sleeps=True)
    roles = SimpleNamespace(policy=TinyLM(16))
    backend.sync_weights(roles)  # at start: the engine is awake
    for _ in range(2):
        backend.generate(roles, torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), SETTINGS, None)
        assert engine.asleep == {"weights", "kv_cache"}  # scoring and optimisation have the GPU
        backend.sync_weights(roles)
        assert engine.asleep == {"kv_cache"}  # the KV cache waits for the next generation
    assert engine.events == [
        ("apply_model",), ("reset_prefix_cache",),
        ("generate", None), ("sleep", 1), ("wake_up", ("weights",)), ("apply_model",), ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)), ("generate", None), ("sleep", 1), ("wake_up", ("weights",)), ("apply_model",),
        ("reset_prefix_cache",)]


def test_without_sleep_the_engine_keeps_its_memory(fake_vllm):
    engine = StandInLLM("model")  # enable_sleep_mode unset: sleeping would fail
    backend = VLLMBackend(engine, vocab_size=16)
    backend.generate(None, torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), SETTINGS, None)
    backend.sync_weights(SimpleNamespace(policy=TinyLM(16)))
    assert names(engine.events) == ["generate", "apply_model", "reset_prefix_cache"]


def test_a_ppo_run_optimises_while_the_engine_sleeps(fake_vllm, tiny_dirs, tmp_path):
    """The real trainer: two rollout chunks per update, each generated by a woken engine that sleeps
    again before scoring; optimisation always finds it asleep; the push follows every update."""
    from conftest import base_overrides

    from tether.config import PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, generation_backend="vllm", device="cpu",
                                                     rollout_batch_size=4, total_updates=2))
    engine = StandInLLM(str(tiny_dirs["gpt2"]), enable_sleep_mode=True)
    backend = VLLMBackend(engine, vocab_size=engine.vocab_size, sleeps=True)
    trainer = build_ppo_trainer(cfg, generation=backend)
    optimise = trainer.optimise

    def recorded_optimise(batch):
        engine.events.append(("optimise", frozenset(engine.asleep)))
        return optimise(batch)

    trainer.optimise = recorded_optimise
    trainer.train()
    asleep = frozenset({"weights", "kv_cache"})
    start = [("apply_model",), ("reset_prefix_cache",)]  # the engine starts awake, from the current policy
    chunks = [("generate", None), ("sleep", 1), ("wake_up", ("weights", "kv_cache")), ("generate", None),
              ("sleep", 1)]
    push = [("optimise", asleep), ("wake_up", ("weights",)), ("apply_model",), ("reset_prefix_cache",)]
    assert engine.events == start + chunks + push + [("wake_up", ("kv_cache",))] + chunks + push
    assert engine.last_request[1].logit_bias == {trainer.tokenizer.pad_token_id: -100.0}


# --- one engine per rank, in this process ---------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_starts_its_engine_in_process_on_its_own_gpu(fake_vllm, monkeypatch, tiny_dirs, tmp_path, rank):
    from conftest import base_overrides

    from tether.config import PPOConfig, config_from_dict

    for key, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", 29500)):  # what torchrun sets for rank `rank` of 2
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, generation_backend="vllm"))
    backend = VLLMBackend.start(cfg.policy, cfg, tmp_path, seed=100 + rank)
    engine = backend.engine
    assert devices == [rank]  # before the engine was built
    assert engine.environment["LOCAL_RANK"] == str(rank)  # external_launcher places the engine from it
    assert engine.environment["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine core stays in this process
    assert (engine.kwargs["distributed_executor_backend"], engine.kwargs["tensor_parallel_size"]) == \
           ("external_launcher", 1)
    assert engine.kwargs["seed"] == 100 + rank
    assert engine.kwargs["logprobs_mode"] == "processed_logprobs"  # log-probs after temperature, as sampled
    assert (engine.kwargs["enable_sleep_mode"], backend.sleeps) == (True, True)
    assert (engine.kwargs["enable_lora"], "max_lora_rank" in engine.kwargs) == (False, False)
    assert engine.kwargs["generation_config"] == "vllm"  # the model's generation_config.json sets nothing
    assert backend.vocab_size == engine.vocab_size


def test_one_process_outside_torchrun_is_a_world_of_one(fake_vllm, monkeypatch, tiny_dirs, tmp_path):
    from conftest import base_overrides

    from tether.config import PPOConfig, config_from_dict

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(key, raising=False)  # restored (removed) after the test
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, generation_backend="vllm"))
    seen = VLLMBackend.start(cfg.policy, cfg, tmp_path, seed=0).engine.environment
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("0", "0", "1")
    assert int(seen["MASTER_PORT"]) > 0 and seen["MASTER_ADDR"]


def test_every_name_passed_to_vllm_is_declared_for_the_pinned_release():
    with pytest.raises(TypeError, match="not declared for vLLM 0.33.0"):
        declared(("model",), "LLM", model="m", swap_space=4)
    with pytest.raises(TypeError, match="LLM.chat is not declared"):
        VLLMBackend(StandInLLM("model"))._call("chat", messages=[])


# --- settings -------------------------------------------------------------------------------------


def test_the_engine_runs_in_the_dtype_of_the_trainer_forwards():
    assert engine_dtype(SimpleNamespace(precision="bf16-mixed", dtype=None)) == "bfloat16"
    assert engine_dtype(SimpleNamespace(precision="bf16-true", dtype=None)) == "bfloat16"
    assert engine_dtype(SimpleNamespace(precision="fp16-mixed", dtype=None)) == "float16"
    assert engine_dtype(SimpleNamespace(precision="fp32", dtype=None)) == "float32"
    assert engine_dtype(SimpleNamespace(dtype="bfloat16")) == "bfloat16"  # before precision existed
    assert engine_dtype(SimpleNamespace(precision="auto", dtype=None)) == "float32"


def test_lora_rank_rounds_up_to_a_max_lora_rank_vllm_accepts(tiny_dirs, tmp_path):
    from conftest import base_overrides

    from tether.config import ConfigError, PPOConfig, config_from_dict

    assert [engine_lora_rank(r) for r in (1, 2, 8, 12, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(ConfigError, match="up to rank 512"):
        engine_lora_rank(600)
    shared = dict(arch="llama", placement="shared_base", generation_backend="vllm")
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, lora_rank=12, **shared))
    arguments = engine_arguments(cfg.policy, cfg, seed=0)
    assert (arguments["enable_lora"], arguments["max_lora_rank"], cfg.lora_rank) == (True, 16, 12)
    with pytest.raises(ConfigError, match=r"lora_rank=600.*generation_backend=builtin"):
        config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, lora_rank=600, **shared))


def test_gpt2_with_a_shared_base_on_vllm_is_refused_at_config_time(tiny_dirs, tmp_path):
    from conftest import base_overrides

    from tether.config import ConfigError, PPOConfig, config_from_dict

    values = dict(placement="shared_base", lora_rank=8, generation_backend="vllm")
    with pytest.raises(ConfigError, match=r"no LoRA support for GPT2LMHeadModel.*placement=separate.*"
                                          r"generation_backend=builtin"):
        config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, arch="gpt2", **values))
    config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, arch="llama", **values))  # Llama: LoRA served
    config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, arch="gpt2", generation_backend="vllm"))


# --- the pad token of an engine run ---------------------------------------------------------------


def tokenizer_without_pad(special=()):
    """A byte-level BPE with EOS and the given extra special tokens, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tether.tiny import builtin_corpus

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", *special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(builtin_corpus(200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_an_engine_pads_with_a_spare_special_token_inside_the_vocabulary():
    from tether.models import ensure_pad_token, pad_token_inside_embeddings

    tokenizer = tokenizer_without_pad(["<|start_header_id|>", "<|reserved_special_token_0|>"])  # Llama 3's kind
    rows = len(tokenizer)
    assert pad_token_inside_embeddings(tokenizer, rows)
    assert tokenizer.pad_token == "<|reserved_special_token_0|>" and len(tokenizer) == rows
    assert not ensure_pad_token(tokenizer)  # nothing added: the model keeps its rows


def test_an_engine_pads_in_a_row_the_model_has_beyond_its_tokenizer():
    from tether.models import pad_token_inside_embeddings

    tokenizer = tokenizer_without_pad()
    rows = len(tokenizer) + 8  # a vocabulary padded past the tokenizer (Qwen2's kind)
    assert pad_token_inside_embeddings(tokenizer, rows)
    assert tokenizer.pad_token_id < rows and len(tokenizer) <= rows


def test_without_a_spare_id_the_trainer_grows_as_before_and_the_engine_never_sees_the_row():
    from tether.models import ensure_pad_token, pad_token_inside_embeddings

    tokenizer = tokenizer_without_pad()  # GPT-2's kind: no unk, no spare special token, no spare row
    rows = len(tokenizer)
    assert not pad_token_inside_embeddings(tokenizer, rows)
    assert ensure_pad_token(tokenizer) and tokenizer.pad_token_id == rows  # the trainer's row; cut from the push


def test_the_builtin_backend_keeps_its_pad_token(tiny_dirs, tmp_path):
    from tether.models import load_tokenizer

    tokenizer = tokenizer_without_pad(["<|reserved_special_token_0|>"])
    tokenizer.save_pretrained(tmp_path)
    builtin = load_tokenizer(str(tmp_path))
    engine = load_tokenizer(str(tmp_path), embedding_rows=len(tokenizer))
    assert builtin.pad_token == "<|pad|>" and len(builtin) == len(tokenizer) + 1  # as before: a new row
    assert engine.pad_token == "<|reserved_special_token_0|>" and len(engine) == len(tokenizer)


# --- the rest -------------------------------------------------------------------------------------


def test_logprob_gap_counts_real_tokens_only():
    engine = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -2.0, 0.0], [-0.25, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    total, largest = logprob_gap(engine, trainer, mask)
    assert total.item() == pytest.approx(0.75)
    assert largest.item() == pytest.approx(0.5)


def test_vllm_is_imported_only_when_asked_for_and_missing_says_how_to_install(monkeypatch):
    import tether.pipelines.ppo  # noqa: F401  (the whole PPO path imports without vLLM)

    assert "vllm" not in sys.modules
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'tether\[vllm\]'"):
        VLLMBackend.start("model", SimpleNamespace(), None, 0)


def test_vllm_on_a_machine_without_cuda_is_a_config_error(tiny_dirs, tmp_path):
    from conftest import base_overrides

    from tether.config import ConfigError, PPOConfig, config_from_dict
    from tether.pipelines.ppo import build_ppo_trainer

    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, generation_backend="vllm", device="cpu"))
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        build_ppo_trainer(cfg)


def test_the_builtin_sampler_reports_no_engine_logprobs(tiny_dirs, tmp_path):
    roles = SimpleNamespace(sample=lambda *a, **k: (torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                                               torch.ones(1, dtype=torch.bool)))
    out = BuiltinSampler().generate(roles, None, None, SETTINGS, None)
    assert out.engine_logprobs is None


# --- the check against the release's source -------------------------------------------------------


def test_the_source_check_fails_when_the_release_lacks_a_name(tmp_path):
    """tools/check_vllm_standin.py on a miniature source tree: complete, it passes; without one
    SamplingParams field, or with a stand-in parameter the release lacks, it fails."""
    write_miniature_release(tmp_path / "ok")
    check = [sys.executable, str(REPO / "tools" / "check_vllm_standin.py")]
    passed = subprocess.run(check + [str(tmp_path / "ok")], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    write_miniature_release(tmp_path / "no_logit_bias", drop="logit_bias")
    failed = subprocess.run(check + [str(tmp_path / "no_logit_bias")], capture_output=True, text=True)
    assert failed.returncode == 1 and "MISSING SamplingParams(logit_bias=...)" in failed.stdout
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text((REPO / "tests" / "test_generation.py").read_text().replace(
        "def reset_prefix_cache(self, reset_running_requests=False", "def reset_prefix_cache(self, everything=False"))
    drifted = subprocess.run(check + [str(tmp_path / "ok"), str(stand_in)], capture_output=True, text=True)
    assert drifted.returncode == 1 and "['everything']" in drifted.stdout


def write_miniature_release(root: Path, drop: str = "") -> None:
    """The few files of vLLM 0.33.0 the check reads, cut down to what it looks up."""
    from tether import config as limits
    from tether import generation as g

    def write(path: str, text: str) -> None:
        file = root / "vllm" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)

    def struct(name: str, names) -> str:
        return f"class {name}:\n" + "".join(f"    {n}: int = 0\n" for n in names if n != drop)

    stand_in_init = ("runner", "tokenizer", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization")
    write("_version.py", f"__version__ = version = '{limits.VLLM_RELEASE}'\n")
    write("entrypoints/llm.py", "class LLM:\n"
          f"    def __init__(self, model, *, {', '.join(f'{n}=None' for n in stand_in_init)}, **kwargs): ...\n"
          "    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,"
          " tokenization_kwargs=None, mm_processor_kwargs=None): ...\n"
          "    def apply_model(self, func): ...\n"
          "    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False): ...\n"
          "    def sleep(self, level=1, mode='abort'): ...\n"
          "    def wake_up(self, tags=None): ...\n")
    write("engine/arg_utils.py", struct("EngineArgs", g.LLM_KEYWORDS))
    write("sampling_params.py", struct("SamplingParams", g.SAMPLING_PARAMS_KEYWORDS))
    write("lora/request.py", struct("LoRARequest", g.LORA_REQUEST_KEYWORDS))
    write("logprobs.py", struct("Logprob", ("logprob", "rank", "decoded_token")))
    write("outputs.py", struct("CompletionOutput", ("index", "text", "token_ids", "cumulative_logprob", "logprobs",
                                                    "finish_reason")) + struct("RequestOutput", ("request_id",
                                                                                                 "outputs")))
    write("config/lora.py", f"MaxLoRARanks = Literal{list(limits.VLLM_LORA_RANKS)}\n")
    write("config/model.py", f"LogprobsMode = Literal['raw_logprobs', '{g.LOGPROBS_MODE}']\n")
    write("config/parallel.py", f"DistributedExecutorBackend = Literal['mp', '{g.EXECUTOR_BACKEND}']\n")
    write("envs.py", f"environment_variables = {{'{g.IN_PROCESS_ENV}': None}}\n")
    write("v1/executor/abstract.py", f"SLEEP_TAGS = frozenset({tuple(g.ENGINE_MEMORY)})\n")
    archs = {a: ("plain", a) for a in limits.VLLM_ARCHITECTURES_WITHOUT_LORA} | {"LlamaForCausalLM": ("llama", "Llama")}
    write("model_executor/models/registry.py", f"_TEXT_GENERATION_MODELS = {archs!r}\n")
    plain = [a for a in archs if a != "LlamaForCausalLM"]
    write("model_executor/models/plain.py", "".join(f"class {a}(nn.Module): ...\n" for a in plain))
    write("model_executor/models/interfaces.py", "class SupportsLoRA: ...\n")
    write("model_executor/models/llama.py", "from .interfaces import SupportsLoRA\nclass Base(SupportsLoRA): ...\n"
          "class Llama(Base): ...\n")
