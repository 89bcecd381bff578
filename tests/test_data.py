"""Tests for tether.data: loading, prompt tokenisation, padding, packing, samplers.

All offline: tokenizers are trained here on a few sentences, datasets are written
to tmp_path.
"""

import csv
import json
import subprocess
import sys

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tether.data import (
    BlockSampler,
    DataError,
    PromptSampler,
    PromptStats,
    left_pad,
    load_records,
    load_texts,
    pack_texts,
    records_from_dataset,
    tokenize_prompts,
)

CORPUS = [
    "The cat sat on the mat.",
    "Hello world, hello tether.",
    "user assistant system: a short chat about cats and mats.",
    "Proximal policy optimisation keeps the policy close to the reference.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GENERATION_HEADER = "<|assistant|>\n"

# Strings only (CSV cells are read as strings); commas, quotes, newlines and
# non-ASCII check that every writer/reader pair quotes and decodes properly.
RECORDS = [
    {"prompt": "The cat sat", "answer": "0042"},
    {"prompt": 'Hello, "world"\nline two', "answer": "7"},
    {"prompt": "café ✓", "answer": ""},
]


def _train_byte_level_bpe(special_tokens):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    backend = _train_byte_level_bpe(["<|endoftext|>", "<|pad|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def chat_tok():
    backend = _train_byte_level_bpe(["<|endoftext|>", "<|pad|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def bos_tok():
    """A Llama-style tokenizer that prepends BOS to every text."""
    backend = _train_byte_level_bpe(["<|endoftext|>", "<|pad|>", "<|bos|>"])
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


# ---------------------------------------------------------------------------
# load_records: every format gives back the same records
# ---------------------------------------------------------------------------


def _write_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps(r) for r in RECORDS]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # trailing blank line tolerated
    return str(path)


def _write_json_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return str(path)


def _write_json_data_key(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"data": RECORDS, "version": 1}), encoding="utf-8")
    return str(path)


def _write_json_lines_named_json(tmp_path):
    # datasets' Dataset.to_json writes JSON Lines under a .json name by default.
    path = tmp_path / "exported.json"
    datasets.Dataset.from_list(RECORDS).to_json(str(path))
    return str(path)


def _write_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerows(RECORDS)
    return str(path)


def _write_parquet(tmp_path):
    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    return str(path)


def _write_saved_dataset(tmp_path):
    path = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(
    "write",
    [
        _write_jsonl,
        _write_json_list,
        _write_json_data_key,
        _write_json_lines_named_json,
        _write_csv,
        _write_parquet,
        _write_saved_dataset,
    ],
)
def test_every_file_format_round_trips_the_same_records(tmp_path, write):
    assert load_records(write(tmp_path)) == RECORDS


def test_saved_dataset_dict_takes_the_requested_split(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS),
            "test": datasets.Dataset.from_list(RECORDS[:1]),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_records(str(tmp_path / "splits")) == RECORDS
    assert load_records(str(tmp_path / "splits"), split="test") == RECORDS[:1]


def test_saved_dataset_dict_names_available_splits_when_split_is_missing(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no split 'validation'.*\['train'\]"):
        load_records(str(tmp_path / "d"), split="validation")


def test_in_memory_dataset_and_list_give_the_same_records():
    assert records_from_dataset(datasets.Dataset.from_list(RECORDS)) == RECORDS
    assert records_from_dataset(list(RECORDS)) == RECORDS


def test_records_from_dataset_refuses_a_dataset_dict():
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)})
    with pytest.raises(DataError, match=r"\['train'\].*ds\['train'\]"):
        records_from_dataset(splits)


def test_csv_cells_stay_strings(tmp_path):
    records = load_records(_write_csv(tmp_path))
    assert records[0]["answer"] == "0042"  # not the int 42


# ---------------------------------------------------------------------------
# load_records: errors name the file and the fix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ["missing/prompts.jsonl", "prompts.parquet", "data/nested/dir"])
def test_missing_local_path_is_file_not_found(tmp_path, relative):
    path = str(tmp_path / relative)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == f"file not found: {path}"


def test_missing_bare_file_name_with_data_suffix_is_file_not_found():
    # No separator, but the suffix says it is a file, not a hub id.
    with pytest.raises(DataError, match=r"^file not found: no_such_prompts\.csv$"):
        load_records("no_such_prompts.csv")


def test_unsupported_suffix_names_the_file_and_the_allowed_suffixes(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("prompt\thi\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records(str(path))
    message = str(err.value)
    assert "'.tsv'" in message and str(path) in message
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        assert suffix in message


def test_malformed_jsonl_line_is_named_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_records(str(path))


def test_non_object_row_is_named_by_index(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n"just a string"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl.*item 1 is a str"):
        load_records(str(path))


def test_json_of_the_wrong_shape_names_the_expected_shape(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": RECORDS}), encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.json: expected a list of objects or \{\"data\""):
        load_records(str(path))


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", "\n"), ("empty.json", "[]"), ("empty.csv", "prompt,answer\n")],
)
def test_empty_dataset_is_an_error_naming_source_and_split(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records(str(path), split="train")
    assert str(err.value) == f"dataset {path} (split train) is empty"


def test_directory_that_is_not_a_saved_dataset_says_so(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match=r"notes is a directory but not one written by datasets' save_to_disk"):
        load_records(str(tmp_path / "notes"))


def test_hub_id_that_cannot_load_offline_names_the_id_and_suggests_a_local_file():
    with pytest.raises(DataError) as err:
        load_records("tether-tests/no-such-dataset")
    message = str(err.value)
    assert "'tether-tests/no-such-dataset'" in message
    assert "local .jsonl/.json/.csv/.parquet file" in message


def test_importing_tether_data_does_not_import_datasets():
    code = "import sys, tether.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# tokenize_prompts
# ---------------------------------------------------------------------------


def test_plain_text_prompts_use_the_tokenizer_defaults(tok):
    records = [{"prompt": "The cat sat"}, {"prompt": "hello world"}]
    ids, stats = tokenize_prompts(records, tok)
    assert ids == [tok("The cat sat")["input_ids"], tok("hello world")["input_ids"]]
    assert stats == PromptStats(
        total=2,
        truncated=0,
        chat=0,
        assistant_turns_dropped=0,
        max_length=max(len(i) for i in ids),
        max_original_length=max(len(i) for i in ids),
        mean_length=sum(len(i) for i in ids) / 2,
    )


def test_prompt_field_can_be_renamed(tok):
    ids, _ = tokenize_prompts([{"question": "hello world"}], tok, prompt_field="question")
    assert ids == [tok("hello world")["input_ids"]]


def test_left_truncation_keeps_the_last_tokens_and_counts_them(tok):
    long_text = "The cat sat on the mat. Hello world, hello tether."
    full = tok(long_text)["input_ids"]
    short = tok("cat")["input_ids"]
    assert len(full) > 6 and len(short) <= 6
    ids, stats = tokenize_prompts([{"prompt": long_text}, {"prompt": "cat"}], tok, max_prompt_length=6)
    assert ids[0] == full[-6:]
    assert ids[1] == short
    assert stats.truncated == 1
    assert stats.max_length == 6
    assert stats.max_original_length == len(full)


def test_left_truncation_keeps_a_leading_bos(bos_tok):
    text = "The cat sat on the mat. Hello world, hello tether."
    full = bos_tok(text)["input_ids"]
    assert full[0] == bos_tok.bos_token_id and len(full) > 5
    ids, stats = tokenize_prompts([{"prompt": text}], bos_tok, max_prompt_length=5)
    assert ids[0] == [bos_tok.bos_token_id] + full[-4:]
    assert stats.truncated == 1


def test_overlong_error_names_the_count_first_index_and_both_fixes(tok):
    long_text = "The cat sat on the mat. Hello world, hello tether."
    records = [{"prompt": "cat"}, {"prompt": long_text}, {"prompt": long_text}]
    with pytest.raises(DataError) as err:
        tokenize_prompts(records, tok, max_prompt_length=4, overlong="error", source="ppo_prompts.jsonl")
    message = str(err.value)
    assert message.startswith("ppo_prompts.jsonl: 2 of 3 prompts are longer than max_prompt_length=4")
    assert "first: record 1" in message
    assert "raise max_prompt_length" in message and "overlong='truncate'" in message


def test_unknown_overlong_policy_is_a_plain_value_error(tok):
    with pytest.raises(ValueError, match="overlong must be one of") as err:
        tokenize_prompts([{"prompt": "cat"}], tok, overlong="drop")
    assert type(err.value) is ValueError


def test_messages_are_rendered_with_a_generation_prompt(chat_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    ids, stats = tokenize_prompts([{"messages": messages}], chat_tok)
    text = chat_tok.decode(ids[0])
    assert text == "<|system|>Be brief.\n<|user|>hello world\n" + GENERATION_HEADER
    assert text.endswith(GENERATION_HEADER)
    assert stats.chat == 1


def test_prompt_field_may_hold_messages(chat_tok):
    messages = [{"role": "user", "content": "the cat"}]
    ids, _ = tokenize_prompts([{"prompt": messages}], chat_tok)
    assert chat_tok.decode(ids[0]) == "<|user|>the cat\n" + GENERATION_HEADER


def test_trailing_assistant_answer_is_dropped_from_a_chat_prompt(chat_tok):
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the cat sat"},
    ]
    ids, stats = tokenize_prompts([{"messages": conversation}, {"prompt": "plain"}], chat_tok)
    assert chat_tok.decode(ids[0]) == "<|user|>hello\n" + GENERATION_HEADER
    assert ids[1] == chat_tok("plain")["input_ids"]
    assert stats.assistant_turns_dropped == 1 and stats.chat == 1 and stats.total == 2


def test_messages_without_a_chat_template_is_a_data_error(tok):
    records = [{"prompt": "plain"}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError) as err:
        tokenize_prompts(records, tok, source="chat.jsonl")
    message = str(err.value)
    assert message.startswith("chat.jsonl: record 1 is a list of chat messages")
    assert "no chat_template" in message and "plain-text prompts" in message


def test_missing_prompt_field_names_the_index_and_the_fields_it_has(tok):
    records = [{"prompt": "ok"}, {"question": "where?", "id": 3}]
    with pytest.raises(DataError) as err:
        tokenize_prompts(records, tok, source="qa.jsonl")
    assert str(err.value).startswith("qa.jsonl: record 1 has no 'prompt' field (it has ['id', 'question'])")


@pytest.mark.parametrize("empty", ["", "   \n"])
def test_empty_prompt_text_names_the_index(tok, empty):
    records = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": empty}]
    with pytest.raises(DataError, match=r"^p\.jsonl: record 2 has an empty prompt"):
        tokenize_prompts(records, tok, source="p.jsonl")


def test_prompt_that_renders_to_zero_tokens_names_the_index(tok):
    # A template that renders nothing for a user turn: 0 tokens (empty content is refused earlier).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] != 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    records = [{"prompt": "cat"}, {"messages": [{"role": "user", "content": "hello"}]}]
    with pytest.raises(DataError, match=r"^p: record 1 has an empty prompt \(0 tokens\)"):
        tokenize_prompts(records, tokenizer, source="p")


def test_prompt_of_the_wrong_type_names_the_index(tok):
    with pytest.raises(DataError, match=r"record 1 field 'prompt' is a int"):
        tokenize_prompts([{"prompt": "a"}, {"prompt": 5}], tok)


def test_no_records_is_a_data_error(tok):
    with pytest.raises(DataError, match="empty.jsonl has no prompts"):
        tokenize_prompts([], tok, source="empty.jsonl")


# ---------------------------------------------------------------------------
# left_pad
# ---------------------------------------------------------------------------


def test_left_pad_aligns_the_last_tokens_and_masks_the_padding():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 99), min_size=1, max_size=6), min_size=1, max_size=5))
def test_left_pad_keeps_every_sequence_at_the_right_edge(sequences):
    input_ids, attention_mask = left_pad(sequences, pad_id=0)
    width = max(len(s) for s in sequences)
    assert input_ids.shape == attention_mask.shape == (len(sequences), width)
    for row, seq in enumerate(sequences):
        assert input_ids[row, width - len(seq):].tolist() == seq
        assert attention_mask[row].sum().item() == len(seq)
        assert input_ids[row, : width - len(seq)].eq(0).all()


# ---------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------


def _draw(sampler, batch_sizes):
    return [sampler.next_batch(b) for b in batch_sizes]


def test_prompt_sampler_covers_every_index_once_per_epoch():
    sampler = PromptSampler(7, seed=3)
    drawn = [i for batch in _draw(sampler, [3] * 7) for i in batch]  # 21 = 3 epochs
    epochs = [drawn[0:7], drawn[7:14], drawn[14:21]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(7))
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    assert sampler.epoch == 2


def test_prompt_sampler_is_deterministic_for_a_seed():
    assert _draw(PromptSampler(50, seed=1), [8] * 10) == _draw(PromptSampler(50, seed=1), [8] * 10)
    assert _draw(PromptSampler(50, seed=1), [8] * 10) != _draw(PromptSampler(50, seed=2), [8] * 10)


def test_prompt_sampler_batch_larger_than_the_dataset_spans_epochs():
    batch = PromptSampler(3, seed=0).next_batch(7)
    assert len(batch) == 7
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]


@pytest.mark.parametrize("draws_before_save", [0, 2, 3, 5])  # 3 and 5 cross epoch boundaries of 7
def test_prompt_sampler_resumes_exactly_from_state_dict(draws_before_save):
    uninterrupted = _draw(PromptSampler(7, seed=11), [3] * 8)

    first_run = PromptSampler(7, seed=11)
    _draw(first_run, [3] * draws_before_save)
    state = json.loads(json.dumps(first_run.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(7, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    assert _draw(resumed, [3] * (8 - draws_before_save)) == uninterrupted[draws_before_save:]


def test_prompt_sampler_state_for_other_data_is_rejected():
    state = PromptSampler(7, seed=1).state_dict()
    with pytest.raises(DataError, match="saved for 7 prompts but this run has 8"):
        PromptSampler(8).load_state_dict(state)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 12),
    batch_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    seed=st.integers(0, 2**31),
    save_after=st.integers(0, 12),
)
def test_prompt_sampler_epochs_are_permutations_and_resume_anywhere(size, batch_sizes, seed, save_after):
    save_after = min(save_after, len(batch_sizes))
    uninterrupted = _draw(PromptSampler(size, seed=seed), batch_sizes)
    flat = [i for batch in uninterrupted for i in batch]
    for start in range(0, len(flat) - size + 1, size):
        assert sorted(flat[start:start + size]) == list(range(size))

    sampler = PromptSampler(size, seed=seed)
    _draw(sampler, batch_sizes[:save_after])
    resumed = PromptSampler(size)
    resumed.load_state_dict(sampler.state_dict())
    assert _draw(resumed, batch_sizes[save_after:]) == uninterrupted[save_after:]


def test_block_sampler_returns_rows_and_covers_each_once_per_epoch():
    blocks = torch.arange(40).view(10, 4)
    sampler = BlockSampler(blocks, seed=5)
    batches = _draw(sampler, [4] * 5)  # 20 rows = 2 epochs
    assert all(b.shape == (4, 4) and b.dtype == torch.long for b in batches)
    rows = torch.cat(batches)
    first_ids = (rows[:, 0] // 4).tolist()  # row r starts with 4r
    assert sorted(first_ids[:10]) == list(range(10)) and sorted(first_ids[10:]) == list(range(10))
    for row in rows:
        assert row.tolist() == blocks[row[0] // 4].tolist()


def test_block_sampler_resumes_exactly_from_state_dict():
    blocks = torch.arange(36).view(9, 4)
    uninterrupted = _draw(BlockSampler(blocks, seed=2), [4] * 6)
    first_run = BlockSampler(blocks, seed=2)
    _draw(first_run, [4] * 3)  # 12 rows: mid second epoch
    resumed = BlockSampler(blocks, seed=99)
    resumed.load_state_dict(first_run.state_dict())
    for got, want in zip(_draw(resumed, [4] * 3), uninterrupted[3:]):
        assert torch.equal(got, want)


def test_block_sampler_rejects_a_non_matrix():
    with pytest.raises(ValueError, match=r"blocks must be \(N, L\), got shape \(12,\)"):
        BlockSampler(torch.arange(12))


# ---------------------------------------------------------------------------
# Pretraining text
# ---------------------------------------------------------------------------


def test_load_texts_splits_a_txt_file_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First doc\nstill first.\n\n\nSecond doc.\n   \nThird doc.\n", encoding="utf-8")
    assert load_texts(str(path)) == ["First doc\nstill first.", "Second doc.", "Third doc."]


def test_load_texts_reads_a_field_of_records(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    assert load_texts(str(path), text_field="body") == ["one", "two"]


def test_load_texts_missing_field_names_the_index_and_fields(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"texts\.jsonl: record 1 has no 'text' field \(it has \['body'\]\)"):
        load_texts(str(path))


def test_load_texts_missing_txt_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=rf"^file not found: {path}$"):
        load_texts(str(path))


def test_pack_texts_separates_documents_with_eos_and_cuts_full_blocks(tok):
    docs = ["The cat sat on the mat.", "Hello world"]
    first = tok(docs[0], add_special_tokens=False)["input_ids"]
    second = tok(docs[1], add_special_tokens=False)["input_ids"]
    stream = first + [tok.eos_token_id] + second + [tok.eos_token_id]
    block_size = 3
    blocks = pack_texts(docs, tok, block_size=block_size)
    n_blocks = len(stream) // block_size
    assert blocks.dtype == torch.long
    assert blocks.shape == (n_blocks, block_size)
    assert blocks.flatten().tolist() == stream[: n_blocks * block_size]
    assert blocks.flatten()[len(first)].item() == tok.eos_token_id  # EOS between the documents


def test_pack_texts_with_too_little_text_names_token_count_and_block_size(tok):
    n_tokens = len(tok("cat", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    with pytest.raises(DataError, match=rf"{n_tokens} tokens .* block_size=512"):
        pack_texts(["cat"], tok, block_size=512)
