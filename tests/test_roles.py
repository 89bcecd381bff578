"""The roles layer: shared_base LoRA placement (one base, adapters), and the dropout fix for separate."""

import json

import pytest
import torch

from conftest import REWARDS, base_overrides
from tether.config import ConfigError, PPOConfig, config_from_dict
from tether.pipelines.ppo import build_ppo_trainer, run_ppo

LORA = dict(placement="shared_base", lora_rank=4, lora_alpha=8.0)


def make_trainer(tiny_dirs, tmp_path, **extra):
    return build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, **{**LORA, **extra})))


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tiny_tokenizer):
    """A 4-block Llama, so that adapters on the top 2 blocks leave a real trunk below them."""
    from tether.tiny import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("deep")
    model = build_tiny_causal_lm("llama", tiny_tokenizer, seed=3, hidden=32, layers=4, heads=2)
    model.save_pretrained(root)
    tiny_tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize("arch,layers", [("gpt2", 0), ("llama", 0), ("deep", 2)])
def test_zero_initialised_lora_starts_at_the_reference(tiny_dirs, deep_llama, tmp_path, arch, layers):
    dirs = {**tiny_dirs, "deep": deep_llama}
    trainer = make_trainer(dirs, tmp_path, arch=arch, lora_layers=layers, num_minibatches=2)
    assert (trainer.roles.trunk_end > 0) == (layers > 0)
    torch.manual_seed(0)
    rollout = trainer.rollout(list(range(8)))
    # B = 0 in every new adapter: the policy is the base, bit for bit
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    assert (rollout.trunk is not None) == (layers > 0)
    for _ in range(2):
        trainer.step()
        first = trainer.first_minibatch_stats
        assert first["policy/ratio_mean"] == 1.0 and first["policy/ratio_max"] == 1.0
        assert first["policy/approx_kl"] == 0.0 and first["policy/clipfrac"] == 0.0


def test_trunk_gives_what_the_full_forward_gives(deep_llama, tiny_dirs, tmp_path):
    """Starting the adapted blocks from the shared trunk computes the same roles as running every block."""
    trainer = make_trainer({**tiny_dirs, "deep": deep_llama}, tmp_path, arch="deep", lora_layers=2,
                           reward_fn=f"{REWARDS}:text_length")
    roles = trainer.roles
    trainer.step()  # adapters move away from zero
    torch.manual_seed(1)
    rollout = trainer.rollout(list(range(8)))
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1]
    m = rollout.response_mask
    with torch.no_grad():
        full_logits = roles.policy_logits(ids, mask, length, trainer.tokenizer.pad_token_id)
        trunk_logits = roles.policy_logits(ids, mask, length, trainer.tokenizer.pad_token_id, rollout.trunk)
        full_values = roles.values(ids, mask, length)
        trunk_values = roles.values(ids, mask, length, rollout.trunk)
    assert torch.allclose(full_logits[m], trunk_logits[m], atol=1e-5)
    assert torch.allclose(full_values[m], trunk_values[m], atol=1e-5)
    assert not torch.allclose(full_values[m], torch.zeros_like(full_values[m]))  # the critic really moved


def test_the_trunk_runs_the_lower_blocks_once_per_rollout(deep_llama, tiny_dirs, tmp_path):
    from tether.lora import decoder_layers

    trainer = make_trainer({**tiny_dirs, "deep": deep_llama}, tmp_path, arch="deep", lora_layers=2,
                           max_new_tokens=4, ppo_epochs=3, num_minibatches=2)
    calls = {"lower": 0, "upper": 0}
    layers = decoder_layers(trainer.roles.causal_lm)
    layers[0].register_forward_hook(lambda *_: calls.__setitem__("lower", calls["lower"] + 1))
    layers[3].register_forward_hook(lambda *_: calls.__setitem__("upper", calls["upper"] + 1))
    trainer.step()
    # generation: at most 4 forward passes; the trunk: one. Training (3 epochs x 2 minibatches
    # x policy + critic) never runs block 0, while block 3 runs in every one of them.
    assert calls["lower"] <= 4 + 1
    assert calls["upper"] >= 3 * 2 * 2


def policy_grads(roles, ids, mask, length, pad, run_critic_between: bool):
    roles.train()
    for p in roles.trainable("policy") + roles.trainable("critic"):
        p.grad = None
    if run_critic_between:
        roles.values(ids, mask, length).sum().backward()
    logits = roles.policy_logits(ids, mask, length, pad)
    logits.logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in roles.trainable("policy")]


def critic_grads(roles, ids, mask, length, pad, run_policy_between: bool):
    roles.train()
    for p in roles.trainable("policy") + roles.trainable("critic"):
        p.grad = None
    if run_policy_between:
        roles.policy_logits(ids, mask, length, pad).logsumexp(-1).sum().backward()
    roles.values(ids, mask, length).pow(2).sum().backward()
    return [p.grad.clone() for p in roles.trainable("critic")]


def test_adapter_switching_never_leaks_into_another_role(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path, arch="llama", reward_fn=f"{REWARDS}:text_length")
    trainer.step()  # both adapters non-zero, so each role's gradient depends on its own adapter only
    roles, pad = trainer.roles, trainer.tokenizer.pad_token_id
    rollout = trainer.rollout(list(range(4)))
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1], pad)
    alone, after = policy_grads(roles, *args, False), policy_grads(roles, *args, True)
    assert all(torch.equal(a, b) for a, b in zip(alone, after))
    assert any(g.abs().sum() > 0 for g in alone)
    alone, after = critic_grads(roles, *args, False), critic_grads(roles, *args, True)
    assert all(torch.equal(a, b) for a, b in zip(alone, after))
    # disjoint optimizers: no parameter is owned by both
    policy_ids = {id(p) for p in roles.trainable("policy")}
    assert policy_ids and not policy_ids & {id(p) for p in roles.trainable("critic")}
    # the frozen base never trains
    assert all(not p.requires_grad for n, p in roles.model.named_parameters() if "lora_" not in n)


def test_adapters_save_and_load_to_identical_logprobs_and_values(tiny_dirs, tmp_path):
    trainer = make_trainer(tiny_dirs, tmp_path / "a", arch="llama", reward_fn=f"{REWARDS}:text_length")
    trainer.step()
    path = trainer.save(tmp_path / "ckpt")
    assert (path / "adapter_config.json").is_file() and (path / "critic" / "adapter_config.json").is_file()
    fresh = make_trainer(tiny_dirs, tmp_path / "b", arch="llama")
    fresh.roles.load(path)
    rollout = trainer.rollout(list(range(6)))
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1]
    pad = trainer.tokenizer.pad_token_id
    for a, b in ((trainer.roles, fresh.roles),):
        a.eval(), b.eval()
        with torch.no_grad():
            assert torch.equal(a.policy_logits(ids, mask, length, pad), b.policy_logits(ids, mask, length, pad))
            assert torch.equal(a.values(ids, mask, length), b.values(ids, mask, length))
    # the reference did not move: adapters off is still the base
    with torch.no_grad(), fresh.roles.role("reference"):
        from tether.sampling import response_logits

        ref = response_logits(fresh.roles.causal_lm, ids, mask, length, pad)
    with torch.no_grad():
        assert not torch.allclose(ref, fresh.roles.policy_logits(ids, mask, length, pad))


def test_merged_export_loads_with_plain_transformers(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.cli import main
    from tether.sampling import response_logits

    trainer = make_trainer(tiny_dirs, tmp_path, arch="llama", reward_fn=f"{REWARDS}:text_length")
    trainer.step()
    path = trainer.save(tmp_path / "ckpt")
    assert main(["export", str(path), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    rollout = trainer.rollout(list(range(6)))
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response_mask.shape[1]
    pad = trainer.tokenizer.pad_token_id
    trainer.roles.eval()
    with torch.no_grad():
        ours = trainer.roles.policy_logits(ids, mask, length, pad)
        plain = response_logits(merged, ids, mask, length, pad)
    m = rollout.response_mask
    assert torch.allclose(ours[m], plain[m], atol=1e-5)


def test_shared_base_score_rises_on_a_learnable_reward(tiny_dirs, tiny_tokenizer, tmp_path):
    from tether.tiny import build_tiny_causal_lm

    # init_std 0.3: a random base whose outputs adapters can make peaked (see tiny_config)
    peaked = build_tiny_causal_lm("llama", tiny_tokenizer, seed=0, hidden=32, layers=2, heads=2, init_std=0.3)
    peaked.save_pretrained(tmp_path / "peaked")
    tiny_tokenizer.save_pretrained(tmp_path / "peaked")
    cfg = config_from_dict(PPOConfig, base_overrides(
        {**tiny_dirs, "peaked": tmp_path / "peaked"}, tmp_path, arch="peaked",
        **{**LORA, **dict(lora_rank=8, lora_alpha=16.0, total_updates=30, batch_size=32, num_minibatches=2,
                          ppo_epochs=4, max_new_tokens=16, learning_rate=5e-3, kl_coef=0.01)}))
    run_ppo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["reward/score"] for r in rows[:5]) / 5
    late = sum(r["reward/score"] for r in rows[-5:]) / 5
    assert late > early + 0.2 and late > 3 * early, (early, late)
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_a_trainer_built_around_models_with_dropout_still_has_ratio_one(tiny_tokenizer, tiny_dirs, tmp_path):
    """The roles layer switches dropout off itself: no pipeline has to have done it."""
    from tether.models import ValueModel, frozen_copy
    from tether.rewards import FunctionReward
    from tether.roles import SeparateRoles
    from tether.tiny import build_tiny_causal_lm
    from tether.trainers.ppo import PPOTrainer

    policy = build_tiny_causal_lm("gpt2", tiny_tokenizer, seed=0, hidden=32, layers=2, heads=2, dropout=0.5)
    critic = ValueModel(build_tiny_causal_lm("gpt2", tiny_tokenizer, seed=1, hidden=32, layers=1, heads=2,
                                             dropout=0.5).transformer)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    roles = SeparateRoles(policy, frozen_copy(policy), critic, FunctionReward(lambda rs: [len(r) / 10 for r in rs]))
    cfg = config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path))
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ["the cat", "a dog", "my friend", "our team"] * 2]
    trainer = PPOTrainer(cfg, roles, tiny_tokenizer, prompts)
    for _ in range(2):
        trainer.step()
        first = trainer.first_minibatch_stats
        assert first["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert first["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9)


# --- bad input ------------------------------------------------------------------------


def test_lora_targets_that_match_nothing_list_the_model_modules(tiny_dirs, tmp_path):
    from tether.lora import LoraError

    with pytest.raises(LoraError, match=r"match no layer.*q_proj"):
        make_trainer(tiny_dirs, tmp_path, arch="llama", lora_target_modules=["attn_nope"])


def test_shared_base_refuses_models_of_their_own(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="placement=separate"):
        make_trainer(tiny_dirs, tmp_path, critic=str(tiny_dirs["gpt2"]))
    with pytest.raises(ConfigError, match="lora_rank"):
        make_trainer(tiny_dirs, tmp_path, lora_rank=0)
    with pytest.raises(ConfigError, match="placement=shared_base"):
        make_trainer(tiny_dirs, tmp_path, placement="separate")


def test_reference_with_another_vocabulary_is_refused(tiny_dirs, tmp_path):
    from tether.tiny import builtin_corpus, save_tiny_policy

    other = save_tiny_policy(tmp_path / "other", texts=[s.upper() for s in builtin_corpus()], vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizer/vocabulary"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, reference=str(other))))
