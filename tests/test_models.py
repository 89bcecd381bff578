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
