"""Read instruction data and turn each record into chat messages.

Sources: .jsonl, .json (a list of records), .parquet, a folder written by
`datasets.Dataset.save_to_disk`, or a dataset by name, `hf:ORG/NAME?split=S&name=SUBSET&revision=R`
(every option optional; split defaults to train), through `datasets.load_dataset` and its cache.
Record formats:
- alpaca: {"instruction", "input"?, "output", "history"?: [[instruction, response], ...]}
- chat: {"messages": [{"role": system|user|assistant, "content": str or [{"type": "text", "text": str}, ...],
  "reasoning_content"?: str}, ...]} (text parts are joined with newlines)
- sharegpt: {"conversations": [{"from": system|human|gpt, "value": str}, ...]}
- prompt_completion: {"prompt", "completion"}
`columns` renames a dataset's columns to these fields first ({"prompt": "question"}).
Any of them may carry a top-level "system" (the conversation's system turn). A field that would
change the conversation but cannot be represented (tool definitions, tool calls, other message
keys) is refused, never dropped. Every problem is reported as a DataError naming the file, the line or record,
and what is wrong.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from ..common import UserError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
HUB_PREFIX = "hf:"
HUB_OPTIONS = ("split", "name", "revision")
# reasoning_content: read by reasoning models' templates; tool_calls (assistant), tool_call_id and name (tool)
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
MAX_LINE_BYTES = 256 << 20  # a record longer than this is refused, not read whole
UNSUPPORTED_FIELDS = {"functions": "function definitions (the older form of 'tools')"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the line or record, and the problem."""


@dataclass
class Conversation:
    id: str
    messages: List[dict]
    where: str  # "file:line" or "file[record N]", for error messages
    record: dict  # the raw record, for stages that need its other fields
    tools: Optional[list] = None  # tool definitions the chat template renders (the record's "tools")


def is_hub(path: str) -> bool:
    return str(path).startswith(HUB_PREFIX)


def parse_hub(spec: str) -> Tuple[str, dict]:
    """`hf:ORG/NAME?split=S&name=SUBSET&revision=R` -> (ORG/NAME, {option: value})."""
    name, _, query = spec[len(HUB_PREFIX):].partition("?")
    options = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in HUB_OPTIONS or not eq or not value:
            raise DataError(f"{spec}: {part!r} is not an option of a dataset by name (expected "
                            f"{', '.join(k + '=...' for k in HUB_OPTIONS)}, joined by &)")
        options[key] = value
    if not name or name.count("/") > 1:
        raise DataError(f"{spec}: expected hf:NAME or hf:ORG/NAME, then optionally ?split=...&name=...&revision=...")
    return name, options


@functools.lru_cache(maxsize=16)
def load_hub_dataset(spec: str):
    """The split a hub spec names, through datasets.load_dataset (its cache, HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE apply), loaded once per process."""
    import datasets

    name, options = parse_hub(spec)
    split = options.get("split", "train")
    try:
        return datasets.load_dataset(name, options.get("name"), split=split, revision=options.get("revision"))
    except Exception as e:  # datasets raises many types: network, missing split, bad config name
        if datasets.config.HF_HUB_OFFLINE:
            hint = (f"this machine is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and the datasets cache "
                    f"({datasets.config.HF_DATASETS_CACHE}) does not hold it: run datasets.load_dataset("
                    f"{name!r}, {options.get('name')!r}, split={split!r}) once where there is network with the same "
                    "HF_DATASETS_CACHE (a shared folder), or give the dataset's files as paths")
        else:
            hint = "check the name, the subset (name=), the split (split=) and the network"
        raise DataError(f"{spec}: cannot load dataset {name!r} ({type(e).__name__}: {e}); {hint}") from None


def read_records(path: str) -> Iterator[Tuple[str, dict]]:
    """Yield (location, record) pairs from one data file, folder or dataset by name."""
    if is_hub(path):
        yield from _dataset_records(load_hub_dataset(path), path)
        return
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
    yield from _dataset_records(ds, path)


def _dataset_records(ds, label: str):
    for i, record in enumerate(ds):
        yield f"{label}[record {i}]", record


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
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


def renamed(record, columns: dict):
    """The record with each column named in `columns` ({field: column}) renamed to its field (a
    dataset's own column names to a format's); columns the record lacks are left to the format's checks."""
    if not columns or not isinstance(record, dict):
        return record
    present = {field: column for field, column in columns.items() if column in record}
    out = {k: v for k, v in record.items() if k not in present.values()}
    out.update({field: record[column] for field, column in present.items()})
    return out


def to_messages(record: dict, fmt: str, where: str, system_prompt: str | None = None) -> List[dict]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        try:
            fmt = detect_format(record)
        except KeyError:
            raise DataError(f"{where}: unknown record format: expected 'messages' (chat), 'conversations' "
                            "(sharegpt), 'instruction' (alpaca) or 'prompt' (prompt_completion); found keys "
                            f"{sorted(record)}") from None
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
    elif fmt == "sharegpt":
        messages = _chat_messages({"messages": _sharegpt_messages(record, where)}, where)
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


def _sharegpt_messages(record: dict, where: str) -> List[dict]:
    """ShareGPT's {"from", "value"} turns as chat messages (a turn's other keys go on to be refused)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}]: expected an object with 'from' and 'value'")
        source = turn.get("from")
        if source not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}]: unknown 'from' {source!r} (expected one of "
                            f"{', '.join(SHAREGPT_ROLES)})")
        rest = {k: v for k, v in turn.items() if k not in ("from", "value")}
        if source == "function_call":  # the value is the call (or a list of calls) as JSON
            calls = _json_field(turn, "value", f"{where}: conversations[{i}]")
            rest["tool_calls"] = calls if isinstance(calls, list) else [calls]
            messages.append({**rest, "role": "assistant", "content": ""})
        else:
            messages.append({**rest, "role": SHAREGPT_ROLES[source], "content": turn.get("value")})
    return messages


def _json_field(record: dict, key: str, where: str):
    """A field that may hold JSON text (ShareGPT's calls, a tools column) as the value it spells."""
    value = record.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field {key!r} is not valid JSON ({e.msg} at column {e.colno})") from None
    return value


def _json_object(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where} must be a JSON object (the call's named arguments), got {type(value).__name__}")
    return value


def _tools(record: dict, where: str) -> Optional[list]:
    if not isinstance(record, dict) or not str(record.get("tools") or "").strip():  # absent, None, [] or ""
        return None
    tools = _json_field(record, "tools", where)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field 'tools' must be a list of tool definitions (objects)")
    return tools


def _tool_calls(m: dict, at: str) -> list:
    """An assistant message's tool calls, as {"type": "function", "function": {"name", "arguments"}}."""
    calls = m["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{at}: field 'tool_calls' must be a non-empty list")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), (dict, str))):
            raise DataError(f"{at}: tool_calls[{k}]: expected {{'function': {{'name': str, 'arguments': object or "
                            "JSON text}}}")
        if isinstance(function["arguments"], str):  # JSON text, as OpenAI writes it: checked, kept as written
            _json_object(function["arguments"], f"{at}: tool_calls[{k}].function.arguments")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": function["arguments"]}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _content(m: dict, at: str, required_nonempty: bool) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts joined by newlines."""
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{at}: content[{k}]: part of type {kind!r} is not supported (only "
                                "{'type': 'text', 'text': ...}: this is a text-only trainer)")
            texts.append(_text(part, "text", f"{at}: content[{k}]", required_nonempty=False))
        m = {"content": "\n".join(texts)}
    return _text(m, "content", at, required_nonempty=required_nonempty)


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
        misplaced = [k for k in ("tool_call_id", "name") if m.get(k) is not None and role != "tool"]
        if misplaced:
            raise DataError(f"{at}: field {misplaced[0]!r} belongs on a tool message, not a {role} one")
        if m.get("tool_calls") is not None and role != "assistant":
            raise DataError(f"{at}: field 'tool_calls' belongs on an assistant message, not a {role} one")
        calls = _tool_calls(m, at) if m.get("tool_calls") is not None else None
        if calls and m.get("content") is None:
            m = {**m, "content": ""}
        content = _content(m, at, required_nonempty=(role == "assistant" and not calls))
        message = {"role": role, "content": content}
        if m.get("reasoning_content") is not None:
            message["reasoning_content"] = _text(m, "reasoning_content", at, required_nonempty=False)
        if calls:
            message["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if role == "tool" and m.get(key) is not None:
                message[key] = _text(m, key, at)
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
        if c.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in c.messages):
            raise DataError(f"{c.where}: a conversation with tools; {why} answers plain prompts only")
        if c.messages[-1]["role"] != "assistant" or len(c.messages) < 2:
            raise DataError(f"{c.where}: the conversation ends with a {c.messages[-1]['role']} turn; {why} needs "
                            "it to end with the assistant's answer to the last user turn (drop the trailing turns)")


def content_id(messages: List[dict]) -> str:
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def load_conversations(paths: List[str], fmt: str = "auto", system_prompt: str | None = None,
                       columns: dict | None = None) -> List[Conversation]:
    """All records of all files as conversations with stable, unique ids.

    An `id` field in the data is used as is (duplicates are an error); otherwise
    the id is a hash of the conversation, with `-2`, `-3`... for repeated content.
    """
    conversations, seen = [], {}
    for path in paths:
        n_before = len(conversations)
        for where, record in read_records(path):
            record = renamed(record, columns)
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
            conversations.append(Conversation(ex_id, messages, where, record, _tools(record, where)))
        if len(conversations) == n_before:
            raise DataError(f"{path}: no records")
    return conversations
