"""Deterministic distributed batching and padding.

An optimizer step consumes one global batch of micro_batch_size * grad_accum *
world_size examples from a per-epoch permutation seeded by (seed, epoch). The
plan is a pure function of (epoch, step), so (epoch, step) is all a checkpoint
needs to resume exactly. The last global batch of an epoch may be short: its
empty slots are filled with padding examples that carry no loss, so every
rank runs the same number of forward passes (ZeRO-3 needs that) and every
example is used exactly once per epoch.

With length grouping, each epoch's permutation is cut into megabatches of
GROUP_STEPS steps; a megabatch is sorted by length, cut into steps, and the
steps are shuffled again, so a step's examples have similar lengths (little
padding) while the order of steps stays random.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ..common import IGNORE
from .tokenize import Example


GROUP_STEPS = 16  # steps per megabatch sorted by length


def group_by_length(order: List[int], lengths: Sequence[int], step_size: int, generator: torch.Generator) -> List[int]:
    """`order` rearranged so each run of step_size items has similar lengths; the short last
    step of an epoch (if any) stays last, so every step but the last is full."""
    full = len(order) - len(order) % step_size
    mega = step_size * GROUP_STEPS
    steps = []
    for s in range(0, full, mega):
        block = sorted(order[s:min(s + mega, full)], key=lambda i: -lengths[i])
        steps += [block[k:k + step_size] for k in range(0, len(block), step_size)]
    steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    return [i for step in steps for i in step] + order[full:]


class Batches:
    def __init__(self, n_examples: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True, lengths: Optional[Sequence[int]] = None):
        """lengths: each example's token count, to group steps by length (None: no grouping)."""
        self.n, self.mb, self.accum, self.world, self.rank = n_examples, micro_batch_size, grad_accum, world_size, rank
        self.seed, self.shuffle, self.lengths = seed, shuffle, lengths
        self.step_size = micro_batch_size * grad_accum * world_size  # items dealt per optimizer step
        self.global_batch = self.step_size  # examples per optimizer step
        self.steps_per_epoch = math.ceil(n_examples / self.step_size)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> List[int]:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
                if self.lengths is not None:
                    self._order = group_by_length(self._order, self.lengths, self.step_size, g)
            else:
                self._order = list(range(self.n))
            self._epoch = epoch
        return self._order

    def global_step_indices(self, epoch: int, step: int) -> List[Optional[int]]:
        """All example indices of one optimizer step, padded with None to the global batch size."""
        chunk = self.order(epoch)[step * self.step_size:(step + 1) * self.step_size]
        return chunk + [None] * (self.step_size - len(chunk))

    def step_examples(self, epoch: int, step: int) -> List[int]:
        """Every example index the whole step (all ranks) trains on."""
        return [i for i in self.global_step_indices(epoch, step) if i is not None]

    def micro_batches(self, epoch: int, step: int) -> List[List[Optional[int]]]:
        """This rank's grad_accum micro-batches for one optimizer step."""
        g = self.global_step_indices(epoch, step)
        return [g[(m * self.world + self.rank) * self.mb:(m * self.world + self.rank + 1) * self.mb]
                for m in range(self.accum)]

    # The schedule interface the recipe uses (Phases implements it too): every epoch alike here.
    def steps(self, epochs: int) -> int:
        return epochs * self.steps_per_epoch

    def locate(self, step: int) -> tuple:
        """(epoch, step within it) of the run's step `step` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def plan(self, epoch: int) -> "Batches":
        """The batches of that epoch."""
        return self


class Phases:
    """A run whose first `first_epochs` epochs take batches from `first` and whose later epochs take
    them from what `make_later()` returns, built on first use: it may depend on what the first
    epochs learned (online SFTMix: pairs from the split that NTP epochs gave). `later_steps` is
    its steps per epoch, known in advance so the run's length (and lr schedule) is too."""

    def __init__(self, first: Batches, first_epochs: int, make_later, later_steps: int):
        self.first, self.first_epochs, self.make_later, self.later_steps = first, first_epochs, make_later, later_steps
        self.global_batch = first.global_batch
        self.first_steps = first_epochs * first.steps_per_epoch
        self._later = None

    def steps(self, epochs: int) -> int:
        if epochs <= self.first_epochs:
            return epochs * self.first.steps_per_epoch
        return self.first_steps + (epochs - self.first_epochs) * self.later_steps

    def locate(self, step: int) -> tuple:
        if step < self.first_steps:
            return self.first.locate(step)
        epoch, in_epoch = divmod(step - self.first_steps, self.later_steps)
        return self.first_epochs + epoch, in_epoch

    def plan(self, epoch: int):
        if epoch < self.first_epochs:
            return self.first
        if self._later is None:
            self._later = self.make_later()
            if self._later.steps_per_epoch != self.later_steps:
                raise RuntimeError(f"the later epochs have {self._later.steps_per_epoch} steps each, "
                                   f"{self.later_steps} were planned")
        return self._later


def padded_width(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`: a few padded widths instead of one per batch, so
    kernels planned or compiled per shape (cuDNN attention, torch.compile) meet few shapes."""
    return -(-length // multiple) * multiple


def collate(examples: Sequence[Optional[Example]], pad_id: int, multiple: int = 1) -> dict:
    """Right-pad to the longest example (rounded up to a multiple of `multiple`); None slots become
    one-token padding examples without loss."""
    rows = [(e.input_ids, e.labels) if e is not None else ([pad_id], [IGNORE]) for e in examples]
    width = padded_width(max(len(ids) for ids, _ in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "response_index": response_index(labels), "ids": [e.id if e is not None else None for e in examples]}


def pack(examples: Sequence[Optional[Example]], pad_id: int, width: int, multiple: int = 1) -> dict:
    """Examples packed into as few rows of at most `width` tokens as fit (wider for an example
    longer than that), balanced: longest first, each onto the least-filled row, so the rows end
    near the same length and little of the batch is padding. position_ids restart at 0 for every
    example, which tells the model (attention_mask=None) to attend within each example only; each
    example's first label is ignored so nothing is predicted across a boundary (unpacked, position
    0 is never a target either). The padded tail of a row is a sequence of its own.
    placements[i] = (row, start, length) of examples[i] (None for an empty slot); cu_seq_lens: where
    each of those sequences starts in the rows flattened to one, for a variable-length attention kernel."""
    real = sorted((e for e in examples if e is not None), key=lambda e: -len(e.input_ids))
    if not real:
        empty = collate(examples[:1], pad_id, multiple)
        position_ids = torch.zeros(empty["input_ids"].shape, dtype=torch.long)
        return {**empty, "position_ids": position_ids, "cu_seq_lens": cu_seq_lens(position_ids),
                "placements": [None] * len(examples)}
    width = max(width, len(real[0].input_ids))
    n_rows = math.ceil(sum(len(e.input_ids) for e in real) / width)
    while True:
        rows, fill = [[] for _ in range(n_rows)], [0] * n_rows
        for e in real:
            k = min(range(n_rows), key=fill.__getitem__)
            rows[k].append(e)
            fill[k] += len(e.input_ids)
        if max(fill) <= width:
            break
        n_rows += 1  # balancing overfilled a row: one more (at len(real) rows every example has its own)
    longest = padded_width(max(fill), multiple)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    where = {}
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            where[id(e)] = (r, start, n)
            input_ids[r, start:start + n] = torch.tensor(e.input_ids)
            labels[r, start + 1:start + n] = torch.tensor(e.labels[1:])
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        attention_mask[r, :start] = 1
        position_ids[r, start:] = torch.arange(longest - start)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids,
            "cu_seq_lens": cu_seq_lens(position_ids), "response_index": response_index(labels),
            "ids": [e.id if e is not None else None for e in examples],
            "placements": [where[id(e)] if e is not None else None for e in examples]}


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """[n + 1] int32: where each of the n sequences of packed rows [B, T] (position ids restart at 0
    for each) starts in the rows flattened to one, then the total."""
    flat = position_ids.reshape(-1)
    return torch.cat([(flat == 0).nonzero().reshape(-1), flat.new_tensor([flat.numel()])]).to(torch.int32)


def response_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions (row x width + column), in row-major order, of the hidden states whose next token
    is a response token. Found with the batch on the host, so that selecting them on the device has no
    shape that depends on the data there (a boolean mask would make the host wait for the device)."""
    rows, columns = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + columns


def response_rows(hidden: torch.Tensor, batch: dict) -> tuple:
    """(rows [M, d], targets [M], batch row of each [M]): the hidden states of the positions whose
    next token is a response token, in row-major order, with those tokens. Under sequence
    parallelism (batch["shard"]) these are this rank's positions, their targets shifted before
    the sequence was sliced."""
    shard, index = batch.get("shard"), batch.get("response_index")
    if shard is None and index is not None:
        width = hidden.shape[1]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), batch["labels"].reshape(-1)[index + 1],
                torch.div(index, width, rounding_mode="floor"))
    if shard is None:
        target, hidden = batch["labels"][:, 1:], hidden[:, :-1]
    else:
        target = shard.targets
    mask = target != IGNORE
    return hidden[mask], target[mask], mask.nonzero()[:, 0]


def response_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss: a label at position t is predicted from position t-1."""
    return int((labels[:, 1:] != IGNORE).sum())


class PairBatches(Batches):
    """SFTMix batches: every micro-batch holds k = micro_batch_size / 2 confident examples
    followed by k unconfident ones, pair j = (confident j, unconfident j).

    Each epoch both halves are reshuffled (seeded by seed and epoch) and zipped
    into pairs, so pairs are random, never cross ranks and every example is
    used once per epoch. When the halves differ in size, the extra examples
    become units with no partner: they train with the NTP loss only (their
    count is in `leftovers`). Units are dealt to micro-batches exactly as
    Batches deals examples, so resume needs only (epoch, step) here too.
    With lengths (train.group_by_length), partners are matched by length within
    each megabatch (still at random across megabatches), and units are grouped
    by their longer example, so little of a micro-batch is padding.
    """

    def __init__(self, confident: List[int], unconfident: List[int], micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int, seed: int, lengths: Optional[Sequence[int]] = None):
        if micro_batch_size % 2:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be even to hold confident/unconfident pairs")
        self.confident, self.unconfident = list(confident), list(unconfident)
        n_units = max(len(self.confident), len(self.unconfident))
        super().__init__(n_units, micro_batch_size // 2, grad_accum, world_size, rank, seed)
        self.example_lengths = lengths  # units are grouped by their longer example once paired
        self.leftovers = abs(len(self.confident) - len(self.unconfident))
        self.global_batch = 2 * self.step_size  # two examples per unit
        self._pair_epoch, self._units, self._unit_order = None, None, None

    def _pair_up(self, epoch: int) -> None:
        """This epoch's units (unit index -> (a, b)) and the order in which steps take them."""
        if self._pair_epoch == epoch:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_009)  # not order()'s stream
        conf = [self.confident[i] for i in torch.randperm(len(self.confident), generator=g).tolist()]
        unconf = [self.unconfident[i] for i in torch.randperm(len(self.unconfident), generator=g).tolist()]
        if self.example_lengths is not None:  # partners of similar length: within each megabatch, by length
            mega = self.step_size * GROUP_STEPS
            by_length = lambda ids: [i for s in range(0, len(ids), mega)
                                     for i in sorted(ids[s:s + mega], key=lambda i: -self.example_lengths[i])]
            conf, unconf = by_length(conf), by_length(unconf)
        n = min(len(conf), len(unconf))
        units = list(zip(conf[:n], unconf[:n])) + [(i, None) for i in conf[n:] + unconf[n:]]
        order = super().order(epoch)
        if self.example_lengths is not None:
            longer = [max(self.example_lengths[i] for i in unit if i is not None) for unit in units]
            order = group_by_length(order, longer, self.step_size, g)
        self._units, self._unit_order, self._pair_epoch = units, order, epoch

    def order(self, epoch: int) -> List[int]:
        self._pair_up(epoch)
        return self._unit_order

    def units(self, epoch: int) -> List[tuple]:
        self._pair_up(epoch)
        return self._units

    def step_examples(self, epoch: int, step: int) -> List[int]:
        units = self.units(epoch)
        return [i for u in super().step_examples(epoch, step) for i in units[u] if i is not None]

    def micro_batches(self, epoch: int, step: int) -> List[List[Optional[int]]]:
        units = self.units(epoch)
        out = []
        for unit_slots in super().micro_batches(epoch, step):
            chosen = [units[u] if u is not None else (None, None) for u in unit_slots]
            out.append([a for a, _ in chosen] + [b for _, b in chosen])
        return out


def aligned_pairs(labels: torch.Tensor, n_pairs: int, placements: Optional[Sequence] = None):
    """Row indices of the mixed response tokens of a pair batch whose examples are [a_1..a_k, b_1..b_k].

    Rows are numbered as the loss flattens them: the response positions (those
    whose next token is a response token) in row-major order. placements[i] =
    (row, start, length) says where example i sits (pack() lays out several per
    row; None: absent); by default example i is row i from position 0. For
    pair j the n-th response token of a_j is matched with the n-th of b_j, for
    n < min of the two response lengths. Returns (pair_a, pair_b, pair_of_row),
    the last giving for each mixed row the pair it belongs to.
    """
    is_response = labels[:, 1:] != IGNORE
    flat_index = (torch.cumsum(is_response.flatten(), 0) - 1).view_as(is_response)
    if placements is None:
        placements = [(i, 0, labels.shape[1]) for i in range(labels.shape[0])]

    def rows_of(i):
        if placements[i] is None:
            return torch.zeros(0, dtype=torch.long)
        row, start, length = placements[i]
        span = slice(start, start + length - 1)
        return flat_index[row, span][is_response[row, span]]

    pair_a, pair_b, pair_of_row = [], [], []
    for j in range(n_pairs):
        a, b = rows_of(j), rows_of(n_pairs + j)
        n = min(a.numel(), b.numel())
        pair_a.append(a[:n])
        pair_b.append(b[:n])
        pair_of_row.append(torch.full((n,), j))
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return cat(pair_a), cat(pair_b), cat(pair_of_row)
