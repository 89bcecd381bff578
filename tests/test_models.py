"""Model roles: the critic initialised from the reward model (N+ details; InstructGPT)."""

import torch

from tether.models import load_reward_model, load_value_model, reward_model_scores


def test_critic_from_reward_model_starts_as_the_reward_model_and_loads_quietly(tiny_dirs, tiny_tokenizer, capfd, caplog):
    critic = load_value_model(str(tiny_dirs["reward"]), head_from_reward=True).eval()
    out = capfd.readouterr()
    # The reward model's score head is used, not left over: no load report of unexpected weights.
    assert "UNEXPECTED" not in out.out + out.err + caplog.text
    reward_model = load_reward_model(str(tiny_dirs["reward"])).eval()
    ids = torch.tensor([tiny_tokenizer("the cat is good today.")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values = critic(ids, mask)
        scores = reward_model_scores(reward_model, ids, mask)
    # Same backbone and head: the value at the last token is the reward model's score.
    torch.testing.assert_close(values[:, -1], scores.float(), rtol=1e-5, atol=1e-5)
    assert values[0].abs().sum() > 0  # not the zero-initialised head of a fresh critic


def test_fused_activation_computes_the_same_function_and_saves_as_before(tiny_dirs, tiny_tokenizer, tmp_path):
    """GPT-2's seven-op gelu_new becomes one fused kernel: same logits to float rounding, same config."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from tether.models import load_causal_lm

    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
    fused = load_causal_lm(str(tiny_dirs["gpt2"])).eval()
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert any(isinstance(m, GELUTanh) for m in fused.modules())
    ids = torch.tensor([tiny_tokenizer("the cat is good today.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    fused.save_pretrained(tmp_path / "saved")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.activation_function == "gelu_new"
