"""Dataset layouts (tether/layouts.py): the public preference and SFT layouts load to the same token
ids as their explicit equivalents, refusals name the record, and SFT's loss_on counts only the
completion / assistant tokens, exactly, under accumulation.

The fixtures are written by hand after the published schemas (no hub access here):
- Anthropic/hh-rlhf: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
- trl-lib/ultrafeedback_binarized: {"chosen": [user, assistant], "rejected": [user, assistant], "score_chosen", ...}
- HuggingFaceH4/ultrafeedback_binarized: the same plus "prompt" (a string), "prompt_id" and "messages"
- trl-lib explicit conversational: {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}
- SFT: {"text"}, {"messages"}, {"prompt", "completion"} (TRL's dataset formats)
"""

from __future__ import annotations

import logging

import pytest
import torch

import tether
from tether.algo import lm_loss
from tether.config import RewardConfig, SFTConfig
from tether.data import DataError, pack_segments, pack_texts
from tether.layouts import detect_pair_layout, resolve_loss_on, sft_segments
from tether.pipelines.reward import encode_preference_pairs
from tether.pipelines.sft import pack_documents, sft_records
from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer
from tether.trainers.sft import SFTTrainer, block_loss

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    return train_tokenizer(builtin_corpus(200) + ["<|im_start|>user\n<|im_end|>\nHuman: Assistant:"], vocab_size=320,
                           chat_template=CHATML)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


QUESTIONS = [("how is the cat?", "the cat is kind and good.", "the cat is bad."),
             ("where is the old man?", "he is at home at night.", "no."),
             ("what did the dog do?", "the dog ran to the little girl.", "dog dog dog.")]


def encode(records, tokenizer, **options):
    pairs, _ = encode_preference_pairs(records, tokenizer, RewardConfig(model="unused", data="unused", **options))
    return pairs.chosen, pairs.rejected


# --- reward pairs ---------------------------------------------------------------------------


def test_implicit_prompt_conversations_load_as_their_explicit_equivalent(chat_tokenizer, caplog):
    trl_lib = [{"chosen": [user(q), assistant(c)], "rejected": [user(q), assistant(r)], "score_chosen": 8.0,
                "score_rejected": 3.0} for q, c, r in QUESTIONS]
    h4 = [{"prompt": q, "prompt_id": str(i), "chosen": [user(q), assistant(c)], "rejected": [user(q), assistant(r)],
           "messages": [user(q), assistant(c)], "score_chosen": 8.0, "score_rejected": 3.0}
          for i, (q, c, r) in enumerate(QUESTIONS)]
    explicit = [{"prompt": [user(q)], "chosen": [assistant(c)], "rejected": [assistant(r)]} for q, c, r in QUESTIONS]
    with caplog.at_level(logging.INFO, logger="tether.layouts"):
        assert encode(trl_lib, chat_tokenizer) == encode(explicit, chat_tokenizer)
    assert "preference layout conversational (detected from the columns" in caplog.text
    assert encode(h4, chat_tokenizer) == encode(explicit, chat_tokenizer)
    # Several shared turns: all of them are the prompt.
    long = [{"chosen": [user("hi"), assistant("hello."), user(q), assistant(c)],
             "rejected": [user("hi"), assistant("hello."), user(q), assistant(r)]} for q, c, r in QUESTIONS]
    long_explicit = [{"prompt": [user("hi"), assistant("hello."), user(q)], "chosen": c, "rejected": r}
                     for q, c, r in QUESTIONS]
    assert encode(long, chat_tokenizer) == encode(long_explicit, chat_tokenizer)


def test_hh_transcripts_split_on_the_last_assistant_turn(chat_tokenizer):
    hh = [{"chosen": f"\n\nHuman: hi\n\nAssistant: hello.\n\nHuman: {q}\n\nAssistant: {c}",
           "rejected": f"\n\nHuman: hi\n\nAssistant: hello.\n\nHuman: {q}\n\nAssistant: {r}"} for q, c, r in QUESTIONS]
    explicit = [{"prompt": f"\n\nHuman: hi\n\nAssistant: hello.\n\nHuman: {q}\n\nAssistant:", "chosen": f" {c}",
                 "rejected": f" {r}"} for q, c, r in QUESTIONS]
    assert encode(hh, chat_tokenizer) == encode(explicit, chat_tokenizer)
    assert detect_pair_layout(hh[0], "prompt", "chosen") == "transcript"
    assert encode(hh, chat_tokenizer, data_layout="transcript") == encode(explicit, chat_tokenizer)


def test_records_whose_conversations_diverge_early_are_refused_by_index(chat_tokenizer):
    good = {"chosen": [user("a"), assistant("b.")], "rejected": [user("a"), assistant("c.")]}
    diverged = {"chosen": [user("a"), assistant("b."), user("x"), assistant("y.")],
                "rejected": [user("a"), assistant("z."), user("x"), assistant("w.")]}
    with pytest.raises(DataError, match=r"pairs.jsonl: record 2: 'chosen' and 'rejected' differ before their last "
                                        r"assistant turn \(at message 1\)"):
        encode_preference_pairs([good, good, diverged], chat_tokenizer,
                                RewardConfig(model="unused", data="unused"), source="pairs.jsonl")
    ends_with_user = {"chosen": [user("a"), assistant("b."), user("c")], "rejected": [user("a"), assistant("d.")]}
    with pytest.raises(DataError, match=r"record 1 'chosen' must end with an assistant turn"):
        encode([good, ends_with_user], chat_tokenizer)
    hh_diverged = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: b"}
    with pytest.raises(DataError, match=r"record 0: 'chosen' and 'rejected' differ before their last 'Assistant:'"):
        encode([hh_diverged], chat_tokenizer)
    with pytest.raises(DataError, match=r"record 0 has no .prompt. field.*neither a conversation .* nor an HH transcript"):
        encode([{"chosen": "a", "rejected": "b"}], chat_tokenizer)


def test_a_multi_message_response_is_its_rendered_turns_then_the_last_answer(chat_tokenizer):
    record = {"prompt": [user("how is the cat?")], "chosen": [assistant("let me look."), user("and?"),
                                                              assistant("the cat is good.")],
              "rejected": [assistant("no.")]}
    chosen, rejected = encode([record], chat_tokenizer)
    text = chat_tokenizer.decode(chosen[0])
    assert text == ("<|im_start|>user\nhow is the cat?<|im_end|>\n<|im_start|>assistant\nlet me look.<|im_end|>\n"
                    "<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\nthe cat is good.<|endoftext|>")
    with pytest.raises(DataError, match="a multi-turn response needs a prompt of chat messages"):
        encode([{**record, "prompt": "how is the cat?"}], chat_tokenizer)


def test_reward_training_from_python_rows_in_the_hh_layout(tiny_dirs, tmp_path):
    rows = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
            for q, c, r in QUESTIONS * 4]
    result = tether.reward(data=rows, model=str(tiny_dirs["gpt2"]), output_dir=str(tmp_path / "rm"), epochs=1.0,
                           batch_size=4, eval_fraction=0.25, progress=False)
    assert result.metrics["train/pairs"] + result.metrics["eval/pairs"] == 12
    assert "<in memory> 12 records" in (result.run_dir / "config.yaml").read_text()


# --- SFT ------------------------------------------------------------------------------------


def test_sft_layouts_are_detected_and_logged(tmp_path, caplog):
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "2+2=", "completion": "4"}\n')
    with caplog.at_level(logging.INFO, logger="tether.pipelines.sft"):
        records, layout = sft_records(str(path), "text")
    assert layout == "prompt_completion" and records == [{"prompt": "2+2=", "completion": "4"}]
    assert "SFT layout prompt_completion (detected from the columns" in caplog.text
    assert sft_records("x", "text", records=[{"messages": [user("a")]}])[1] == "messages"
    assert sft_records("x", "body", records=[{"body": "words"}])[1] == "text"
    with pytest.raises(DataError, match=r"none of the SFT layouts' fields"):
        sft_records("x", "text", records=[{"question": "a"}])


def test_loss_on_defaults_as_trl_and_refuses_what_the_layout_cannot_do():
    assert resolve_loss_on("auto", "prompt_completion") == "completion"
    assert resolve_loss_on("auto", "messages") == "all" and resolve_loss_on("auto", "text") == "all"
    with pytest.raises(DataError, match="loss_on=assistant needs messages data, but the SFT data is in the text"):
        resolve_loss_on("assistant", "text")
    with pytest.raises(DataError, match="loss_on=completion needs prompt_completion data.*messages layout; use "
                                        "loss_on=all or assistant"):
        resolve_loss_on("completion", "messages")


def trained_text(tokenizer, blocks, trained):
    return tokenizer.decode(blocks[trained])


def test_prompt_completion_with_loss_on_all_packs_exactly_as_text(chat_tokenizer):
    rows = [{"prompt": f"{q} ", "completion": c} for q, c, _ in QUESTIONS * 3]
    docs = sft_segments(rows, "prompt_completion", "all", chat_tokenizer, "text", "x")
    blocks, trained = pack_documents(docs, chat_tokenizer, 16)
    assert trained is None
    assert torch.equal(blocks, pack_texts([r["prompt"] + r["completion"] for r in rows], chat_tokenizer, 16))
    # loss_on=completion: the same ids, and the counted ones are the completions and their EOS.
    docs = sft_segments(rows, "prompt_completion", "completion", chat_tokenizer, "text", "x")
    masked_blocks, masked = pack_documents(docs, chat_tokenizer, 16)
    assert torch.equal(masked_blocks, blocks)
    counted = trained_text(chat_tokenizer, masked_blocks, masked)
    whole = chat_tokenizer.decode(masked_blocks.flatten())
    for q, c, _ in QUESTIONS:
        assert q not in counted
    assert counted.count("<|endoftext|>") == whole.count("<|endoftext|>")
    assert "the cat is kind and good." in counted


def test_assistant_only_loss_counts_the_assistant_turns_as_rendered(chat_tokenizer):
    rows = [{"messages": [user(q), assistant(c), user("thanks"), assistant(r)]} for q, c, r in QUESTIONS * 4]
    docs = sft_segments(rows, "messages", "assistant", chat_tokenizer, "text", "x")
    assert [text for text, trained in docs[0] if trained] == ["the cat is kind and good.<|im_end|>\n",
                                                             "the cat is bad.<|im_end|>\n"]
    blocks, trained = pack_segments(docs, chat_tokenizer, 32)
    counted = trained_text(chat_tokenizer, blocks, trained)
    assert "user" not in counted and "thanks" not in counted and "the dog ran to the little girl." in counted
    every = sft_segments(rows, "messages", "all", chat_tokenizer, "text", "x")
    assert torch.equal(pack_documents(every, chat_tokenizer, 32)[0], blocks)


def test_masked_targets_get_no_gradient_and_the_loss_is_the_counted_tokens_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 6))
    trained = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, _ = lm_loss(logits, ids, trained)
    loss.backward()
    naive = [-torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]] for b in range(2) for t in range(1, 6) if trained[b, t]]
    assert loss.item() == pytest.approx(torch.stack(naive).mean().item(), abs=1e-6)
    # logits[:, t] predicts ids[:, t+1]: its gradient is zero unless that target counts.
    for b in range(2):
        for t in range(6):
            counts = t + 1 < 6 and bool(trained[b, t + 1])
            assert bool(logits.grad[b, t].abs().sum() > 0) == counts


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_sft_step_loss_is_the_naive_per_token_mean_under_accumulation(chat_tokenizer, micro_batch_size):
    rows = [{"prompt": f"{q} ", "completion": c} for q, c, _ in QUESTIONS * 6]
    blocks, trained = pack_documents(sft_segments(rows, "prompt_completion", "completion", chat_tokenizer, "text",
                                                  "x"), chat_tokenizer, 12)
    cfg = SFTConfig(data="unused", init="scratch", batch_size=4, gradient_accumulation_steps=4 // micro_batch_size, max_steps=1,
                    progress=False, max_grad_norm=1e9)
    cfg.validate()  # sets micro_batch_size
    model = build_tiny_causal_lm("gpt2", chat_tokenizer, seed=0, hidden=32, layers=1, heads=2, dropout=0.0)
    trainer = SFTTrainer(cfg, model, blocks, None, train_trained=trained)
    grads = {}
    original_step = trainer.optimizer.step

    def capture(*args, **kwargs):  # the accumulated gradient, just before the optimizer uses it
        grads["wte"] = model.transformer.wte.weight.grad.clone()
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reported = trainer.step()["train/loss"]
    # The naive reference: the same batch, one token at a time, mean over counted targets.
    fresh = build_tiny_causal_lm("gpt2", chat_tokenizer, seed=0, hidden=32, layers=1, heads=2, dropout=0.0)
    fresh.load_state_dict(state)
    batch, batch_trained = trainer.sampler.__class__(blocks, seed=cfg.seed, trained=trained).next_batch_with_mask(4)
    logits = fresh(input_ids=batch).logits
    terms = [-torch.log_softmax(logits[b, t - 1], -1)[batch[b, t]] for b in range(4) for t in range(1, 12)
             if batch_trained[b, t]]
    naive = torch.stack(terms).mean()
    naive.backward()
    assert reported == pytest.approx(naive.item(), abs=1e-5)
    assert torch.allclose(grads["wte"], fresh.transformer.wte.weight.grad, atol=1e-6)
    loss, _ = block_loss(fresh, batch, trained=batch_trained)
    assert loss.item() == pytest.approx(naive.item(), abs=1e-5)


def test_sft_from_python_rows_in_the_prompt_completion_layout(tmp_path):
    rows = [{"prompt": f"{q} ", "completion": c} for q, c, _ in QUESTIONS * 20]
    result = tether.sft(data=rows, init="scratch", output_dir=str(tmp_path / "sft"), max_steps=2, block_size=16,
                        batch_size=4, hidden=32, layers=1, heads=2, progress=False,
                        eval_fraction=0.2)
    assert result.metrics["train/steps"] == 2 and "eval/loss" in result.metrics
