"""Read instruction data from local files and turn each record into chat messages.

Files: .jsonl, .json (a list of records), .parquet, or a folder written by
`datasets.Dataset.save_to_disk`. Record formats:
- alpaca: {"instruction", "input"?, "output", "history"?: [[instruction, response], ...]}
- chat: {"messages": [{"role": system|user|assistant, "content": str, "reasoning_content"?: str}, ...]}
- prompt_completion: {"prompt", "completion"}
Any of them may carry a top-level "system" (the conversation's system turn). A field that would
change the conversation but cannot be represented (tool definitions, tool calls, other message
keys) is refused, never dropped. Every problem is reported as a DataError naming the file, the line or record,
and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Tuple

from ..common import UserError

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "reasoning_content")  # reasoning_content: read by reasoning models' templates
MAX_LINE_BYTES = 256 << 20  # a record longer than this is refused, not read whole
UNSUPPORTED_FIELDS = {"tools": "tool definitions", "functions": "function definitions"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the line or record, and the problem."""


@dataclass
class Conversation:
    id: str
    messages: List[dict]
    where: str  # "file:line" or "file[record N]", for error messages
    record: dict  # the raw record, for stages that need its other fields


def read_records(path: str) -> Iterator[Tuple[str, dict]]:
    """Yield (location, record) pairs from one data file or folder."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        yield from _read_saved_dataset(path)
    elif path.endswith(".jsonl"):
        yield from _read_jsonl(path)
    elif path.endswith(".json"):
        yield from _read_json(path)
    elif path.endswith(".parquet"):
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file type (expected .jsonl, .json, .parquet or a save_to_disk folder)")


def _read_jsonl(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:  # a file with no newline is not read whole into memory
                raise DataError(f"{where}: a line longer than {MAX_LINE_BYTES >> 20} MiB (one record per line is "
                                "expected; is this a .json file, or are the newlines missing?)")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield where, record


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        yield f"{path}[record {i}]", record


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}[record {i}]", record


def _read_saved_dataset(path: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: not a datasets.save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds a DatasetDict with splits {list(ds)}; point at one split's folder")
    for i, record in enumerate(ds):
        yield f"{path}[record {i}]", record


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "prompt_completion"
    raise KeyError


def _text(record: dict, key: str, where: str, required_nonempty: bool = True) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required_nonempty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"); no tokenizer takes it
        raise DataError(f"{where}: field {key!r} holds a lone surrogate (U+{ord(value[e.start]):04X} at character "
                        f"{e.start}): not valid Unicode text") from None
    return value


def to_messages(record: dict, fmt: str, where: str, system_prompt: str | None = None) -> List[dict]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        try:
            fmt = detect_format(record)
        except KeyError:
            raise DataError(f"{where}: unknown record format: expected 'messages' (chat), 'instruction' (alpaca) "
                            f"or 'prompt' (prompt_completion); found keys {sorted(record)}") from None
    for key, what in UNSUPPORTED_FIELDS.items():
        if record.get(key):
            raise DataError(f"{where}: field {key!r} ({what}) is not supported: the conversation would be trained "
                            "without it; remove the field or the record")
    if fmt == "alpaca":
        prompt = _text(record, "instruction", where)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [*_alpaca_history(record, where), {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record, "output", where)}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, "prompt", where)},
                    {"role": "assistant", "content": _text(record, "completion", where)}]
    else:
        messages = _chat_messages(record, where)
    if record.get("system") is not None:
        if messages[0]["role"] == "system":
            raise DataError(f"{where}: both a top-level 'system' field and a system message; keep one")
        messages = [{"role": "system", "content": _text(record, "system", where)}] + messages
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _alpaca_history(record: dict, where: str) -> List[dict]:
    """Alpaca's optional "history" (LLaMA-Factory's layout): earlier [instruction, response] pairs,
    which become the turns before this one."""
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [instruction, response] pairs")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: history[{i}] must be an [instruction, response] pair")
        pair_record = {"instruction": pair[0], "response": pair[1]}
        turns += [{"role": "user", "content": _text(pair_record, "instruction", f"{where}: history[{i}]")},
                  {"role": "assistant", "content": _text(pair_record, "response", f"{where}: history[{i}]")}]
    return turns


def _chat_messages(record: dict, where: str) -> List[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        unknown = sorted(k for k, v in m.items() if k not in MESSAGE_KEYS and v is not None)
        if unknown:
            raise DataError(f"{at}: field {unknown[0]!r} is not supported (only {', '.join(MESSAGE_KEYS)}): the "
                            "message would be trained without it; remove it or the record")
        content = _text(m, "content", at, required_nonempty=(role == "assistant"))
        message = {"role": role, "content": content}
        if m.get("reasoning_content") is not None:
            message["reasoning_content"] = _text(m, "reasoning_content", at, required_nonempty=False)
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    first = next(i for i, m in enumerate(out) if m["role"] != "system")
    if out[first]["role"] == "assistant":
        raise DataError(f"{where}: messages[{first}]: the conversation starts with an assistant turn; it must start "
                        "with a user turn (after any system turn), as chat templates expect")
    return out


def require_final_answer(conversations: List[Conversation], why: str) -> None:
    """Stages that answer a conversation's last prompt (S3FT targets, evaluation) need it to end
    with the assistant's turn, the gold answer; a trailing user or system turn is refused."""
    for c in conversations:
        if c.messages[-1]["role"] != "assistant" or len(c.messages) < 2:
            raise DataError(f"{c.where}: the conversation ends with a {c.messages[-1]['role']} turn; {why} needs "
                            "it to end with the assistant's answer to the last user turn (drop the trailing turns)")


def content_id(messages: List[dict]) -> str:
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def load_conversations(paths: List[str], fmt: str = "auto", system_prompt: str | None = None) -> List[Conversation]:
    """All records of all files as conversations with stable, unique ids.

    An `id` field in the data is used as is (duplicates are an error); otherwise
    the id is a hash of the conversation, with `-2`, `-3`... for repeated content.
    """
    conversations, seen = [], {}
    for path in paths:
        n_before = len(conversations)
        for where, record in read_records(path):
            messages = to_messages(record, fmt, where, system_prompt)
            if isinstance(record, dict) and record.get("id") is not None:
                ex_id = str(record["id"])
                if ex_id in seen:
                    raise DataError(f"{where}: duplicate id {ex_id!r} (first at {seen[ex_id]})")
            else:
                base = ex_id = content_id(messages)
                k = 1
                while ex_id in seen:
                    k += 1
                    ex_id = f"{base}-{k}"
            seen[ex_id] = where
            conversations.append(Conversation(ex_id, messages, where, record))
        if len(conversations) == n_before:
            raise DataError(f"{path}: no records")
    return conversations
