"""Generation backends: the vLLM adapter against a stand-in engine (no vLLM on CPU machines),
and the engine/trainer log-prob gap."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tether.generation import BuiltinSampler, VLLMBackend, logprob_gap, responses_from_outputs
from tether.rollout import GenerationSettings


class StandInEngine:
    """The part of vLLM's `LLM` the backend uses: generate(prompts, params) and load_weights."""

    def __init__(self):
        self.loaded, self.requests = [], []

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.requests.append((prompts, params, lora_request))
        outs = []
        for i, p in enumerate(prompts):
            tokens = [5 + i, 6, 0] if i % 2 == 0 else [7, 8, 9, 10]  # row 0 ends with EOS (id 0)
            logprobs = [{t: SimpleNamespace(logprob=-0.5 * (k + 1))} for k, t in enumerate(tokens)]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs,
                                                                 finish_reason="stop" if i % 2 == 0 else "length")]))
        return outs

    def load_weights(self, weights):
        self.loaded.append({k: v.clone() for k, v in weights})


@pytest.fixture
def fake_vllm(monkeypatch):
    """SamplingParams / LoRARequest as plain records: vLLM itself is imported lazily and is absent here."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, version, path: SimpleNamespace(name=name, version=version, path=path)
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


SETTINGS = GenerationSettings(max_new_tokens=4, eos_ids=[0], pad_id=1, temperature=0.7, min_new_tokens=1,
                              stop_strings=["."])


def test_engine_outputs_become_right_padded_responses_with_the_engine_logprobs(fake_vllm):
    engine = StandInEngine()
    backend = VLLMBackend(engine)
    prompt_ids = torch.tensor([[1, 1, 4, 5], [3, 4, 5, 6]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = backend.generate(None, prompt_ids, prompt_mask, SETTINGS, None)
    prompts, params, _ = engine.requests[0]
    assert prompts == [{"prompt_token_ids": [4, 5]}, {"prompt_token_ids": [3, 4, 5, 6]}]  # left padding dropped
    assert (params.temperature, params.max_tokens, params.min_tokens, params.stop, params.stop_token_ids) == \
           (0.7, 4, 1, ["."], [0])
    assert params.logit_bias == {1: -100.0}  # pad is never sampled, as with the built-in sampler
    assert out.response_ids.tolist() == [[5, 6, 0, 1], [7, 8, 9, 10]]
    assert out.response_mask.tolist() == [[True, True, True, False], [True] * 4]
    assert out.ended.tolist() == [True, False]
    assert out.engine_logprobs[1].tolist() == [-0.5, -1.0, -1.5, -2.0]
    assert out.engine_logprobs[0, 3] == 0


def test_sync_pushes_the_updated_policy_weights_into_the_engine(fake_vllm):
    engine = StandInEngine()
    policy = torch.nn.Linear(3, 2)
    roles = SimpleNamespace(policy=policy)
    backend = VLLMBackend(engine)
    backend.sync_weights(roles)
    with torch.no_grad():
        policy.weight.add_(1.0)  # an update
    backend.sync_weights(roles)
    assert len(engine.loaded) == 2
    assert torch.equal(engine.loaded[1]["weight"], policy.weight)
    assert not torch.equal(engine.loaded[0]["weight"], engine.loaded[1]["weight"])


def test_sync_with_a_shared_base_hands_over_only_the_new_policy_adapter(fake_vllm, tmp_path):
    saved = []

    def policy_adapter(path):
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_text(f"version {len(saved)}")
        saved.append(path)

    engine = StandInEngine()
    backend = VLLMBackend(engine, scratch_dir=tmp_path)
    roles = SimpleNamespace(policy_adapter=policy_adapter)
    for _ in range(3):
        backend.sync_weights(roles)
    backend.generate(None, torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), SETTINGS, None)
    request = engine.requests[-1][2]
    assert (request.version, request.path) == (3, str(saved[-1]))  # a new id: the engine reloads it
    assert [p.exists() for p in saved] == [False, False, True]  # older adapters cleaned up
    assert engine.loaded == []  # never the full weights


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
    roles = SimpleNamespace(sample=lambda *a: (torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                                               torch.ones(1, dtype=torch.bool)))
    out = BuiltinSampler().generate(roles, None, None, SETTINGS, None)
    assert out.engine_logprobs is None
