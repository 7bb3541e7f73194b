"""Chat template -> token ids + labels (-100 on every non-assistant token), cached in a token store."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from typing import Iterator, List, Optional, Tuple

from filelock import FileLock
from tqdm import tqdm

from ..common import IGNORE, file_digest
from ..faults import maybe_delay_build
from .formats import Conversation, DataError, is_hub, load_conversations, load_hub_dataset
from .mixture import Mixture
from .store import Chunk, Example, StoreWriter, TokenStore, pack_chunk, store_problem, unpack_chunk

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the encoding below changes


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


RENDER_LIMIT_S = 10.0  # one conversation's rendering; real templates take milliseconds


class _TemplateTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _TemplateTimeout in this thread after `seconds` (a chat template is code from outside: nested
    loops escape jinja's range limit). Only the main thread can take a signal; elsewhere no limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_chat(tokenizer, messages: List[dict], where: str, **kwargs):
    """tokenizer.apply_chat_template under a time limit, its failures a DataError naming `where`."""
    try:
        with _time_limit(RENDER_LIMIT_S):
            return tokenizer.apply_chat_template(messages, **kwargs)
    except _TemplateTimeout:
        raise DataError(f"{where}: the chat template did not finish rendering this conversation in "
                        f"{RENDER_LIMIT_S:g} s (a loop that never ends, or nested loops over huge ranges); fix the "
                        "template (model.chat_template, or the model folder's tokenizer_config.json)") from None
    except Exception as e:  # jinja raises whatever the template author chose
        hint = ""
        if messages and messages[0]["role"] == "system" and "system" in str(e).lower():
            hint = ("; this template takes no system turn (Gemma's, for one): put the system text at the start of "
                    "the first user message, or leave it out (and data.system_prompt unset); either trains correctly")
        raise DataError(f"{where}: the chat template rejects this conversation ({type(e).__name__}: {e})"
                        f"{hint}") from None


def _special_tokens(tokenizer) -> Tuple[str, ...]:
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)


def _closed_prefix(through: str, text: str, special: Tuple[str, ...]) -> Optional[str]:
    """`through` (a conversation rendered up to one turn) less the special tokens and whitespace it
    closes with that the whole rendering `text` does not have there (Phi-3's final <|endoftext|>),
    when what is left begins `text`; None when it differs in anything else."""
    while not text.startswith(through):
        trimmed = through.rstrip()
        if trimmed == through:
            token = next((t for t in special if through.endswith(t)), None)
            if token is None:
                return None
            trimmed = through[: -len(token)]
        through = trimmed
    return through


def _split_end_marker(turn: str, special: Tuple[str, ...]) -> Tuple[str, str]:
    """(answer, end-of-turn marker) of a rendered assistant turn: the marker is the first special token
    after the answer's last text (with any whitespace before it), or "" when the template ends turns
    with plain text only. What follows the marker (ChatML's newline after <|im_end|>, Phi-3's final
    <|endoftext|>) separates turns or closes the conversation; generation stops at the marker."""
    answer = turn
    while True:
        trimmed = answer.rstrip()
        for token in special:
            if trimmed.endswith(token):
                trimmed = trimmed[: -len(token)]
                break
        if trimmed == answer:
            break
        answer = trimmed
    rest = turn[len(answer):]
    after_space = rest.lstrip()
    for token in sorted(special, key=len, reverse=True):
        if after_space.startswith(token):
            return answer, rest[: len(rest) - len(after_space) + len(token)]
    return answer, rest


def assistant_spans(tokenizer, messages: List[dict], where: str,
                    tools: Optional[list] = None) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, for a template
    without {% generation %} markers.

    A turn starts where the prompt rendered with the generation prompt ends, and ends with the
    template's end-of-turn marker (_split_end_marker), which the model must learn to emit. Both
    ends come from rendering prefixes of the conversation, checked against the whole rendering, so
    a template that renders a prefix differently is refused rather than guessed at.
    """
    render = lambda msgs, gen: render_chat(tokenizer, msgs, where, tokenize=False, add_generation_prompt=gen,
                                           tools=tools)
    text = render(messages, False)
    special = _special_tokens(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not text.startswith(prompt) or len(prompt) >= len(through):
            raise DataError(f"{where}: the chat template renders the prompt of assistant message {i} differently from "
                            "the whole conversation (Mistral v0.3's template, for one, adds the system prompt only "
                            "to a conversation's last user turn), so its tokens cannot be located; use a template "
                            "marking assistant turns with {% generation %} (model.chat_template) or drop the "
                            "system prompt")
        turn = _closed_prefix(through, text, special)
        if turn is None:
            raise DataError(f"{where}: the chat template renders assistant message {i} differently once later turns "
                            "follow (Qwen3's template, for one, drops an earlier turn's reasoning), so its tokens "
                            "cannot be located by rendering prefixes; use a template marking assistant turns with "
                            "{% generation %} ... {% endgeneration %} (model.chat_template; for Qwen3 the shipped "
                            "model.chat_template=qwen3), or single-turn data")
        answer, marker = _split_end_marker(turn[len(prompt):], special)
        spans.append((len(prompt), len(prompt) + len(answer) + len(marker)))
    return text, spans


def end_of_turn_token(tokenizer) -> Optional[str]:
    """The special token that ends an assistant turn in the tokenizer's chat template (<|im_end|>,
    <|eot_id|>, <end_of_turn>, ...), from a rendered two-turn probe; None when there is none."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text, [(start, end)] = assistant_spans(tokenizer, probe, "chat template probe")
    except DataError:
        return None
    marker = _split_end_marker(text[start:end], _special_tokens(tokenizer))[1].strip()
    return marker or None


def encode(tokenizer, messages: List[dict], where: str, tools: Optional[list] = None) -> Tuple[List[int], List[int]]:
    """Token ids and labels; labels are the ids on assistant tokens (tool calls included) and -100
    elsewhere (tool results included). A template marking assistant turns with {% generation %}
    decides them in one render (transformers' assistant mask); any other by rendering prefixes
    (assistant_spans). `tools`: the tool definitions the template renders."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: apply_chat_template uses "default"
        template = template.get("default")
    if not template:
        raise DataError(f"{where}: the tokenizer has no chat template; set model.chat_template")
    uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not ("tool_calls" in template and "tools" in template):
        raise DataError(f"{where}: a conversation with tools, which the chat template does not render (it never "
                        "reads tools and tool_calls); use a template that does, e.g. model.chat_template=qwen3")
    if GENERATION_BLOCK.search(template):
        out = render_chat(tokenizer, messages, where, tokenize=True, return_dict=True,
                          return_assistant_tokens_mask=True, tools=tools)
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
    text, spans = assistant_spans(tokenizer, messages, where, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, k = enc["input_ids"], [], 0
    for tok, (start, _) in zip(ids, enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        labels.append(tok if k < len(spans) and start >= spans[k][0] else IGNORE)
    return ids, labels


def _file_digests(path: str) -> List[tuple]:
    """(file, content digest) of a data path's files (a folder: every file in it, sorted); for a
    dataset by name, the fingerprint `datasets` gives the split it loaded."""
    if is_hub(path):
        return [(path, load_hub_dataset(path)._fingerprint)]
    try:
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
        return [(f, file_digest(f)) for f in files]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def content_digest(paths: List[str]) -> str:
    """The data files' contents, in order, whatever their names or folders."""
    h = hashlib.sha256()
    for p in paths:
        for _, digest in _file_digests(p):
            h.update(digest.encode())
    return h.hexdigest()[:16]


def _fingerprint(paths: List[str], tokenizer, **settings) -> str:
    """Keyed on the files' content (not size and mtime, which cp -p and rsync -t keep), the
    tokenizer and the settings."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        for f, digest in _file_digests(p):
            h.update(f"{f}:{digest}".encode())
    h.update(tokenizer_definition(tokenizer).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps({**settings, "version": CACHE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:20]


# Where a tokenizer was loaded from does not change the ids it makes.
LOCATION_KWARGS = ("name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only")


def tokenizer_definition(tokenizer) -> str:
    """Everything that decides the ids a tokenizer makes: its class, the whole definition of a fast
    tokenizer (normalizer, pre-tokenizer, model, added and special tokens, post-processor; a slow
    one: its vocabulary) and its flags (add_bos_token, clean_up_tokenization_spaces, ...). Two
    tokenizers with one vocabulary that split text differently differ here."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    flags = {k: v for k, v in tokenizer.init_kwargs.items() if k not in LOCATION_KWARGS}
    return json.dumps([type(tokenizer).__name__, definition, flags], sort_keys=True, default=str)


@functools.lru_cache(maxsize=8)
def _longest_token_chars(vocab_key: tuple) -> int:
    return max(len(token) for token in vocab_key)


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers: the longest vocabulary entry (a
    byte-level entry spells one character per byte)."""
    return _longest_token_chars(tuple(tokenizer.get_vocab()))


PARALLEL_MIN = 2000  # conversations; fewer are tokenized in this process (starting workers costs seconds)


def tokenize_conversations(conversations: List[Conversation], tokenizer, max_length: int, overlong: str,
                           num_proc: int = 1, progress: bool = False) -> Tuple[List[Example], dict]:
    """Examples (in the conversations' order) and counts of what was truncated or dropped."""
    examples, stats = [], {}
    for chunk, counts in encoded_chunks(conversations, tokenizer, max_length, overlong, num_proc, progress):
        examples += unpack_chunk(chunk)
        stats = _add_counts(stats, counts)
    return examples, stats


def _add_counts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + v for k, v in b.items()}


def encoded_chunks(conversations: List[Conversation], tokenizer, max_length: int, overlong: str,
                   num_proc: int = 1, progress: bool = False) -> Iterator[Tuple[Chunk, dict]]:
    """(packed examples, counts) of consecutive chunks of the conversations, in order; with num_proc > 1
    from worker processes, with the same result."""
    # Several chunks a worker (an even finish), at most 1,000 conversations each (a steady progress bar).
    size = max(64, min(1000, -(-len(conversations) // (max(num_proc, 1) * 8))))
    chunks = [conversations[s:s + size] for s in range(0, len(conversations), size)]
    bar = tqdm(total=len(conversations), desc="tokenize", unit="conv", disable=not progress, dynamic_ncols=True)
    with bar:
        if num_proc <= 1 or len(conversations) < PARALLEL_MIN:
            for chunk in chunks:
                yield _tokenize_chunk(chunk, tokenizer, max_length, overlong)
                bar.update(len(chunk))
            return
        import multiprocessing

        # spawn, not fork: this process may already hold threads (torch, the tokenizer's own pool)
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(min(num_proc, len(chunks)), _init_worker, (tokenizer, max_length, overlong)) as pool:
            for chunk, result in zip(chunks, pool.imap(_worker_chunk, chunks)):
                yield result
                bar.update(len(chunk))


_WORKER: dict = {}


def _init_worker(tokenizer, max_length: int, overlong: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(tokenizer=tokenizer, max_length=max_length, overlong=overlong)


def _worker_chunk(conversations: List[Conversation]) -> Tuple[Chunk, dict]:
    return _tokenize_chunk(conversations, _WORKER["tokenizer"], _WORKER["max_length"], _WORKER["overlong"])


def _tokenize_chunk(conversations: List[Conversation], tokenizer, max_length: int,
                    overlong: str) -> Tuple[Chunk, dict]:
    examples, stats = [], {"truncated": 0, "dropped_overlong": 0, "dropped_no_response": 0}
    budget = max_length * longest_token_chars(tokenizer) + 1024
    for conv in conversations:
        # A field longer than max_length tokens can take is cut before tokenizing (a 20 MB line would
        # cost gigabytes); no token spans more than longest_token_chars characters, so the cut text
        # still yields more than max_length tokens and truncation or dropping decides as before.
        messages = [{**m, "content": m["content"][:budget]} for m in conv.messages]
        ids, labels = encode(tokenizer, messages, conv.where, conv.tools)
        if len(ids) > max_length:
            if overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            stats["truncated"] += 1
        # The label of the first token is never predicted; a response must start after it.
        if all(label == IGNORE for label in labels[1:]):
            stats["dropped_no_response"] += 1
            continue
        examples.append((conv.id, ids, labels))
    return pack_chunk(examples), stats


def load_examples(paths: List[str], tokenizer, *, fmt: str, max_length: int, overlong: str,
                  system_prompt: Optional[str], cache_dir: str, num_proc: int = 1,
                  columns: Optional[dict] = None) -> TokenStore:
    """Read, template and tokenize `paths` into a token store (store.py), reusing the store already
    built from the same files, tokenizer and settings.

    Safe to call from every rank at once before the process group starts: one process builds the
    store under a file lock, the others then map it.
    """
    settings = dict(fmt=fmt, max_length=max_length, overlong=overlong, system_prompt=system_prompt)
    if columns:  # absent from older fingerprints
        settings["columns"] = columns
    key = _fingerprint(paths, tokenizer, **settings)
    os.makedirs(cache_dir, exist_ok=True)
    folder = os.path.join(cache_dir, key)
    with FileLock(folder + ".lock"):
        problem = store_problem(folder)
        if problem is None:
            store = TokenStore(folder)
        else:
            if os.path.exists(folder):  # never served: built again
                log.warning("%s: the token store there is not whole (%s); building it again", folder, problem)
                shutil.rmtree(folder)
            store = _build_store(folder, paths, tokenizer, settings, key, num_proc)
    log.info("%s: %d examples (max_length=%d; %s)", ", ".join(paths), len(store), max_length,
             ", ".join(f"{k} {v}" for k, v in store.stats.items()))
    return store


def _build_store(folder: str, paths: List[str], tokenizer, settings: dict, key: str, num_proc: int) -> TokenStore:
    conversations = load_conversations(paths, settings["fmt"], settings["system_prompt"], settings.get("columns"))
    log.info("tokenizing %d conversations into %s (once; other processes wait for it)", len(conversations), folder)
    writer, stats = StoreWriter(folder, len(tokenizer)), {}
    try:
        for chunk, counts in encoded_chunks(conversations, tokenizer, settings["max_length"], settings["overlong"],
                                            num_proc, progress=True):
            writer.add(chunk)
            stats = _add_counts(stats, counts)
        if not writer.sizes["tokens"]:
            raise DataError(f"{', '.join(paths)}: no example left after tokenization ({stats})")
        if _fingerprint(paths, tokenizer, **settings) != key:  # the store must hold what its key names
            raise DataError(f"{', '.join(paths)}: changed while being read; nothing was cached. Run again once "
                            "the files are complete")
        maybe_delay_build()
    except BaseException:
        writer.discard()
        raise
    return writer.publish(stats)
def load_split(data_cfg, tokenizer, files, held_out: bool = False) -> TokenStore:
    """load_examples with the settings of a DataConfig (held-out files in data.eval_format)."""
    fmt = data_cfg.eval_format if held_out else data_cfg.format
    return load_examples(list(files), tokenizer, fmt=fmt, max_length=data_cfg.max_length,
                         overlong=data_cfg.overlong, system_prompt=data_cfg.system_prompt,
                         columns=dict(data_cfg.columns), cache_dir=data_cfg.cache_dir,
                         num_proc=data_cfg.num_proc or default_num_proc())


def train_split(data_cfg, tokenizer, seed: int):
    """The training examples: the training files' store, or with data.weights their mixture
    (mixture.py), each source in its own store."""
    if not data_cfg.weights:
        return load_split(data_cfg, tokenizer, data_cfg.train_files)
    files = list(data_cfg.train_files)
    mixture = Mixture([load_split(data_cfg, tokenizer, [f]) for f in files], files, list(data_cfg.weights), seed)
    if not len(mixture):
        raise DataError(f"data.weights={list(data_cfg.weights)}: the mixture takes no example; raise the weights")
    log.info("mixture of %d examples: %s", len(mixture), "; ".join(
        f"{c['source']}: {c['taken']} of {c['examples']} (weight {c['weight']:g})" for c in mixture.counts))
    return mixture


def train_conversations(data_cfg) -> List[Conversation]:
    """The training files' conversations, read with the DataConfig's settings."""
    return load_conversations(list(data_cfg.train_files), data_cfg.format, data_cfg.system_prompt,
                              dict(data_cfg.columns))


def default_num_proc() -> int:
    """data.num_proc=0: the node's cores, at most 32 (each worker holds its own tokenizer)."""
    return min(32, os.cpu_count() or 1)
