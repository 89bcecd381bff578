"""Prompt and pretraining-text data for the PPO trainer.

Three jobs, each a few small functions:

1. **Load rows** from a local file (.jsonl / .json / .csv / .parquet), a directory
   written by ``datasets``' ``save_to_disk``, or a Hugging Face hub dataset id.
2. **Prompts**: tokenise plain-text or chat-message prompts, left-truncate the
   overlong ones, left-pad a batch, and sample batches in endless shuffled epochs.
3. **Pretraining text** (SFT, PPO-ptx): pack documents into fixed-size blocks
   separated by EOS and sample them the same way.

Every data problem raises :class:`DataError` naming the file or record and the fix.
``datasets`` / ``pyarrow`` are optional and imported only where a source needs them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "DataError",
    "load_records",
    "records_from_dataset",
    "PromptStats",
    "tokenize_prompts",
    "record_columns",
    "left_pad",
    "PromptSampler",
    "load_texts",
    "pack_texts",
    "pack_segments",
    "BlockSampler",
]

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TEXT_SUFFIX = ".txt"
# Suffixes that mark a string as a file name even when no such file exists, so a
# typo in a path says "file not found" instead of a confusing hub lookup.
_FILE_LIKE_SUFFIXES = frozenset(RECORD_SUFFIXES) | {
    TEXT_SUFFIX, ".tsv", ".arrow", ".gz", ".zip", ".xz", ".bz2", ".zst", ".xlsx"
}
OVERLONG_POLICIES = ("truncate", "error")


class DataError(ValueError):
    """Bad data input; the message names the file or item and how to fix it."""


# ---------------------------------------------------------------------------
# 1. Loading rows
# ---------------------------------------------------------------------------


def load_records(source: str, split: str = "train") -> list[dict]:
    """Rows of a dataset as plain dicts.

    ``source`` is, in order of precedence: an existing local file (.jsonl, .json,
    .csv, .parquet); an existing directory written by ``save_to_disk`` (a
    ``DatasetDict`` is narrowed to ``split``); otherwise a hub dataset id loaded
    with ``datasets.load_dataset(source, split=split)``. ``split`` is ignored for
    single files, which hold one split.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_record_file(path)
    elif path.is_dir():
        rows = _read_saved_dataset(path, split)
    elif _looks_like_path(source):
        raise DataError(f"file not found: {source}")
    else:
        rows = _read_hub_dataset(source, split)
    return _as_records(rows, f"dataset {source} (split {split})")


def records_from_dataset(ds: Any) -> list[dict]:
    """Rows of an in-memory ``datasets.Dataset`` (or any iterable of dicts)."""
    if hasattr(ds, "to_list"):
        rows = ds.to_list()
    elif isinstance(ds, Mapping):
        # A DatasetDict is a dict of splits; guessing one would silently train on the wrong data.
        raise DataError(
            f"got a mapping of splits {sorted(map(str, ds))}, not one dataset; "
            "pass a single split, e.g. ds['train']"
        )
    else:
        rows = list(ds)
    return _as_records(rows, "in-memory dataset")


def _looks_like_path(source: str) -> bool:
    """True for strings a user meant as a local path rather than a hub id ("org/name")."""
    if Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES:
        return True
    if source.startswith(("/", ".", "~")) or "\\" in source:
        return True
    # Hub ids have at most one "/" (owner/name); deeper nesting is a directory path.
    return source.count("/") > 1


def _read_record_file(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"unsupported file type {suffix or '(no suffix)'!r}: {path}; "
        f"use one of {', '.join(RECORD_SUFFIXES)} (or .txt for load_texts)"
    )


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is named with its line (a BOM is dropped)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte {raw[err.start]:#04x}: {err.reason}); save the "
                        "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other line separators.
    for line_number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue  # tolerate blank lines, e.g. a trailing newline pair
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: line {line_number} is not valid JSON ({err.msg}); "
                "each line of a .jsonl file must be one JSON object"
            ) from err
    return rows


def _read_json(path: Path) -> list:
    text = read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # datasets' Dataset.to_json writes JSON Lines under a .json name by default.
        if err.msg == "Extra data":
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if isinstance(data, Mapping) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a list of objects or {{\"data\": [...]}}, "
            f"got a JSON {type(data).__name__}"
        )
    return data


def _read_csv(path: Path) -> list:
    # Cells stay strings: guessing types would turn a prompt like "0042" into 42.
    # utf-8-sig drops the byte-order mark spreadsheet programs put before the header.
    with io.StringIO(read_utf8(path), newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return []
        _check_delimiter(path, reader.fieldnames)
        rows = []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}: line {reader.line_num} has more cells than the header "
                    f"({len(reader.fieldnames)} columns); quote cells that contain commas"
                )
            rows.append(row)
        return rows


def _check_delimiter(path: Path, header: list[str]) -> None:
    """A one-column header holding ';', tab or '|' is a file written with another delimiter."""
    if len(header) != 1:
        return
    for delimiter, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
        if delimiter in header[0]:
            raise DataError(f"{path}: the header {header[0]!r} is one column: the file looks {name}-separated, and "
                            "tether reads comma-separated .csv: export it with commas, or as .jsonl")


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path, split: str) -> list:
    datasets = _import_datasets(f"reading the directory {path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"{path} is a directory but not one written by datasets' save_to_disk "
            "(no dataset_info.json / dataset_dict.json); pass a data file instead"
        ) from err
    if isinstance(loaded, Mapping):  # DatasetDict
        if split not in loaded:
            raise DataError(
                f"{path} has no split {split!r}; available splits: {sorted(loaded)}"
            )
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub_dataset(source: str, split: str) -> list:
    datasets = _import_datasets(f"loading the hub dataset {source!r}")
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown id, bad split, auth: all the same fix
        raise DataError(
            f"could not load hub dataset {source!r} (split {split}): {err}. "
            f"No local file or directory named {source!r} exists either. "
            f"Offline, pass a local {'/'.join(RECORD_SUFFIXES)} file or a save_to_disk directory."
        ) from err
    return ds.to_list()


def _import_datasets(purpose: str):
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{purpose} needs the `datasets` package: pip install datasets "
            "(or pass a .jsonl/.json/.csv file, which needs nothing extra)"
        ) from err
    return datasets


def _as_records(rows: Sequence, source: str) -> list[dict]:
    """Validate that ``rows`` is a non-empty list of objects; copy each into a plain dict."""
    if len(rows) == 0:
        raise DataError(f"{source} is empty")
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(
                f"{source}: item {index} is a {type(row).__name__}, not an object "
                "with named fields such as {\"prompt\": ...}"
            )
        records.append(dict(row))
    return records


# ---------------------------------------------------------------------------
# 2. Prompts
# ---------------------------------------------------------------------------


@dataclass
class PromptStats:
    """What tokenize_prompts did; log it once so silent truncation is visible."""

    total: int  # prompts tokenised
    truncated: int  # prompts cut on the left to fit max_prompt_length
    chat: int  # prompts rendered with the tokenizer's chat template
    assistant_turns_dropped: int  # trailing assistant replies removed from chat prompts
    max_length: int  # longest prompt after truncation, in tokens
    max_original_length: int  # longest prompt before truncation, in tokens
    mean_length: float  # mean prompt length after truncation, in tokens

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def tokenize_prompts(
    records: Sequence[Mapping],
    tokenizer,
    prompt_field: str = "prompt",
    max_prompt_length: int = 512,
    overlong: str = "truncate",
    source: str = "<prompts>",
) -> tuple[list[list[int]], PromptStats]:
    """Token ids of each record's prompt, each at most ``max_prompt_length`` long.

    A prompt is ``record[prompt_field]`` (a string, or a list of chat messages
    ``{"role", "content"}``) or, failing that, ``record["messages"]``. Strings are
    tokenised with the tokenizer's default special tokens; messages go through
    ``apply_chat_template(..., add_generation_prompt=True)``. A trailing assistant
    message is dropped, so a chat dataset with answers can be reused as prompts:
    the policy writes its own answer. Overlong prompts are left-truncated (the end
    is what the response continues; a leading BOS is kept) or rejected.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")

    if len(records) == 0:
        raise DataError(f"{source} has no prompts")

    texts: dict[int, str] = {}
    conversations: dict[int, list] = {}
    dropped = 0
    for index, record in enumerate(records):
        prompt = _prompt_of(record, index, prompt_field, source)
        if isinstance(prompt, str):
            texts[index] = prompt
        else:
            conversations[index], was_dropped = _without_final_answer(prompt)
            dropped += was_dropped
            if not conversations[index]:
                raise DataError(f"{source}: record {index} has no messages before its final answer")

    ids_by_index = _tokenize_texts(texts, tokenizer, source)
    ids_by_index.update(_tokenize_conversations(conversations, tokenizer, source))
    ids = [ids_by_index[i] for i in range(len(records))]

    for index, prompt_ids in enumerate(ids):
        if len(prompt_ids) == 0:
            raise DataError(f"{source}: record {index} has an empty prompt (0 tokens)")
    original_lengths = [len(p) for p in ids]
    too_long = [i for i, n in enumerate(original_lengths) if n > max_prompt_length]
    if too_long and overlong == "error":
        raise DataError(
            f"{source}: {len(too_long)} of {len(ids)} prompts are longer than "
            f"max_prompt_length={max_prompt_length} tokens (first: record {too_long[0]}, "
            f"{original_lengths[too_long[0]]} tokens); raise max_prompt_length or "
            "set overlong='truncate' to keep the last tokens of each"
        )
    bos_id = getattr(tokenizer, "bos_token_id", None)
    for index in too_long:
        ids[index] = _keep_last_tokens(ids[index], max_prompt_length, bos_id)

    lengths = [len(p) for p in ids]
    stats = PromptStats(
        total=len(ids),
        truncated=len(too_long),
        chat=len(conversations),
        assistant_turns_dropped=dropped,
        max_length=max(lengths, default=0),
        max_original_length=max(original_lengths, default=0),
        mean_length=sum(lengths) / len(lengths) if lengths else 0.0,
    )
    return ids, stats


def record_columns(records: Sequence[Mapping], prompt_field: str = "prompt") -> dict[str, list]:
    """Each record's fields other than its prompt, as {name: one value per record} (None where a
    record lacks the field): what a reward function reads besides the response (e.g. `answer`)."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    prompt_names = {prompt_field} if any(prompt_field in r for r in records) else {prompt_field, "messages"}
    return {name: [record.get(name) for record in records] for name in names if name not in prompt_names}


def _prompt_of(record: Mapping, index: int, prompt_field: str, source: str) -> str | list:
    """The record's prompt as a string or a validated list of chat messages."""
    if not isinstance(record, Mapping):
        raise DataError(f"{source}: record {index} is a {type(record).__name__}, not an object")
    if prompt_field in record:
        field, prompt = prompt_field, record[prompt_field]
    elif "messages" in record:
        field, prompt = "messages", record["messages"]
    else:
        raise DataError(
            f"{source}: record {index} has no {prompt_field!r} field (it has "
            f"{sorted(map(str, record))}); set prompt_field to the column holding "
            "the prompt, or give each record a 'messages' list"
        )
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{source}: record {index} has an empty prompt in field {field!r}")
        return prompt
    if isinstance(prompt, list) and all(_is_message(m) for m in prompt):
        return check_messages(prompt, index, source)
    raise DataError(
        f"{source}: record {index} field {field!r} is a {type(prompt).__name__}; expected "
        "a string or a list of {\"role\": ..., \"content\": ...} messages"
    )


def check_messages(messages: list, index: int, source: str) -> list:
    """Chat messages whose every turn has text: a null or empty content would train on (or prompt
    with) an empty turn without a word."""
    for number, message in enumerate(messages):
        if not _is_message(message):
            raise DataError(f"{source}: record {index} message {number} is not a {{\"role\": ..., \"content\": ...}} "
                            f"object: {str(message)[:100]}")
        content = message["content"]
        if content is None or (isinstance(content, str) and not content.strip()):
            raise DataError(f"{source}: record {index} message {number} ({message['role']}) has "
                            f"{'null' if content is None else 'empty'} content; give it text or drop the message")
    return messages


def _is_message(item: Any) -> bool:
    return isinstance(item, Mapping) and isinstance(item.get("role"), str) and "content" in item


def _without_final_answer(messages: list) -> tuple[list, bool]:
    """Drop a trailing assistant turn: it is the answer the policy must write itself."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], True
    return messages, False


def _tokenize_texts(texts: dict[int, str], tokenizer, source: str = "<prompts>") -> dict[int, list[int]]:
    if not texts:
        return {}
    # One batched call is much faster than one call per prompt with fast tokenizers.
    # verbose=False: the "longer than model_max_length" warning is moot, we truncate below.
    try:
        encoded = tokenizer(list(texts.values()), verbose=False)["input_ids"]
    except Exception:  # noqa: BLE001 - find the record the tokenizer cannot take, and name it
        for index, text in texts.items():
            try:
                tokenizer(text, verbose=False)
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{source}: record {index}: the tokenizer cannot encode its prompt ({type(err).__name__}: "
                                f"{str(err)[:200]}); fix that text (e.g. a lone surrogate such as \\ud800 from a "
                                "cut emoji)") from err
        raise
    return {index: list(ids) for index, ids in zip(texts, encoded)}


def _tokenize_conversations(conversations: dict[int, list], tokenizer, source: str) -> dict[int, list[int]]:
    if not conversations:
        return {}
    if not getattr(tokenizer, "chat_template", None):
        first = min(conversations)
        raise DataError(
            f"{source}: record {first} is a list of chat messages but the tokenizer has no "
            "chat_template; use plain-text prompts, or a tokenizer with a chat template "
            "(e.g. an instruct model's tokenizer)"
        )
    rendered = {}
    for index, messages in conversations.items():
        try:
            rendered[index] = _render_chat(messages, tokenizer)
        except Exception as err:  # noqa: BLE001 - a template that raises (an unknown role, ...) names its record
            roles = [m.get("role") for m in messages]
            raise DataError(f"{source}: record {index}: the chat template failed on its messages (roles {roles}): "
                            f"{type(err).__name__}: {str(err)[:200]}; fix the record or the template") from err
    return rendered


def _render_chat(messages: list, tokenizer) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # Some transformers versions return a BatchEncoding even with return_dict=False.
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    return list(rendered)


def _keep_last_tokens(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """Left-truncate to ``max_length`` tokens, keeping a leading BOS the model expects."""
    if bos_id is not None and max_length > 1 and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists to the longest one, for batched generation.

    Returns ``input_ids`` (B, P) long and ``attention_mask`` (B, P) long, 1 on real
    tokens. Left padding keeps every prompt's last token in the final column, where
    generation continues.
    """
    return _pad(sequences, pad_id, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(B, L) long input_ids right-padded with ``pad_id`` and (B, L) long attention_mask.

    Right padding for training: no row ever has a query position that sees no real token,
    and under the causal mask real tokens never see the pads after them.
    """
    return _pad(sequences, pad_id, left=False)


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    if len(sequences) == 0:
        raise ValueError(f"{'left' if left else 'right'}_pad needs at least one sequence")
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)  # (B, L)
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        span = slice(longest - len(seq), longest) if left else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


class _ShuffledEpochs:
    """Indices 0..N-1 in endless epochs, each a fresh permutation.

    Each epoch's permutation is a pure function of (seed, epoch), so the state is
    three integers and a resumed run draws exactly the batches an uninterrupted one
    would, without pickling generator state.
    """

    def __init__(self, size: int, seed: int, what: str):
        if size < 1:
            raise DataError(f"cannot sample from 0 {what}")
        self.size, self.seed, self.what = size, seed, what
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        # Hash (seed, epoch) into the generator seed: seed+epoch would make
        # seed 1 epoch 0 repeat seed 0 epoch 1.
        digest = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.randperm(self.size, generator=generator).tolist()

    def next_indices(self, batch_size: int) -> list[int]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        indices: list[int] = []
        while len(indices) < batch_size:
            if self.position == self.size:  # epoch done: reshuffle and carry on
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(batch_size - len(indices), self.size - self.position)
            indices.extend(self._order[self.position:self.position + take])
            self.position += take
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["size"] != self.size:
            raise DataError(
                f"sampler state was saved for {state['size']} {self.what} but this run has "
                f"{self.size}; resume with the same data, or start a fresh sampler"
            )
        if not 0 <= state["position"] <= self.size:
            raise ValueError(f"sampler position {state['position']} outside 0..{self.size}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


class PromptSampler:
    """Batches of prompt indices in endless shuffled epochs (see ``_ShuffledEpochs``).

    A batch that crosses an epoch boundary takes the rest of the old epoch and the
    start of the next, so every prompt is seen once per epoch.
    """

    def __init__(self, num_prompts: int, seed: int = 0):
        self._epochs = _ShuffledEpochs(num_prompts, seed, "prompts")

    @property
    def epoch(self) -> int:
        """Epochs completed so far (0 during the first pass)."""
        return self._epochs.epoch

    def next_batch(self, batch_size: int) -> list[int]:
        return self._epochs.next_indices(batch_size)

    def state_dict(self) -> dict[str, int]:
        return self._epochs.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._epochs.load_state_dict(state)


# ---------------------------------------------------------------------------
# 3. Pretraining text (SFT, PPO-ptx)
# ---------------------------------------------------------------------------


def load_texts(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Documents from a .txt file (one per blank-line-separated paragraph) or any
    ``load_records`` source (one per record's ``text_field``). Empty documents are skipped."""
    path = Path(str(source)).expanduser()
    if path.suffix.lower() == TEXT_SUFFIX:
        if not path.is_file():
            raise DataError(f"file not found: {source}")
        texts = _paragraphs(read_utf8(path))
    else:
        texts = texts_of(load_records(source, split=split), text_field, source)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"dataset {source} (split {split}) is empty: it has no non-blank text")
    return texts


def _paragraphs(text: str) -> list[str]:
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def texts_of(records: list[dict], text_field: str, source: str) -> list[str]:
    texts = []
    for index, record in enumerate(records):
        if text_field not in record:
            raise DataError(
                f"{source}: record {index} has no {text_field!r} field (it has "
                f"{sorted(map(str, record))}); set text_field to the column holding the text"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{source}: record {index} field {text_field!r} is a {type(text).__name__}, not text"
            )
        texts.append(text)
    return texts


def pack_texts(texts: Sequence[str], tokenizer, block_size: int) -> Tensor:
    """Pack documents into (N, block_size) long blocks: ``doc₀ EOS doc₁ EOS …`` cut
    into consecutive blocks, the incomplete tail dropped.

    Packing wastes no compute on padding; the EOS after each document teaches where
    a document ends and marks the boundary where a block spans two documents.
    Documents are tokenised without the tokenizer's own special tokens (no BOS per
    document), so EOS is the only separator.
    """
    eos_id = _packing_eos(tokenizer, block_size)
    stream: list[int] = []
    if texts:
        for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos_id)
    return _as_blocks(stream, block_size, torch.long)


def _packing_eos(tokenizer, block_size: int) -> int:
    """The EOS that separates packed documents (checked with the block size)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise DataError("packing needs a tokenizer with an eos_token to separate documents")
    return eos_id


def _as_blocks(stream: list, block_size: int, dtype: torch.dtype) -> Tensor:
    """(N, block_size) consecutive blocks of the stream, the incomplete tail dropped."""
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise DataError(
            f"too little text to pack: {len(stream)} tokens (EOS separators included) "
            f"is less than one block of block_size={block_size}; add text or lower block_size"
        )
    return torch.tensor(stream[: num_blocks * block_size], dtype=dtype).view(num_blocks, block_size)


def pack_segments(documents: Sequence[Sequence[tuple[str, bool]]], tokenizer,
                  block_size: int) -> tuple[Tensor, Tensor]:
    """Like :func:`pack_texts`, for documents in segments (text, trained): (N, block_size) long blocks
    and (N, block_size) bool `trained`, True on the tokens the LM loss counts as targets.

    Each document is tokenised whole (the same ids as pack_texts gives its joined text); a token
    counts when its last character lies in a trained segment; the EOS after a document counts when
    its last segment does (the model learns to stop after an answer)."""
    eos_id = _packing_eos(tokenizer, block_size)
    texts = ["".join(text for text, _ in doc) for doc in documents]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
    stream: list[int] = []
    trained: list[bool] = []
    for doc, ids, offsets in zip(documents, encoded["input_ids"], encoded["offset_mapping"]):
        by_char = [flag for text, flag in doc for _ in text]
        stream.extend(ids)
        trained.extend(by_char[max(end, 1) - 1] if by_char else True for _, end in offsets)
        stream.append(eos_id)
        trained.append(bool(doc) and doc[-1][1])
    return _as_blocks(stream, block_size, torch.long), _as_blocks(trained, block_size, torch.bool)


class BlockSampler:
    """Batches of rows of a (N, L) token tensor in endless shuffled epochs,
    resumable through ``state_dict`` exactly like :class:`PromptSampler`."""

    def __init__(self, blocks: Tensor, seed: int = 0, trained: Optional[Tensor] = None):
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (N, L), got shape {tuple(blocks.shape)}")
        self.blocks = blocks  # (N, L)
        self.trained = trained  # (N, L) bool: the targets the loss counts (pack_segments); None = all
        self._epochs = _ShuffledEpochs(blocks.shape[0], seed, "blocks")

    @property
    def epoch(self) -> int:
        return self._epochs.epoch

    def next_batch(self, batch_size: int) -> Tensor:
        """(batch_size, L) rows of ``blocks``."""
        return self.next_batch_with_mask(batch_size)[0]

    def next_batch_with_mask(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """(batch_size, L) rows of ``blocks`` and of ``trained`` (all True without one)."""
        indices = torch.tensor(self._epochs.next_indices(batch_size), dtype=torch.long)
        blocks = self.blocks.index_select(0, indices)
        trained = self.trained.index_select(0, indices) if self.trained is not None else torch.ones_like(
            blocks, dtype=torch.bool)
        return blocks, trained

    def state_dict(self) -> dict[str, int]:
        return self._epochs.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._epochs.load_state_dict(state)
