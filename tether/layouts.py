"""Dataset layouts: the shapes public datasets come in, detected from their columns (or chosen with
`data_layout`) and turned into the explicit form each stage trains on.

Reward pairs (`tether reward`):
  explicit        {"prompt", "chosen", "rejected"}: a prompt string or chat messages; responses strings,
                  one assistant message, or several messages ending in an assistant turn
  conversational  {"chosen": [messages], "rejected": [messages]} and no prompt: the shared leading turns
                  are the prompt (the UltraFeedback-binarized layout)
  transcript      {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}: split on the last
                  "\\n\\nAssistant:" (the HH-RLHF layout)
SFT (`tether sft`):
  text               {"text": str} (or a .txt file)
  messages           {"messages": [messages]}
  prompt_completion  {"prompt", "completion"}: strings, or messages (a conversational prompt and completion)
PPO prompts: a string or chat messages in `prompt_field`, or a "messages" list (tether/data.py).

An SFT document becomes *segments* (text, trained): `loss_on` decides which parts the LM loss counts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tether.data import DataError, check_messages, texts_of

log = logging.getLogger(__name__)

PAIR_LAYOUTS = ("auto", "explicit", "conversational", "transcript")
SFT_LAYOUTS = ("auto", "text", "messages", "prompt_completion")
LOSS_ON = ("auto", "all", "completion", "assistant")
HH_ASSISTANT = "\n\nAssistant:"

Segment = tuple[str, bool]  # a piece of a document's text, and whether the LM loss counts its tokens


# --- reward pairs ---------------------------------------------------------------------------


def detect_pair_layout(record: Mapping, prompt_field: str, chosen_field: str, source: str = "<pairs>") -> str:
    """The layout of a preference record, from its columns and the type of its responses. A response
    that is a whole conversation (it opens with a user or system turn) carries its own prompt, even
    beside a prompt column (HuggingFaceH4/ultrafeedback_binarized has both)."""
    chosen = record.get(chosen_field)
    if _is_conversation(chosen) and chosen[0].get("role") != "assistant":
        return "conversational"
    if prompt_field in record:
        return "explicit"
    if isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "transcript"
    raise DataError(f"{source}: record 0 has no {prompt_field!r} field, and its {chosen_field!r} is neither a conversation "
                    f"(a list of messages) nor an HH transcript (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"); it has "
                    f"fields {sorted(map(str, record))}: set prompt_field / chosen_field / rejected_field to the "
                    "columns holding them, or data_layout")


def explicit_pairs(records: Sequence[Mapping], layout: str, fields: tuple[str, str, str],
                   source: str = "<pairs>") -> list[dict]:
    """Records of any pair layout as explicit {prompt, chosen, rejected} records (same field names as
    `fields`), other fields kept. `layout` "auto" is detected from the first record and logged."""
    if layout == "auto":
        layout = detect_pair_layout(records[0], fields[0], fields[1], source) if records else "explicit"
        log.info("%s: preference layout %s (detected from the columns; data_layout= chooses)", source, layout)
    if layout == "explicit":
        return [dict(r) for r in records]
    split = _split_conversation if layout == "conversational" else _split_transcript
    return [split(record, index, fields, source) for index, record in enumerate(records)]


def _split_conversation(record: Mapping, index: int, fields: tuple[str, str, str], source: str) -> dict:
    prompt_field, chosen_field, rejected_field = fields
    chosen, rejected = (_conversation(record, name, index, source) for name in (chosen_field, rejected_field))
    for name, conversation in ((chosen_field, chosen), (rejected_field, rejected)):
        if conversation[-1]["role"] != "assistant" or len(conversation) < 2:
            raise DataError(f"{source}: record {index} {name!r} must end with an assistant turn after at least one "
                            f"other turn (roles {[m['role'] for m in conversation]})")
    if chosen[:-1] != rejected[:-1]:
        turn = next(i for i, (c, r) in enumerate(zip(chosen, rejected + [None] * len(chosen))) if c != r)
        raise DataError(f"{source}: record {index}: {chosen_field!r} and {rejected_field!r} differ before their last "
                        f"assistant turn (at message {turn}), so they share no prompt; keep only records whose "
                        "conversations differ in the final answer, or give each record an explicit prompt")
    return {**record, prompt_field: chosen[:-1], chosen_field: [chosen[-1]], rejected_field: [rejected[-1]]}


def _split_transcript(record: Mapping, index: int, fields: tuple[str, str, str], source: str) -> dict:
    prompt_field, chosen_field, rejected_field = fields
    parts = {}
    for name in (chosen_field, rejected_field):
        text = record.get(name)
        if not isinstance(text, str) or HH_ASSISTANT not in text:
            raise DataError(f"{source}: record {index} {name!r} is not a transcript with an "
                            f"{HH_ASSISTANT.strip()!r} turn: {str(text)[:100]!r}")
        cut = text.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
        parts[name] = (text[:cut], text[cut:])
    if parts[chosen_field][0] != parts[rejected_field][0]:
        raise DataError(f"{source}: record {index}: {chosen_field!r} and {rejected_field!r} differ before their last "
                        f"{HH_ASSISTANT.strip()!r} turn, so they share no prompt; drop that record or give it an "
                        "explicit prompt")
    return {**record, prompt_field: parts[chosen_field][0], chosen_field: parts[chosen_field][1],
            rejected_field: parts[rejected_field][1]}


def _conversation(record: Mapping, name: str, index: int, source: str) -> list:
    value = record.get(name)
    if not _is_conversation(value):
        raise DataError(f"{source}: record {index} {name!r} is a {type(value).__name__}, not a list of "
                        "{\"role\": ..., \"content\": ...} messages (conversational layout)")
    return check_messages(list(value), index, source)


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


def response_text(prompt: Any, response: Any, tokenizer, index: int, field: str, source: str) -> str:
    """A response as the text that follows the rendered prompt: a string as it is; one assistant
    message: its content; several messages: the turns before the last rendered by the chat template
    (after the prompt's generation prompt), then the last assistant turn's content. One message is
    the several-message rule with nothing before the last turn."""
    if isinstance(response, str):
        return response
    if not _is_conversation(response) or response[-1].get("role") != "assistant" or \
            not isinstance(response[-1].get("content"), str):
        raise DataError(f"{source}: record {index} field {field!r} is a {type(response).__name__}; expected a string "
                        "or messages ending in an assistant turn [{\"role\": \"assistant\", \"content\": ...}]")
    check_messages(list(response), index, source)
    if len(response) == 1:
        return response[0]["content"]
    if not _is_conversation(prompt):
        raise DataError(f"{source}: record {index} field {field!r} holds {len(response)} messages but the prompt is "
                        "not a conversation; a multi-turn response needs a prompt of chat messages")
    before = render_chat(list(prompt), tokenizer, add_generation_prompt=True)
    turns = render_chat(list(prompt) + list(response[:-1]), tokenizer, add_generation_prompt=True)
    if not turns.startswith(before):
        raise DataError(f"{source}: record {index}: the chat template renders the prompt differently once more turns "
                        "follow, so the response's turns cannot be cut from it; give single-message responses")
    return turns[len(before):] + response[-1]["content"]


def render_chat(messages: list, tokenizer, add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data holds chat messages but the tokenizer has no chat_template; use plain text, or a "
                        "tokenizer with a chat template (e.g. an instruct model's)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# --- SFT documents ------------------------------------------------------------------------------


def detect_sft_layout(record: Mapping, text_field: str) -> str:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    raise DataError(f"record 0 has none of the SFT layouts' fields: {text_field!r} (text), 'messages', or 'prompt' "
                    f"and 'completion' (it has {sorted(map(str, record))}); set text_field, or data_layout")


def check_sft_records(records: Sequence[Mapping], layout: str, source: str) -> None:
    """Chat messages checked as the records load (before any tokenizer is built or trained): a null or
    empty turn is named with its record."""
    for index, record in enumerate(records):
        fields = ("messages",) if layout == "messages" else ("prompt", "completion")
        for name in fields:
            value = record.get(name)
            if layout == "messages" or isinstance(value, list):
                if not _is_conversation(value):
                    raise DataError(f"{source}: record {index} {name!r} is not a list of {{\"role\", \"content\"}} "
                                    "messages")
                check_messages(list(value), index, source)


def resolve_loss_on(loss_on: str, layout: str) -> str:
    """`auto` as TRL users expect: the completion for prompt-completion data, every token otherwise
    (TRL's completion_only_loss defaults on, assistant_only_loss off). A choice the layout cannot
    honour is refused."""
    if loss_on == "auto":
        return "completion" if layout == "prompt_completion" else "all"
    needs = {"completion": "prompt_completion", "assistant": "messages"}.get(loss_on)
    if needs is not None and needs != layout:
        raise DataError(f"loss_on={loss_on} needs {needs} data, but the SFT data is in the {layout} layout; use "
                        f"loss_on=all{' or completion' if layout == 'prompt_completion' else ''}"
                        f"{' or assistant' if layout == 'messages' else ''}")
    return loss_on


def sft_segments(records: Sequence[Mapping], layout: str, loss_on: str, tokenizer, text_field: str,
                 source: str) -> list[list[Segment]]:
    """Each record as its text in segments (text, trained) for the resolved `loss_on`. Chat messages
    were checked as the records loaded (check_sft_records)."""
    if layout == "text":
        return [[(text, True)] for text in texts_of(records, text_field, source)]
    if layout == "prompt_completion":
        return [_prompt_completion(record, tokenizer, loss_on == "all", index, source)
                for index, record in enumerate(records)]
    return [_conversation_segments(list(record["messages"]), tokenizer, loss_on == "all", index, source)
            for index, record in enumerate(records)]


def _prompt_completion(record: Mapping, tokenizer, train_prompt: bool, index: int, source: str) -> list[Segment]:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [(prompt, train_prompt), (completion, True)]
    if _is_conversation(prompt) and _is_conversation(completion):
        before = render_chat(list(prompt), tokenizer, add_generation_prompt=True)
        full = render_chat(list(prompt) + list(completion), tokenizer)
        if not full.startswith(before):
            raise DataError(f"{source}: record {index}: the chat template renders the prompt differently once the "
                            "completion follows; the completion cannot be cut from it")
        return [(before, train_prompt), (full[len(before):], True)]
    raise DataError(f"{source}: record {index}: 'prompt' and 'completion' must both be strings or both be lists of "
                    f"messages (got {type(prompt).__name__} and {type(completion).__name__})")


def _conversation_segments(messages: list, tokenizer, train_all: bool, index: int, source: str) -> list[Segment]:
    """The rendered conversation cut at each assistant turn: the template's text for a turn is what
    rendering one more message adds (templates with no generation markers need no special tags)."""
    full = render_chat(messages, tokenizer)
    if train_all:
        return [(full, True)]
    segments, done = [], 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_chat(messages[:turn], tokenizer, add_generation_prompt=True)) if turn else 0
        through_turn = render_chat(messages[: turn + 1], tokenizer)
        end = len(through_turn)
        if not (done <= start <= end and full.startswith(through_turn)):
            raise DataError(f"{source}: record {index}: the chat template does not render the conversation turn by "
                            "turn (an earlier turn changes once later ones follow), so its assistant turns cannot be "
                            "found; use loss_on=all")
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]
