"""Tokenized examples as flat arrays in a folder, written once and memory-mapped read-only by every
process that reads them, so a dataset costs each rank a few bytes an example, not ~60 a token.

A store folder holds raw little-endian arrays and a meta.json naming their dtypes and sizes:

    tokens.bin    every example's token ids, one after another: uint16 when the vocabulary fits, else int32
    spans.bin     int32 pairs [start, end): the trained (label = id) runs of each example, from its first token
    id_bytes.bin  the examples' ids, UTF-8, one after another
    index.bin     int64 rows (tokens end, spans end, id bytes end), one per example after a row of zeros

Raw arrays rather than Arrow: the readers need three slices per example and nothing else, numpy maps
them without a dependency, and 2 bytes a token (uint16, as Megatron's indexed datasets choose) is what
makes a few hundred million tokens fit in the page cache that all ranks of a node share.
A store is built in a temporary folder beside its final name and published by renaming the folder:
two builders racing on a shared filesystem (where file locks may not hold) leave one store.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, List, Optional, Tuple

import numpy as np

from ..common import IGNORE, file_digest, out_of_space, process_alive

STORE_VERSION = 2  # 2: meta.json records its key, the vocabulary and every file's digest
FILES = {"tokens": None, "spans": "<i4", "id_bytes": "u1", "index": "<i8"}  # tokens: meta["token_dtype"]


@dataclass
class Example:
    id: str
    input_ids: List[int]
    labels: List[int]

    @property
    def n_response(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def label_spans(labels) -> np.ndarray:
    """[start, end) runs of trained positions (label != -100), shape [runs, 2]."""
    trained = np.concatenate([[False], np.asarray(labels) != IGNORE, [False]])
    edges = np.flatnonzero(trained[1:] != trained[:-1])
    return edges.reshape(-1, 2).astype(np.int32)


def labels_from_spans(ids: np.ndarray, spans: np.ndarray) -> np.ndarray:
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels


def _feed(h, example_id: str, ids: np.ndarray, spans: np.ndarray) -> None:
    """One example into a digest; lengths first, so no two sequences of examples feed the same bytes."""
    raw = example_id.encode()
    h.update(struct.pack("<qqq", len(raw), len(ids), len(spans)))
    h.update(raw)
    h.update(np.asarray(ids, dtype="<i8").tobytes())
    h.update(np.asarray(spans, dtype="<i8").tobytes())


def examples_digest(examples) -> str:
    """sha256 of the examples' ids, token ids and labels, in order: a store's recorded digest (a
    mixture's: its sources' and its draw), or computed the same way for a list of Examples."""
    if hasattr(examples, "digest"):
        return examples.digest
    h = hashlib.sha256()
    for e in examples:
        _feed(h, e.id, np.asarray(e.input_ids), label_spans(e.labels))
    return h.hexdigest()


def example_ids(examples) -> List[str]:
    """Every example's id, without reading a store's tokens."""
    return examples.ids if hasattr(examples, "ids") else [e.id for e in examples]


def example_lengths(examples) -> List[int]:
    """Every example's token count, without reading a store's tokens."""
    return examples.lengths.tolist() if hasattr(examples, "lengths") else [len(e.input_ids) for e in examples]


def token_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<i4"


class TokenStore(Sequence):
    """A published store folder, read-only: store[i] is an Example; ids, lengths and digest come from
    the index and meta.json alone."""

    def __init__(self, folder: str):
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.digest, self.stats = self.meta["digest"], self.meta["stats"]
        self.arrays = {name: _map(os.path.join(folder, f"{name}.bin"), dtype or self.meta["token_dtype"],
                                  self.meta["sizes"][name]) for name, dtype in FILES.items()}
        self.index = self.arrays["index"].reshape(-1, 3)
        self.spans = self.arrays["spans"].reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.index) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        (t0, s0, _), (t1, s1, _) = self.index[i], self.index[i + 1]
        ids = self.arrays["tokens"][t0:t1].astype(np.int64)
        return Example(self._id(i), ids.tolist(), labels_from_spans(ids, self.spans[s0:s1]).tolist())

    def _id(self, i: int) -> str:
        return bytes(self.arrays["id_bytes"][self.index[i, 2]:self.index[i + 1, 2]]).decode()

    @cached_property
    def ids(self) -> List[str]:
        text, ends = bytes(self.arrays["id_bytes"]), self.index[:, 2].tolist()
        return [text[a:b].decode() for a, b in zip(ends, ends[1:])]

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.index[:, 0])


def _map(path: str, dtype: str, size: int) -> np.ndarray:
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(size,))


def open_store(folder: str) -> Optional[TokenStore]:
    """The store at `folder`, or None when there is none or it is not whole (store_problem)."""
    return None if store_problem(folder) else TokenStore(folder)


def store_problem(folder: str) -> Optional[str]:
    """Why the store at `folder` must not be served (None: it is whole): missing, another version, built
    under another key (a copied cache), a file whose size or content is not what meta.json recorded
    (damaged in place since), or arrays that are not one consistent store."""
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        return "no store"
    try:
        store = TokenStore(folder)
        meta = store.meta
        if meta["version"] != STORE_VERSION:
            return f"a store of version {meta['version']} (this is {STORE_VERSION})"
        if meta["key"] != os.path.basename(folder):
            return f"built for the key {meta['key']} (another data file, tokenizer, template or setting)"
        for name, dtype in FILES.items():
            path = os.path.join(folder, f"{name}.bin")
            expected = meta["sizes"][name] * np.dtype(dtype or meta["token_dtype"]).itemsize
            if os.path.getsize(path) != expected:
                return f"{name}.bin holds {os.path.getsize(path)} bytes, {expected} were written"
            if file_digest(path) != meta["files"][name]:
                return f"{name}.bin does not match its recorded digest (changed since it was built)"
        return _structure_problem(store)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"


def _structure_problem(store: TokenStore) -> Optional[str]:
    """Offsets that start at 0, never decrease and end at the arrays' sizes; label runs inside their
    example; token ids below the vocabulary."""
    index, sizes = store.index, store.meta["sizes"]
    if len(index) == 0 or index[0].any() or (np.diff(index, axis=0) < 0).any():
        return "its index does not run from 0 upwards"
    if index[-1].tolist() != [sizes["tokens"], sizes["spans"] // 2, sizes["id_bytes"]]:
        return "its index does not end at the arrays' sizes"
    runs = store.spans
    owner = np.repeat(np.arange(len(store)), np.diff(index[:, 1]))
    if len(runs) and ((runs[:, 0] < 0) | (runs[:, 0] >= runs[:, 1]) | (runs[:, 1] > store.lengths[owner])).any():
        return "a label run lies outside its example"
    tokens = store.arrays["tokens"]
    if tokens.size and int(tokens.max()) >= store.meta["vocab_size"]:
        return f"a token id is at or past the vocabulary's {store.meta['vocab_size']}"
    return None


Chunk = Tuple[List[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def pack_chunk(examples: Iterable[Tuple[str, List[int], List[int]]]) -> Chunk:
    """(ids, tokens, lengths, spans, span counts) of (id, input_ids, labels) triples: what a tokenizing
    worker sends back, a few bytes a token rather than a pickled list of ints."""
    names, tokens, lengths, spans, counts = [], [], [], [], []
    for name, ids, labels in examples:
        names.append(name)
        tokens.append(np.asarray(ids, dtype=np.int64))
        lengths.append(len(ids))
        spans.append(label_spans(labels))
        counts.append(len(spans[-1]))
    cat = lambda arrays, dtype, shape: np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)
    return (names, cat(tokens, np.int64, 0), np.asarray(lengths, np.int64), cat(spans, np.int32, (0, 2)),
            np.asarray(counts, np.int64))


def chunk_examples(chunk: Chunk):
    """(id, token ids, label runs) of each example of a packed chunk, in order."""
    names, tokens, lengths, spans, counts = chunk
    token_ends, span_ends = np.cumsum(lengths), np.cumsum(counts)
    for k, name in enumerate(names):
        yield (name, tokens[token_ends[k] - lengths[k]:token_ends[k]],
               spans[span_ends[k] - counts[k]:span_ends[k]])


def unpack_chunk(chunk: Chunk) -> List[Example]:
    return [Example(name, ids.tolist(), labels_from_spans(ids, spans).tolist())
            for name, ids, spans in chunk_examples(chunk)]


class StoreWriter:
    """Appends chunks to a temporary folder beside `folder`; publish() renames it into place."""

    def __init__(self, folder: str, vocab_size: int):
        self.folder, self.token_dtype, self.vocab_size = folder, token_dtype(vocab_size), vocab_size
        self.limit = np.iinfo(self.token_dtype).max
        host = os.uname().nodename
        prefix = f"{folder}.tmp-{host}-"
        for stale in glob.glob(glob.escape(prefix) + "*"):  # left by a killed builder on this host
            if not process_alive(stale[len(prefix):]):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = f"{prefix}{os.getpid()}"
        os.makedirs(self.tmp)
        self.files = {name: open(os.path.join(self.tmp, f"{name}.bin"), "wb") for name in FILES}
        self.sizes = dict.fromkeys(FILES, 0)
        self.ends = np.zeros(3, dtype=np.int64)  # tokens, spans, id bytes written so far
        self.digest = hashlib.sha256()
        self.file_digests = {name: hashlib.blake2b(digest_size=16) for name in FILES}  # as common.file_digest
        self._write("index", self.ends)

    def _write(self, name: str, array: np.ndarray) -> None:
        dtype = FILES[name] or self.token_dtype
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        self.file_digests[name].update(data)
        try:
            self.files[name].write(data)
        except OSError as e:
            raise out_of_space(self.folder, e) or e from None
        self.sizes[name] += array.size

    def add(self, chunk: Chunk) -> None:
        names, tokens, lengths, spans, counts = chunk
        if tokens.size and (tokens.max() >= min(self.vocab_size, self.limit + 1) or tokens.min() < 0):
            raise ValueError(f"token ids outside {self.token_dtype}: the tokenizer's size is wrong")
        raw = [n.encode() for n in names]
        self._write("tokens", tokens)
        self._write("spans", spans.reshape(-1))
        self._write("id_bytes", np.frombuffer(b"".join(raw), dtype=np.uint8))
        rows = self.ends + np.cumsum(np.stack([lengths, counts, [len(r) for r in raw]], axis=1), axis=0)
        self._write("index", rows.reshape(-1))
        if len(rows):
            self.ends = rows[-1]
        for name, ids, runs in chunk_examples(chunk):
            _feed(self.digest, name, ids, runs)

    def publish(self, stats: dict) -> TokenStore:
        """Closes the files, writes meta.json and renames the folder into place; when another builder
        published first, its store is kept (same key, same content) and this one removed."""
        meta = {"version": STORE_VERSION, "key": os.path.basename(self.folder), "vocab_size": self.vocab_size,
                "token_dtype": self.token_dtype, "sizes": self.sizes, "digest": self.digest.hexdigest(),
                "files": {name: h.hexdigest() for name, h in self.file_digests.items()}, "stats": stats}
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            with open(os.path.join(self.tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            os.rename(self.tmp, self.folder)
        except OSError as e:
            self.discard()
            if open_store(self.folder) is None:
                raise out_of_space(self.folder, e) or e from None
        return TokenStore(self.folder)

    def discard(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # the buffered rest cannot be written either (a full disk): it is dropped
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
