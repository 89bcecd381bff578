"""Precision: bf16-mixed learns like fp32 (fp32 master weights, bf16 autocast), bf16-true warns and
barely moves small steps, fp16 and the old dtype key are handled before anything loads."""

import logging

import pytest
import torch

from conftest import base_overrides
from dist_worker import FixedResponses
from test_reward import pair_files  # noqa: F401  (a fixture)
from tether.config import ConfigError, PPOConfig, config_from_dict
from tether.pipelines.ppo import build_ppo_trainer
from tether.precision import BF16_MIXED, FP32, keep_lm_head_fp32, precision_name, resolve_precision

STEPS = dict(total_updates=2, ppo_epochs=4, num_minibatches=2)  # 16 optimizer steps


def trained(tiny_dirs, tmp_path, name, **extra):
    """A trainer after 16 steps at lr 1e-5 on fixed responses (the same text whatever the precision),
    with the policy's weights before and after, and each update's metrics."""
    values = base_overrides(tiny_dirs, tmp_path / name, learning_rate=1e-5, **STEPS, **extra)
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, values), generation=FixedResponses())
    params = trainer.roles.trainable("policy")
    start = [p.detach().float().clone() for p in params]
    rows = [trainer.step() for _ in range(STEPS["total_updates"])]
    return trainer, start, [p.detach().float() for p in params], rows


def changed_share(start, end, among=None) -> float:
    """The share of weights (of those `among` marks, e.g. the ones an fp32 run moved) that changed."""
    among = among or [torch.ones_like(a, dtype=torch.bool) for a in start]
    changed = sum(int(((a != b) & m).sum()) for a, b, m in zip(start, end, among))
    return changed / sum(int(m.sum()) for m in among)


def moved(start, end) -> list:
    return [a != b for a, b in zip(start, end)]


def test_bf16_mixed_moves_every_weight_like_fp32_and_keeps_fp32_master_weights(tiny_dirs, tmp_path):
    fp32, start32, end32, rows32 = trained(tiny_dirs, tmp_path, "fp32", precision="fp32")
    mixed, start16, end16, rows16 = trained(tiny_dirs, tmp_path, "mixed", precision="bf16-mixed")
    assert mixed.cfg.precision == "bf16-mixed" and mixed.precision is BF16_MIXED
    # Every weight with a gradient moves (unused position embeddings have none: 18% of GPT-2's here).
    assert changed_share(start32, end32) > 0.5
    assert changed_share(start16, end16, among=moved(start32, end32)) > 0.99  # pure bf16 moved 14% in the issue
    # Master weights, their gradients' home and AdamW's moments stay fp32; the frozen roles are bf16.
    for p in mixed.roles.trainable("policy") + mixed.roles.trainable("critic"):
        assert p.dtype == torch.float32
    for state in mixed.policy_optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert {p.dtype for p in mixed.roles.reference.parameters()} == {torch.bfloat16}
    # The same update within bf16 rounding: the weights' movement and the losses.
    move32 = torch.cat([(b - a).flatten() for a, b in zip(start32, end32)])
    move16 = torch.cat([(b - a).flatten() for a, b in zip(start16, end16)])
    assert move16.norm() / move32.norm() == pytest.approx(1.0, abs=0.1)
    assert torch.nn.functional.cosine_similarity(move16, move32, dim=0) > 0.9
    for r32, r16 in zip(rows32, rows16):
        for key in ("policy/loss", "value/loss", "policy/entropy", "kl/mean"):
            assert r16[key] == pytest.approx(r32[key], rel=0.05, abs=0.02), key
        assert r16["policy/first_minibatch_approx_kl"] == 0.0  # the rollout's graph is the first step's
    # Log-probs and losses are fp32 even though the forwards ran in bf16.
    assert rows16[0]["policy/first_minibatch_ratio_mean"] == 1.0


def test_bf16_mixed_first_minibatch_without_the_reused_forward_stays_within_the_bf16_tolerance(tiny_dirs, tmp_path):
    from tether.doctor import DoctorThresholds

    trainer, *_ = trained(tiny_dirs, tmp_path, "mixed", precision="bf16-mixed", reuse_scoring_forward=False)
    first = trainer.first_minibatch_stats
    assert first["policy/approx_kl"] <= DoctorThresholds().mismatch_approx_kl_bf16
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-3)


def test_bf16_true_warns_and_barely_moves_small_steps(tiny_dirs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tether.precision"):
        trainer, start, end, _ = trained(tiny_dirs, tmp_path, "true", precision="bf16-true")
    assert "precision=bf16-true" in caplog.text and "bf16-mixed" in caplog.text
    assert {p.dtype for p in trainer.roles.trainable("policy")} == {torch.bfloat16}
    _, start32, end32, _ = trained(tiny_dirs, tmp_path, "fp32", precision="fp32")
    assert changed_share(start, end, among=moved(start32, end32)) < 0.5  # the rounding the issue measured


def test_shared_base_bf16_mixed_stores_the_base_in_bf16_and_trains_fp32_adapters(tiny_dirs, tmp_path):
    trainer, start, end, _ = trained(tiny_dirs, tmp_path, "lora", precision="bf16-mixed", placement="shared_base",
                                     lora_rank=4, lora_alpha=8.0)
    trainable = trainer.roles.trainable("policy") + trainer.roles.trainable("critic")
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in trainer.roles.model.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert changed_share(start, end) > 0.9


def test_precision_auto_is_fp32_on_cpu_and_the_old_dtype_key_still_reads():
    assert resolve_precision("auto", None, torch.device("cpu")) is FP32
    assert precision_name("auto", "float32") == "fp32"
    assert precision_name("auto", "bfloat16") == "bf16-true"


@pytest.mark.parametrize("values,message", [
    (dict(precision="fp16-mixed"), "fp16-mixed is not supported.*bf16-mixed"),
    (dict(dtype="float16"), "dtype=float16 is not supported.*bf16-mixed"),
    (dict(dtype="bfloat16", precision="bf16-mixed"), "both set.*remove dtype"),
])
def test_precisions_that_cannot_run_are_refused_before_anything_loads(tiny_dirs, tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path, **values)).validate()


def test_the_fp32_lm_head_computes_fp32_logits_under_autocast(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(ids).logits.dtype == torch.bfloat16
        keep_lm_head_fp32(model)
        assert model(ids).logits.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32


def test_sft_under_bf16_mixed_learns_like_fp32_and_saves_fp32_weights(tmp_path):
    from safetensors.torch import load_file
    from test_sft import read_rows, sft_cfg, write_jsonl
    from tether.pipelines.sft import run_sft
    from tether.tiny import builtin_corpus

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in builtin_corpus(120, seed=2)])
    losses = {}
    for precision in ("fp32", "bf16-mixed"):
        run_sft(sft_cfg(data, tmp_path / precision, max_steps=20, precision=precision))
        losses[precision] = [r["train/loss"] for r in read_rows(tmp_path / precision) if "train/loss" in r]
        saved = load_file(str(tmp_path / precision / "final" / "model.safetensors"))
        assert {t.dtype for t in saved.values()} == {torch.float32}  # loads with plain transformers in fp32
    assert losses["bf16-mixed"][-1] < 0.8 * losses["bf16-mixed"][0]
    assert losses["bf16-mixed"][-1] == pytest.approx(losses["fp32"][-1], rel=0.05)


def test_a_lora_reward_model_under_bf16_mixed_has_a_bf16_base_and_an_fp32_adapter_and_head(tiny_dirs, pair_files,
                                                                                            tmp_path):
    from safetensors.torch import load_file
    from test_reward import reward_cfg
    from tether.pipelines.reward import run_reward

    summaries = {p: run_reward(reward_cfg(tiny_dirs, pair_files, tmp_path / p, precision=p, lora_rank=4, epochs=2.0))
                 for p in ("fp32", "bf16-mixed")}
    assert summaries["bf16-mixed"]["eval/accuracy"] >= summaries["fp32"]["eval/accuracy"] - 0.1
    assert summaries["bf16-mixed"]["train/loss"] == pytest.approx(summaries["fp32"]["train/loss"], rel=0.1, abs=0.02)
    saved = {path.name: {t.dtype for t in load_file(str(path)).values()}
             for path in (tmp_path / "bf16-mixed" / "final").rglob("*.safetensors")}
    assert saved and all(dtypes == {torch.float32} for dtypes in saved.values()), saved  # adapter and head


def test_a_run_written_with_the_old_dtype_key_resumes(tiny_dirs, tmp_path):
    import yaml

    from tether.pipelines.ppo import run_ppo

    values = base_overrides(tiny_dirs, tmp_path, total_updates=1)
    run_ppo(config_from_dict(PPOConfig, values))
    config_file = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    assert saved["precision"] == "fp32" and saved["dtype"] is None  # what ran, resolved from auto
    for key in ("precision", "attn_implementation", "fp32_lm_head", "tf32", "vllm_sleep"):
        saved.pop(key)
    config_file.write_text(yaml.safe_dump({**saved, "dtype": "float32"}))  # as written before precision existed
    metrics = run_ppo(config_from_dict(PPOConfig, {**values, "total_updates": 2, "resume": True}))
    assert "reward/score" in metrics


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])  # sdpa is the default: eager shows the setting arrives
def test_attn_implementation_reaches_every_model(tiny_dirs, tmp_path, kernel):
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
        tiny_dirs, tmp_path, arch="llama", attn_implementation=kernel, reward_model=str(tiny_dirs["reward"]),
        reward_fn=None)))
    models = [trainer.roles.policy, trainer.roles.reference, trainer.roles.reward.model, trainer.roles.critic.backbone]
    assert {m.config._attn_implementation for m in models} == {kernel}


def test_an_attention_kernel_that_is_not_installed_is_a_config_error(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="attn_implementation=flash_attention_2: .*sdpa or eager"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(tiny_dirs, tmp_path,
                                                                     attn_implementation="flash_attention_2")))
