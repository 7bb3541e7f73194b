"""A training set mixed from several sources, each taken for its own number of epochs.

data.weights gives each training source (data.train_files, in order) the epochs it contributes to
one epoch of the mixture: 1 is every example once, 3 every example three times, 0.25 a quarter of
its examples, 1.5 every example once and half of them again. The fraction's subset is drawn once,
seeded by train.seed and the source's position, so a run and its resume see the same mixture. A
repeated example is its own example with its own id (`ID#2`, `ID#3`, ...): it is scored, split and
logged like any other, so SFTMix's confidence split is over the mixture as trained.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from typing import List

import numpy as np

from .formats import DataError
from .store import Example, TokenStore

MAX_EXAMPLES = 100_000_000  # in one epoch of a mixture: its plan holds an index per example


class Mixture(Sequence):
    def __init__(self, sources: List[TokenStore], names: List[str], weights: List[float], seed: int):
        check_mixture(sources, names, weights)
        source, index, copy = [], [], []
        self.counts = []
        for k, (store, weight) in enumerate(zip(sources, weights)):
            whole, fraction = int(weight), weight - int(weight)
            parts = [np.arange(len(store))] * whole
            if fraction:
                rng = np.random.default_rng([seed, k])
                parts.append(np.sort(rng.choice(len(store), round(fraction * len(store)), replace=False)))
            for c, part in enumerate(parts):
                source.append(np.full(len(part), k))
                index.append(part)
                copy.append(np.full(len(part), c))
            self.counts.append({"source": names[k], "examples": len(store), "weight": weight,
                                "taken": int(sum(len(p) for p in parts))})
        self.sources = sources
        self.source, self.index, self.copy = (np.concatenate(a).astype(np.int64) for a in (source, index, copy))
        h = hashlib.sha256(json.dumps([[s.digest for s in sources], list(weights), seed]).encode())
        for array in (self.source, self.index, self.copy):
            h.update(array.tobytes())
        self.digest = h.hexdigest()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        e = self.sources[self.source[i]][int(self.index[i])]
        return Example(_copy_id(e.id, self.copy[i]), e.input_ids, e.labels)

    @cached_property
    def ids(self) -> List[str]:
        return [_copy_id(self.sources[s].ids[j], c) for s, j, c in zip(self.source, self.index, self.copy)]

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.concatenate([s.lengths for s in self.sources])[self._flat_index()]

    def _flat_index(self) -> np.ndarray:
        starts = np.cumsum([0] + [len(s) for s in self.sources])
        return starts[self.source] + self.index


def check_mixture(sources: List[TokenStore], names: List[str], weights: List[float]) -> None:
    """Before anything is allocated: the mixture's size is bounded, and its sources share no id (the same
    file twice would train its examples twice under one id; a heavier weight is the way to repeat)."""
    size = sum(int(w) * len(s) + round((w - int(w)) * len(s)) for s, w in zip(sources, weights))
    if size > MAX_EXAMPLES:
        raise DataError(f"data.weights={list(weights)}: the mixture would hold {size:,} examples an epoch, more "
                        f"than {MAX_EXAMPLES:,}; lower the weights")
    owner = {}
    for k, store in enumerate(sources):
        for example_id in store.ids:
            if owner.setdefault(example_id, k) != k:
                raise DataError(f"data.train_files: {names[owner[example_id]]} and {names[k]} share the example id "
                                f"{example_id!r}: a mixture's sources must not overlap (the same file twice? "
                                "give it a larger weight in data.weights instead)")


def _copy_id(example_id: str, copy: int) -> str:
    return example_id if copy == 0 else f"{example_id}#{copy + 1}"
