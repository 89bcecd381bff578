"""Reward-model training (`tether reward`): data contract, invariants, a tiny run that must
learn, the saved model as plain transformers sees it, and Ziegler score normalisation."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tether.config import RewardConfig, config_from_dict
from tether.data import DataError, tokenize_prompts
from tether.data import left_pad
from tether.algo import append_missing_eos, last_token_index, pairwise_loss
from tether.metrics import REWARD_METRIC_NAMES
from tether.models import (
    eos_token_ids,
    has_tokenizer_files,
    init_score_head,
    load_causal_lm,
    load_tokenizer,
    reward_model_scores,
    same_vocabulary,
)
from tether.placement import load_reward_model
from tether.pipelines.reward import (
    encode_preference_pairs,
    load_reward_backbone,
    run_reward,
    split_by_prompt,
)
from tether.tiny import builtin_corpus, train_tokenizer
from tether.trainers.ppo import NonFiniteError
from tether.trainers.reward import (
    PreferencePairs,
    RewardTrainer,
    final_norm,
    reward_model_forward,
    right_pad,
    sample_policy_sequences,
)

POSITIVE, NEGATIVE = ("good", "great"), ("bad", "awful")


def preference_rows(count=48, seed=3):
    """Separable pairs from the built-in corpus: 'the cat is' -> ' good today.' over ' awful today.'.

    One pair per distinct prompt (subject + verb), so held-out prompts are never seen in training.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    for sentence in builtin_corpus(3360, seed=seed):
        words = sentence.split()
        position = next((i for i, w in enumerate(words) if w in POSITIVE), None)
        prompt = " ".join(words[:position]) if position is not None else None
        if prompt is None or prompt in seen:
            continue
        seen.add(prompt)
        rest = words[position + 1:]
        rows.append({"prompt": prompt, "chosen": " " + " ".join([words[position], *rest]),
                     "rejected": " " + " ".join([rng.choice(NEGATIVE), *rest])})
        if len(rows) == count:
            return rows
    raise AssertionError("corpus too small")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Three pairs with nothing to prefer: skipped and counted, never trained on.
IDENTICAL = [{"prompt": "the cat is", "chosen": " kind.", "rejected": " kind. "},
             {"prompt": "a dog was", "chosen": "quiet", "rejected": "quiet"},
             {"prompt": "my friend", "chosen": " sad again.", "rejected": "sad again."}]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rows = preference_rows()
    return {"train": write_jsonl(root / "train.jsonl", rows[:36] + IDENTICAL),
            "eval": write_jsonl(root / "eval.jsonl", rows[36:]),
            "all": write_jsonl(root / "all.jsonl", rows), "rows": rows}


@pytest.fixture(autouse=True)
def restore_threads():
    """run_reward sets torch's thread count; keep the rest of the suite's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def reward_values(tiny_dirs, pair_files, output_dir, **extra):
    # One thread: a tiny model gains nothing from two, and two spin-wait badly on a busy machine.
    values = dict(model=str(tiny_dirs["gpt2"]), data=str(pair_files["train"]), eval_data=str(pair_files["eval"]),
                  output_dir=str(output_dir), batch_size=8, epochs=4.0, learning_rate=3e-3, max_length=64,
                  eval_every=5, progress=False, num_threads=1, seed=0)
    values.update(extra)
    return values


def reward_cfg(tiny_dirs, pair_files, output_dir, **extra):
    return config_from_dict(RewardConfig, reward_values(tiny_dirs, pair_files, output_dir, **extra))


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_dirs, pair_files, tmp_path_factory):
    threads = torch.get_num_threads()
    cfg = reward_cfg(tiny_dirs, pair_files, tmp_path_factory.mktemp("reward") / "run")
    summary = run_reward(cfg)
    torch.set_num_threads(threads)
    return cfg, summary


# --- a tiny run that must learn ----------------------------------------------------------


def test_training_learns_a_separable_preference(trained):
    cfg, summary = trained
    assert summary["train/pairs"] == 36 and summary["eval/pairs"] == 12
    assert summary["data/skipped_identical"] == 3  # whitespace-only differences count as identical
    assert summary["train/steps"] == math.ceil(4 * 36 / 8)
    assert summary["eval/accuracy"] >= 0.8  # held-out prompts never seen in training; chance is 0.5
    assert summary["eval/loss"] < 0.3 < math.log(2)
    rows = read_rows(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["update"] for r in rows] == list(range(1, 19))
    assert [r["update"] for r in rows if "eval/accuracy" in r] == [5, 10, 15, 18]  # every eval_every, and the end
    losses = [r["train/loss"] for r in rows]
    assert sum(losses[:3]) / 3 > 0.5  # an untrained model cannot tell the responses apart
    assert sum(losses[-3:]) / 3 < 0.25 * sum(losses[:3]) / 3
    assert rows[-1]["train/lr"] < rows[0]["train/lr"] == pytest.approx(3e-3)  # linear decay
    assert rows[-1]["eval/accuracy"] == summary["eval/accuracy"]


def test_reward_training_logs_exactly_the_documented_metrics(trained):
    cfg, _ = trained
    logged = {k for r in read_rows(Path(cfg.output_dir) / "metrics.jsonl") for k in r} - {"update"}
    assert logged == REWARD_METRIC_NAMES


def test_saved_model_loads_with_plain_transformers_and_reproduces_accuracy(trained, pair_files):
    cfg, summary = trained
    run = Path(cfg.output_dir)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "final"}
    assert json.loads((run / "summary.json").read_text()) == summary
    final = run / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "left"
    eval_rows = pair_files["rows"][36:]

    def plain_scores(responses):
        texts = [r["prompt"] + response + tokenizer.eos_token for r, response in zip(eval_rows, responses)]
        with torch.no_grad():
            return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]

    chosen = plain_scores([r["chosen"] for r in eval_rows])
    rejected = plain_scores([r["rejected"] for r in eval_rows])
    assert (chosen > rejected).float().mean().item() == pytest.approx(summary["eval/accuracy"])
    # The same numbers as tether reads them (PPO's reward_model_scores), left padding and all.
    pairs, _ = encode_preference_pairs(eval_rows, tokenizer, cfg)
    ids, mask = left_pad(pairs.chosen, tokenizer.pad_token_id)
    assert torch.allclose(reward_model_scores(model, ids, mask), chosen, atol=1e-5)
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean().item()
    assert loss == pytest.approx(summary["eval/loss"], rel=1e-4)


def test_grad_enabled_scores_match_reward_model_scores_on_either_padding(tiny_dirs, tiny_tokenizer):
    tokenizer = load_tokenizer(str(tiny_dirs["gpt2"]))
    model = load_reward_backbone(str(tiny_dirs["gpt2"]), tokenizer).eval()
    sequences = [tokenizer("the cat is good today.")["input_ids"], tokenizer("a dog")["input_ids"]]
    right = reward_model_forward(model, *right_pad(sequences, tokenizer.pad_token_id))
    left = reward_model_forward(model, *left_pad(sequences, tokenizer.pad_token_id))
    alone = torch.cat([reward_model_forward(model, *right_pad([s], tokenizer.pad_token_id)) for s in sequences])
    assert right.requires_grad
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert torch.allclose(reward_model_scores(model, *right_pad(sequences, tokenizer.pad_token_id)), alone, atol=1e-5)
    assert alone[0] != alone[1]


# --- model ------------------------------------------------------------------------------


def test_new_head_is_initialised_n0_over_sqrt_d_plus_1_and_an_existing_head_is_kept(tiny_dirs):
    tokenizer = load_tokenizer(str(tiny_dirs["gpt2"]))
    torch.manual_seed(0)
    model = load_reward_backbone(str(tiny_dirs["gpt2"]), tokenizer)
    d = model.config.hidden_size
    assert d == 32 and model.score.bias is None
    # 1/sqrt(33) = 0.174; transformers' own init would be 0.02. 32 draws: std within ±35%.
    assert 0.65 / math.sqrt(d + 1) < model.score.weight.std().item() < 1.35 / math.sqrt(d + 1)
    head = nn.Linear(4095, 1)
    nn.init.constant_(head.bias, 3.0)
    init_score_head(head, torch.Generator().manual_seed(0))
    assert head.weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    assert abs(head.weight.mean().item()) < 3 / 64 / math.sqrt(4095)
    assert head.bias.item() == 0.0
    # Continuing from a reward model keeps its trained head.
    saved = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["reward"]).score.weight
    kept = load_reward_backbone(str(tiny_dirs["reward"]), tokenizer).score.weight
    assert torch.equal(saved, kept)


def test_tokenizer_without_pad_token_gets_a_dedicated_one_and_the_model_knows_it(tiny_dirs, tmp_path):
    no_pad = tmp_path / "nopad"
    no_pad.mkdir()
    for f in tiny_dirs["gpt2"].iterdir():
        (no_pad / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(no_pad)
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    tokenizer = load_tokenizer(str(no_pad))
    model = load_reward_backbone(str(no_pad), tokenizer)
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_vocabulary_match_allows_only_an_added_pad_token(tiny_dirs, tmp_path):
    saved = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    with_pad = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    with_pad.add_special_tokens({"pad_token": "<|extra_pad|>"})
    assert same_vocabulary(saved, with_pad) and same_vocabulary(with_pad, saved)
    with_two = AutoTokenizer.from_pretrained(tiny_dirs["gpt2"])
    with_two.add_tokens(["<|a|>", "<|b|>"])
    assert not same_vocabulary(saved, with_two)
    other = train_tokenizer(builtin_corpus(400, seed=3), vocab_size=300)
    assert not same_vocabulary(saved, other)
    assert has_tokenizer_files(str(tiny_dirs["gpt2"])) and not has_tokenizer_files(str(tmp_path))


def test_rmsnorm_model_without_head_bias_cannot_store_a_shift(tiny_dirs):
    tokenizer = load_tokenizer(str(tiny_dirs["llama"]))
    model = load_reward_backbone(str(tiny_dirs["llama"]), tokenizer)
    with pytest.raises(ValueError, match="RMSNorm"):
        final_norm(model)
    gpt2 = load_reward_backbone(str(tiny_dirs["gpt2"]), tokenizer)
    assert final_norm(gpt2)[0] == "ln_f"


# --- data -------------------------------------------------------------------------------


def cfg_for_data(**extra):
    return RewardConfig(model="unused", data="unused", **extra)


def test_missing_field_names_the_record_the_field_and_what_it_has(tiny_tokenizer):
    records = [{"prompt": "a", "chosen": " good.", "rejected": " bad."}] * 2 + [{"prompt": "a", "chosen": " good."}]
    with pytest.raises(DataError, match=r"record 2 has no 'rejected' field \(it has \['chosen', 'prompt'\]\)"):
        encode_preference_pairs(records, tiny_tokenizer, cfg_for_data(), source="pairs.jsonl")
    renamed = [{"question": "a", "good": " good.", "bad": " bad."}]
    with pytest.raises(DataError, match="record 0 has no 'prompt' field"):
        encode_preference_pairs(renamed, tiny_tokenizer, cfg_for_data())
    pairs, _ = encode_preference_pairs(renamed, tiny_tokenizer, cfg_for_data(
        prompt_field="question", chosen_field="good", rejected_field="bad"))
    assert len(pairs) == 1
    with pytest.raises(DataError, match="record 0 field 'chosen' is a int"):
        encode_preference_pairs([{"prompt": "a", "chosen": 3, "rejected": "b"}], tiny_tokenizer, cfg_for_data())


def test_identical_pairs_are_skipped_and_counted(tiny_tokenizer, caplog):
    good = [{"prompt": "the cat", "chosen": f" is good {i}.", "rejected": f" is bad {i}."} for i in range(3)]
    with caplog.at_level("WARNING"):
        pairs, counts = encode_preference_pairs(good[:2] + IDENTICAL[:2] + good[2:], tiny_tokenizer, cfg_for_data())
    assert len(pairs) == 3 and counts["skipped_identical"] == 2
    assert "skipped 2 of 5 pairs whose chosen and rejected responses are identical" in caplog.text
    with pytest.raises(DataError, match="no usable preference pairs: all 3 records have identical"):
        encode_preference_pairs(IDENTICAL, tiny_tokenizer, cfg_for_data())


def test_sequences_are_prompt_then_response_then_eos_truncated_on_the_left(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    record = {"prompt": "the old man was", "chosen": " kind at night.", "rejected": " sad."}
    pairs, counts = encode_preference_pairs([record], tok, cfg_for_data(max_length=64))
    prompt = tok("the old man was")["input_ids"]
    assert pairs.chosen[0] == prompt + tok(" kind at night.", add_special_tokens=False)["input_ids"] + [eos]
    assert pairs.rejected[0] == prompt + tok(" sad.", add_special_tokens=False)["input_ids"] + [eos]
    assert counts["truncated"] == 0
    short, counts = encode_preference_pairs([record], tok, cfg_for_data(max_length=8))
    assert short.chosen[0] == pairs.chosen[0][-8:] and short.rejected[0] == pairs.rejected[0][-8:]
    assert counts["truncated"] == 2
    # Responses that differ only where truncation cut them carry no preference either.
    far = {"prompt": "a", "chosen": "good, and then the same long ending.", "rejected": "bad, and then the same long ending."}
    with pytest.raises(DataError, match="after truncation"):
        encode_preference_pairs([far], tok, cfg_for_data(max_length=10))


def test_chat_prompts_use_the_chat_template_like_ppo():
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = train_tokenizer(builtin_corpus(100), vocab_size=256, chat_template=template)
    messages = [{"role": "user", "content": "how is the cat?"}]
    record = {"prompt": messages, "chosen": [{"role": "assistant", "content": " good."}], "rejected": " bad."}
    pairs, _ = encode_preference_pairs([record], tok, cfg_for_data())
    prompt_ids, _ = tokenize_prompts([{"prompt": messages}], tok)
    assert pairs.chosen[0][: len(prompt_ids[0])] == prompt_ids[0]
    assert tok.decode(pairs.chosen[0]) == "<user>how is the cat?<assistant> good.<|endoftext|>"
    assert tok.decode(pairs.rejected[0]).endswith("<assistant> bad.<|endoftext|>")


def test_eval_split_is_seeded_and_keeps_each_prompt_on_one_side():
    keys = [f"p{i // 3}" for i in range(30)]  # 10 prompts, 3 comparisons each
    pairs = PreferencePairs([[i, 1] for i in range(30)], [[i, 2] for i in range(30)], keys)
    train, held = split_by_prompt(pairs, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert not set(train.prompt_keys) & set(held.prompt_keys)
    again, held_again = split_by_prompt(pairs, 0.2, seed=0)
    assert held_again.chosen == held.chosen
    assert any(split_by_prompt(pairs, 0.2, seed=s)[1].chosen != held.chosen for s in (1, 2, 3))
    single = PreferencePairs([[i] for i in range(10)], [[-i] for i in range(10)], ["same"] * 10)
    assert [len(part) for part in split_by_prompt(single, 0.3, seed=0)] == [7, 3]
    with pytest.raises(DataError, match="too few to hold out"):
        split_by_prompt(PreferencePairs([[1]], [[2]], ["a"]), 0.5, seed=0)


# --- the trainer ------------------------------------------------------------------------


def make_trainer(tiny_dirs, pair_files, tmp_path, dtype=torch.float32, **extra):
    cfg = reward_cfg(tiny_dirs, pair_files, tmp_path, **extra)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_reward_backbone(cfg.model, tokenizer).to(dtype)
    pairs, _ = encode_preference_pairs(pair_files["rows"], tokenizer, cfg)
    return RewardTrainer(cfg, model, tokenizer.pad_token_id, pairs)


def test_accumulation_does_not_change_the_update(tiny_dirs, pair_files, tmp_path):
    """batch 8 x accumulation 1 gives the same gradient and the same step as batch 1 x accumulation 8.

    In float64: the Bradley-Terry loss cannot see a shift of every score (ln_f.bias gets a zero
    gradient), and Adam's first step, g/(|g|+eps), turns float32 rounding noise in such a
    coordinate into a step of the size of the learning rate. Float64 keeps that noise far below eps.
    """
    one = make_trainer(tiny_dirs, pair_files, tmp_path, torch.float64, batch_size=8, gradient_accumulation_steps=1)
    eight = make_trainer(tiny_dirs, pair_files, tmp_path, torch.float64, batch_size=8, gradient_accumulation_steps=8)
    assert one.cfg.micro_batch_size == 8 and eight.cfg.micro_batch_size == 1
    indices = list(range(0, 40, 5))  # responses of different lengths: padding in the batch-8 pass
    stats_one, stats_eight = one.accumulate_gradients(indices), eight.accumulate_gradients(indices)
    for key in stats_one:
        assert stats_one[key] == pytest.approx(stats_eight[key], rel=1e-9, abs=1e-12), key
    # Gradients too, not only parameters: Adam's first step is nearly sign(g), blind to a wrong scale
    # (e.g. a per-micro-batch mean would make batch 1 x 8 gradients 8 times too large).
    for (name, p1), (_, p8) in zip(one.model.named_parameters(), eight.model.named_parameters()):
        assert torch.allclose(p1.grad, p8.grad, rtol=1e-7, atol=1e-12), name
    start = one.model.score.weight.detach().clone()
    one._clip_and_step()
    eight._clip_and_step()
    assert (one.model.score.weight - start).abs().max() > 1e-4  # the step happened
    for (name, p1), (_, p8) in zip(one.model.named_parameters(), eight.model.named_parameters()):
        assert torch.allclose(p1, p8, rtol=1e-7, atol=1e-10), name


def ranked_rows(prompts=6):
    """InstructGPT-style data: 4 ranked responses per prompt, all 6 pairs of each (shared responses)."""
    ranked = [" great day.", " good day.", " bad day.", " awful day."]
    return [{"prompt": row["prompt"], "chosen": ranked[i], "rejected": ranked[j]}
            for row in preference_rows()[:prompts] for i in range(4) for j in range(i + 1, 4)]


def test_shared_responses_are_scored_once_with_the_same_loss_and_gradient(tiny_dirs, pair_files, tmp_path):
    """Scoring each distinct sequence once must not change the batch's loss, stats or gradient."""
    trainer = make_trainer(tiny_dirs, pair_files, tmp_path, torch.float64, batch_size=36)
    pairs, _ = encode_preference_pairs(ranked_rows(), load_tokenizer(trainer.cfg.model), trainer.cfg)
    trainer.train_pairs = pairs
    scored_rows = []
    hook = trainer.model.score.register_forward_hook(lambda m, args, out: scored_rows.append(args[0].shape[0]))
    stats = trainer.accumulate_gradients(list(range(36)))
    hook.remove()
    assert scored_rows == [24]  # 6 prompts x 4 responses, not 36 pairs x 2
    fast = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}

    # Reference: every pair's two sequences scored separately, as without sharing.
    trainer.model.zero_grad(set_to_none=True)
    input_ids, attention_mask = right_pad(pairs.chosen + pairs.rejected, trainer.pad_id)
    scores = reward_model_forward(trainer.model, input_ids, attention_mask)
    loss, ref_stats = pairwise_loss(scores[:36], scores[36:])
    loss.backward()
    assert stats["train/loss"] == pytest.approx(ref_stats["loss"].item(), rel=1e-9)
    assert stats["train/accuracy"] == pytest.approx(ref_stats["accuracy"].item())
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(fast[name], p.grad, rtol=1e-7, atol=1e-12), name


def prompt_runs(pairs, order):
    """How many runs of equal prompts the order makes: the number of prompts when each stays together."""
    keys = [pairs.prompt_keys[i] for i in order]
    return sum(1 for i, key in enumerate(keys) if i == 0 or key != keys[i - 1])


def test_batch_by_prompt_keeps_each_prompts_pairs_together_and_covers_every_pair(tiny_dirs, pair_files, tmp_path):
    trainer = make_trainer(tiny_dirs, pair_files, tmp_path, batch_size=12, batch_by_prompt=True)
    pairs, _ = encode_preference_pairs(ranked_rows(), load_tokenizer(trainer.cfg.model), trainer.cfg)
    trainer.train_pairs = pairs
    first, second = trainer.epoch_order(), trainer.epoch_order()
    for order in (first, second):
        assert sorted(order) == list(range(36))  # every pair once per epoch
        assert prompt_runs(pairs, order) == 6  # each prompt's 6 pairs adjacent: a batch of 12 holds two whole prompts
    assert first != second  # prompts and pairs reshuffled every epoch
    plain = make_trainer(tiny_dirs, pair_files, tmp_path, batch_size=12)
    plain.train_pairs = pairs
    assert prompt_runs(pairs, plain.epoch_order()) > 6  # the default mixes prompts


def test_batch_by_prompt_run_learns_a_ranking(tiny_dirs, pair_files, tmp_path):
    """Through run_reward as a user runs it: grouped batches still learn great > good > bad > awful."""
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(prompts=24))
    summary = run_reward(reward_cfg(tiny_dirs, pair_files, tmp_path / "run", data=str(data), eval_data=None,
                                    eval_fraction=0.25, batch_by_prompt=True, batch_size=12))
    assert summary["eval/pairs"] == 36  # six whole prompts held out
    assert summary["eval/accuracy"] >= 0.9, summary["eval/accuracy"]


def test_non_finite_loss_raises_before_any_step(tiny_dirs, pair_files, tmp_path):
    trainer = make_trainer(tiny_dirs, pair_files, tmp_path, batch_size=4)
    with torch.no_grad():
        trainer.model.score.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteError, match="non-finite reward-model loss .* nothing was applied"):
        trainer.train_step()
    assert trainer.step == 0 and trainer.optimizer.state == {}
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) or name == "score.weight", name
        assert p.grad is None


# --- score normalisation ----------------------------------------------------------------


def test_normalisation_gives_the_policy_mean_0_std_1_and_keeps_the_ranking(tiny_dirs, pair_files, trained,
                                                                             tmp_path):
    cfg_plain, summary_plain = trained
    cfg = reward_cfg(tiny_dirs, pair_files, tmp_path / "norm", normalize_policy=str(tiny_dirs["gpt2"]),
                     normalize_prompts=str(tiny_dirs["prompts"]), normalize_samples=256,
                     normalize_max_new_tokens=8)
    summary = run_reward(cfg)
    assert summary["normalize/samples"] == 256
    mean, std = summary["normalize/mean_before"], summary["normalize/std_before"]
    assert std > 0.1 and abs(mean) > 0.05  # there was something to normalise
    # Same training (same seed): the normalised model is exactly the plain one, rescaled.
    plain = load_reward_model(f"{cfg_plain.output_dir}/final")
    normed = load_reward_model(f"{cfg.output_dir}/final")
    tokenizer = load_tokenizer(f"{cfg.output_dir}/final")
    eval_pairs, _ = encode_preference_pairs(pair_files["rows"][36:], tokenizer, cfg)
    ids, mask = right_pad(eval_pairs.chosen + eval_pairs.rejected, tokenizer.pad_token_id)
    raw, scaled = reward_model_scores(plain, ids, mask), reward_model_scores(normed, ids, mask)
    assert torch.allclose(scaled, (raw - mean) / std, atol=1e-4)
    n = len(eval_pairs)
    assert torch.equal(scaled[:n] > scaled[n:], raw[:n] > raw[n:])  # the ranking of every pair is unchanged
    assert summary["eval/accuracy"] == summary_plain["eval/accuracy"]

    policy = load_causal_lm(str(tiny_dirs["gpt2"]))
    prompts, _ = tokenize_prompts([json.loads(line) for line in tiny_dirs["prompts"].read_text().splitlines()],
                                  tokenizer, max_prompt_length=56)
    # The samples normalisation used (same prompts, seed and chunking), scored as PPO scores them
    # (cut responses end in an appended EOS): mean 0, std 1 to float precision.
    ends = torch.tensor(eos_token_ids(tokenizer, policy))

    def as_ppo_scores(ids, mask):
        return append_missing_eos(ids, mask, ends, tokenizer.eos_token_id, tokenizer.pad_token_id)

    ids, mask = as_ppo_scores(*sample_policy_sequences(policy, tokenizer, prompts, 256, 8, seed=cfg.seed,
                                                       chunk_size=cfg.batch_size))
    assert torch.isin(ids[torch.arange(len(ids)), last_token_index(mask)], ends).all()
    scores = reward_model_scores(normed, ids, mask)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # Plain transformers gives the same normalised scores (each sample alone, no padding).
    for row in range(4):
        alone = ids[row][mask[row].bool()].unsqueeze(0)
        with torch.no_grad():
            assert normed(input_ids=alone).logits[0, 0].item() == pytest.approx(scores[row].item(), abs=1e-4)
    # Fresh samples of the same policy: mean 0 and std 1 up to sampling noise (SE of the mean ~ 1/16).
    fresh = reward_model_scores(normed, *as_ppo_scores(*sample_policy_sequences(
        policy, tokenizer, prompts, 256, 8, seed=123, chunk_size=cfg.batch_size)))
    assert abs(fresh.mean().item()) < 0.3
    assert 0.75 < fresh.std(unbiased=False).item() < 1.25


# --- the command line -------------------------------------------------------------------


def test_cli_reward_run_as_a_user_types_it(tiny_dirs, pair_files, tmp_path):
    values = reward_values(tiny_dirs, pair_files, tmp_path / "unused", data=str(pair_files["all"]),
                           eval_fraction=0.25, epochs=2.0)
    values.pop("eval_data")
    values.pop("output_dir")
    config = tmp_path / "reward.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "tether.cli", "reward", "--config", str(config),
                             f"output_dir={tmp_path / 'cli_run'}", "learning_rate=2e-3"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: reward; eval/loss" in result.stdout and "eval/accuracy" in result.stdout
    run = tmp_path / "cli_run"
    assert "learning_rate: 0.002" in (run / "config.yaml").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train/pairs"] == 36 and summary["eval/pairs"] == 12  # eval_fraction 0.25 of 48, by prompt
    rows = read_rows(run / "metrics.jsonl")
    assert len(rows) == summary["train/steps"] == math.ceil(2 * 36 / 8)
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "config.json").is_file()
    assert not (run / "final.tmp").exists()


# --- LoRA reward models --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_trained(tiny_dirs, pair_files, tmp_path_factory):
    threads = torch.get_num_threads()
    cfg = reward_cfg(tiny_dirs, pair_files, tmp_path_factory.mktemp("lora_reward") / "run", model=str(tiny_dirs["llama"]),
                     lora_rank=8, lora_alpha=16.0, learning_rate=1e-2, normalize_policy=str(tiny_dirs["llama"]),
                     normalize_prompts=str(tiny_dirs["prompts"]), normalize_samples=64, normalize_max_new_tokens=8)
    summary = run_reward(cfg)
    torch.set_num_threads(threads)
    return cfg, summary


def test_lora_reward_model_learns_and_saves_an_adapter_with_its_head(lora_trained):
    from tether.lora import LoraRewardModel

    cfg, summary = lora_trained
    final = Path(cfg.output_dir) / "final"
    assert (final / "adapter_config.json").is_file() and (final / "score_head.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the base is not copied
    assert summary["eval/accuracy"] >= 0.75, summary
    model = load_reward_model(str(final))
    assert isinstance(model, LoraRewardModel)
    # normalisation lives in the head's own bias: the policy's samples score mean 0
    assert abs(summary["normalize/mean_after"]) < 1e-3 and summary["normalize/std_after"] == pytest.approx(1, abs=1e-3)


def test_lora_reward_adapter_scores_the_same_in_shared_base_ppo(lora_trained, tiny_dirs, tmp_path):
    """Loaded as the third adapter on the policy's base, it scores exactly as the standalone reward model."""
    from conftest import base_overrides
    from tether.config import PPOConfig
    from tether.pipelines.ppo import build_ppo_trainer
    from tether.rewards import ModelReward, reward_eos

    cfg, _ = lora_trained
    final = str(Path(cfg.output_dir) / "final")
    trainer = build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
        tiny_dirs, tmp_path, arch="llama", reward_fn=None, reward_model=final, placement="shared_base", lora_rank=4)))
    assert trainer.roles.reward_head is not None and "reward" in trainer.roles.model.peft_config
    torch.manual_seed(0)
    rollout = trainer.rollout(list(range(8)))
    alone = ModelReward(load_reward_model(final), eos=reward_eos(trainer.tokenizer, trainer.roles.causal_lm))
    expected = alone.score(rollout.prompts, rollout.responses, rollout.input_ids, rollout.attention_mask)
    assert torch.allclose(rollout.scores, expected, atol=1e-5)
    # the critic starts as the reward model: its head is the score head (N+ details)
    assert torch.equal(trainer.roles.value_head.weight, trainer.roles.reward_head.weight)
    # and the reward adapter never trains
    trainer.step()
    again = trainer.roles.adapter_scores(*append_missing_eos(rollout.input_ids, rollout.attention_mask,
                                                             torch.tensor(alone.eos[0]), alone.eos[1], alone.eos[2]))
    assert torch.allclose(again, expected, atol=1e-5)


def test_shared_base_refuses_a_reward_adapter_on_another_base(lora_trained, tiny_dirs, tmp_path):
    from conftest import base_overrides
    from tether.config import PPOConfig
    from tether.pipelines.ppo import build_ppo_trainer

    cfg, _ = lora_trained
    with pytest.raises(ValueError, match="another base.*placement=separate"):
        build_ppo_trainer(config_from_dict(PPOConfig, base_overrides(
            tiny_dirs, tmp_path, arch="gpt2", reward_fn=None, reward_model=str(Path(cfg.output_dir) / "final"),
            placement="shared_base", lora_rank=4)))


def test_trunk_cache_runs_the_frozen_blocks_once_and_trains_the_same(tiny_dirs, pair_files, tmp_path):
    """With the adapter on the top block only, the block below runs once per distinct sequence over
    all epochs and evaluations, and training ends where the uncached run ends."""
    from tether.config import lora_settings
    from tether.lora import build_lora_reward_model, decoder_layers

    def train(cache_mb):
        cfg = reward_cfg(tiny_dirs, pair_files, tmp_path / str(cache_mb), model=str(tiny_dirs["llama"]), lora_rank=4,
                         lora_layers=1, epochs=3.0, trunk_cache_mb=cache_mb)
        tokenizer = load_tokenizer(cfg.model)
        torch.manual_seed(0)
        model = build_lora_reward_model(load_causal_lm(cfg.model), lora_settings(cfg))
        pairs, _ = encode_preference_pairs(pair_files["rows"], tokenizer, cfg)
        trainer = RewardTrainer(cfg, model, tokenizer.pad_token_id, pairs.select(range(30)), pairs.select(range(30, 40)))
        lowest = decoder_layers(model.base_model)[0]
        rows = []
        handle = lowest.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
        metrics = trainer.train()
        handle.remove()
        state = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
        return trainer, metrics, sum(rows), state

    cached, metrics, cached_rows, cached_state = train(64)
    plain, plain_metrics, plain_rows, plain_state = train(0)
    assert cached.trunks is not None and plain.trunks is None
    distinct = len({tuple(s) for p in (cached.train_pairs, cached.eval_pairs) for s in p.chosen + p.rejected})
    assert cached_rows == distinct == metrics["train/trunk_cached_sequences"]
    assert plain_rows > 2 * distinct  # three epochs and the evaluations, every block each time
    assert metrics["eval/accuracy"] == plain_metrics["eval/accuracy"]
    for name, value in plain_state.items():
        assert torch.allclose(cached_state[name], value, atol=1e-5), name


def test_trunk_cache_is_off_when_the_base_has_dropout(tiny_dirs, pair_files, tmp_path):
    from tether.config import lora_settings
    from tether.lora import build_lora_reward_model

    cfg = reward_cfg(tiny_dirs, pair_files, tmp_path, lora_rank=4, lora_layers=1)  # the GPT-2 has dropout 0.1
    model = build_lora_reward_model(load_causal_lm(cfg.model), lora_settings(cfg))
    pairs, _ = encode_preference_pairs(pair_files["rows"], load_tokenizer(cfg.model), cfg)
    assert RewardTrainer(cfg, model, 0, pairs).trunks is None
