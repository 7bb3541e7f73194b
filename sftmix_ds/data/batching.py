"""Deterministic distributed batching and padding.

An optimizer step consumes one global batch of micro_batch_size * grad_accum *
world_size examples from a per-epoch permutation seeded by (seed, epoch). The
plan is a pure function of (epoch, step), so (epoch, step) is all a checkpoint
needs to resume exactly. The last global batch of an epoch may be short: its
empty slots are filled with padding examples that carry no loss, so every
rank runs the same number of forward passes (ZeRO-3 needs that) and every
example is used exactly once per epoch.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from .tokenize import IGNORE, Example


class Batches:
    def __init__(self, n_examples: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True):
        self.n, self.mb, self.accum, self.world, self.rank = n_examples, micro_batch_size, grad_accum, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = math.ceil(n_examples / self.global_batch)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> List[int]:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            else:
                self._order = list(range(self.n))
            self._epoch = epoch
        return self._order

    def global_step_indices(self, epoch: int, step: int) -> List[Optional[int]]:
        """All example indices of one optimizer step, padded with None to the global batch size."""
        chunk = self.order(epoch)[step * self.global_batch:(step + 1) * self.global_batch]
        return chunk + [None] * (self.global_batch - len(chunk))

    def micro_batches(self, epoch: int, step: int) -> List[List[Optional[int]]]:
        """This rank's grad_accum micro-batches for one optimizer step."""
        g = self.global_step_indices(epoch, step)
        return [g[(m * self.world + self.rank) * self.mb:(m * self.world + self.rank + 1) * self.mb]
                for m in range(self.accum)]


def collate(examples: Sequence[Optional[Example]], pad_id: int) -> dict:
    """Right-pad to the longest example; None slots become one-token padding examples without loss."""
    rows = [(e.input_ids, e.labels) if e is not None else ([pad_id], [IGNORE]) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "ids": [e.id if e is not None else None for e in examples]}


def response_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss: a label at position t is predicted from position t-1."""
    return int((labels[:, 1:] != IGNORE).sum())
