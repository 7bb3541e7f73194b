"""Sequence parallelism (train.sequence_parallel=N): Ulysses attention over groups of N ranks.

The ranks of a group (consecutive ranks: g*N .. g*N+N-1, so a group stays within a node) all
collate the same micro-batch; each keeps one contiguous slice of its columns. Every layer runs
on the slice, except attention: DeepSpeed's UlyssesSPAttentionHF trades the slice's heads for
the whole sequence (an all-to-all), attends with N times fewer heads, and trades back. Labels
are shifted before slicing (the target of a slice's last position is the next slice's first
token), so the loss runs on each rank's own positions and no rank holds a whole sequence's
hidden states or logits. ZeRO shards over all ranks, as DeepSpeed's ALST does: a
sequence-parallel group is N data-parallel ranks to ZeRO, which sees different data on each.

SFTMix mixes the n-th response tokens of a pair, which usually sit on different ranks:
`Shard.partners` brings each pair's second hidden state to the rank holding its first (an
all-to-all within the group, differentiable, so the mixed term's gradient returns to the rank
the state came from).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.distributed as dist

from ..common import IGNORE
from ..config import ConfigError


def check_data_parallel(size: int, world_size: int) -> None:
    """train.sequence_parallel must split the ranks into whole groups."""
    if world_size % size:
        raise ConfigError(f"train.sequence_parallel={size}: must divide the number of ranks ({world_size})")


def check_sequence_parallel(size: int, model_path: str, attn_implementation: str) -> None:
    """Refuse a model Ulysses cannot serve, naming the key, before any process group starts."""
    from transformers import AutoConfig

    if size == 1:
        return
    if attn_implementation not in ("sdpa", "flash_attention_2"):
        raise ConfigError(f"train.sequence_parallel: needs model.attn_implementation sdpa or flash_attention_2 (this "
                          f"model resolves to {attn_implementation}: eager's full mask is discarded by DeepSpeed's "
                          "Ulysses attention, and its flex_attention path masks whole rows causally, which packed "
                          "rows cannot use)")
    text = AutoConfig.from_pretrained(model_path).get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size or (kv_heads % size and size % kv_heads):
        raise ConfigError(f"train.sequence_parallel={size}: each rank attends with a share of the heads, so it must "
                          f"divide the model's {heads} attention heads, and divide or be a multiple of its "
                          f"{kv_heads} key/value heads")


_GROUPS = {}


def sequence_group(size: int, rank: int, world_size: int) -> "SequenceParallel":
    """This process's SequenceParallel for groups of `size` (made once: every rank creates every group)."""
    if size not in _GROUPS:
        _GROUPS[size] = SequenceParallel(size, rank, world_size)
    return _GROUPS[size]


class SequenceParallel:
    """This rank's group and the attention that spans it. Every rank constructs one (it creates
    every group), after the process group exists."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank = size, rank % size
        self.group = None
        for first in range(0, world_size, size):
            group = dist.new_group(list(range(first, first + size)))
            if first == rank - self.rank:
                self.group = group
        self.sharding = False
        self._installed = None

    def install(self, model) -> None:
        """Route the model's attention through Ulysses while self.sharding is set (during sharded
        forwards and their recomputation under gradient checkpointing); otherwise the model's own."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.uninstall()  # a stage's engine that was never released (the last model installed wins)
        name = model.config._attn_implementation
        core = ALL_ATTENTION_FUNCTIONS[name]
        text = model.config.get_text_config()
        heads = text.num_attention_heads
        ulysses = UlyssesSPAttentionHF(
            attn=packed_causal(core, name), batch_size=1, attn_head_count=heads,
            attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
            kv_head_count=getattr(text, "num_key_value_heads", None) or heads,
            num_hidden_layers=text.num_hidden_layers, process_group=self.group, seq_length_is_variable=True)
        ulysses.core_attn_implementation = name

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            if not self.sharding:
                return core(module, query, key, value, attention_mask, *args, **kwargs)
            fit_batch_size(ulysses, query.shape[0])
            # The mask the model built is for one slice; the whole sequence's causal structure comes
            # from the gathered position_ids (packed_causal).
            return ulysses(module, query, key, value, None, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[name] = attention
        self._installed = (name, core)
        self.sharding = True

    def uninstall(self) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._installed is not None:
            name, core = self._installed
            ALL_ATTENTION_FUNCTIONS[name] = core
            self._installed = None
        self.sharding = False

    @contextlib.contextmanager
    def unsharded(self):
        """Forwards of whole sequences on every rank (the head check)."""
        was, self.sharding = self.sharding, False
        try:
            yield
        finally:
            self.sharding = was

    def split(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor],
              position_ids: Optional[torch.Tensor]) -> tuple:
        """(input_ids, position_ids, Shard) of this rank's slice of a right-padded or packed batch
        [B, T]: columns padded to a multiple of N (with token 0 at positions continuing the last, so
        after every real token and never seen by one), labels shifted to targets before slicing."""
        B, T = input_ids.shape
        width = -(-T // self.size) * self.size
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        targets = torch.full((B, width), IGNORE, dtype=torch.long, device=input_ids.device)
        if labels is not None:
            targets[:, :T - 1] = labels[:, 1:]
        if width > T:
            extra = width - T
            input_ids = torch.cat([input_ids, input_ids.new_zeros((B, extra))], 1)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1 + torch.arange(extra,
                                                                                           device=input_ids.device)], 1)
        start, stop = self.rank * width // self.size, (self.rank + 1) * width // self.size
        return input_ids[:, start:stop], position_ids[:, start:stop], Shard(self, targets, start, stop)


def fit_batch_size(ulysses, batch_size: int) -> None:
    """UlyssesSPAttentionHF fixes its batch size when built (DeepSpeed's data-loader adapter deals
    fixed-size batches); here it varies (packed rows, scoring batches), so its expected shapes are
    rebuilt for each forward (the sequence length it updates itself)."""
    if ulysses.batch_size == batch_size:
        return
    ulysses.batch_size = batch_size
    q, kv, ctx = ulysses.required_query_shape, ulysses.required_key_value_shape, ulysses.required_context_shape
    ulysses.required_query_shape = torch.Size([q[0], batch_size, *q[2:]])
    ulysses.required_key_value_shape = torch.Size([kv[0], batch_size, *kv[2:]])
    ulysses.required_context_shape = torch.Size([ctx[0], batch_size, *ctx[2:]])


def packed_causal(core, name: str):
    """The core attention over a whole gathered sequence. Flash-attention kernels find packed
    examples from position_ids themselves; sdpa, given no mask, is causal over the whole row, so
    where position_ids restart (packed rows) it gets a block-diagonal causal mask instead and no
    example attends to another."""
    if name != "sdpa":
        return core

    def attend(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
        if position_ids is not None and bool((position_ids[:, 1:] == 0).any()):
            example = torch.cumsum(position_ids == 0, dim=1)  # [B, T]: which packed example each position is in
            T = example.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
            attention_mask = (example[:, None, :, None] == example[:, None, None, :]) & causal
        return core(module, query, key, value, attention_mask, *args, position_ids=position_ids, **kwargs)

    return attend


class Shard:
    """One micro-batch's slice on this rank: its targets, and where every response row of the
    whole micro-batch lives. Response rows are numbered as the unsharded loss numbers them
    (positions whose next token is a response token, row-major): row m sits on rank owner[m],
    at position local[m] among that rank's rows."""

    def __init__(self, sp: SequenceParallel, targets: torch.Tensor, start: int, stop: int):
        self.sp, self.start, self.stop = sp, start, stop
        self.targets = targets[:, start:stop]
        self._whole_targets = targets

    # Where the whole micro-batch's response rows live: only SFTMix's pairs need it, so on first use.
    @functools.cached_property
    def owner(self) -> torch.Tensor:
        columns = (self._whole_targets != IGNORE).nonzero()[:, 1]  # row-major, as the flattened rows
        return torch.div(columns, self._whole_targets.shape[1] // self.sp.size, rounding_mode="floor")

    @functools.cached_property
    def local(self) -> torch.Tensor:
        local = torch.zeros_like(self.owner)
        for r in range(self.sp.size):
            on_r = self.owner == r
            local[on_r] = torch.arange(int(on_r.sum()), device=local.device)
        return local

    @functools.cached_property
    def all_targets(self) -> torch.Tensor:
        return self._whole_targets[self._whole_targets != IGNORE]

    def partners(self, rows: torch.Tensor, targets: torch.Tensor, pair_a: torch.Tensor, pair_b: torch.Tensor,
                 lam: torch.Tensor) -> tuple:
        """The pairs this rank mixes (those whose first row it holds), with their partners' rows.

        rows/targets: this rank's response rows; pair_a/pair_b/lam: the whole micro-batch's pairs
        (global row numbers). Returns (rows, targets, pair_a, pair_b, lam, ntp_rows): rows extended
        by the partner rows received from other ranks, pairs in those local numbers, and which rows
        carry their own NTP term (not the received ones: their ranks count them)."""
        me, size = self.sp.rank, self.sp.size
        owner_a, owner_b = self.owner[pair_a], self.owner[pair_b]
        send = ((owner_b == me) & (owner_a != me)).nonzero().flatten()
        send = send[torch.argsort(owner_a[send], stable=True)]  # by destination rank, then pair
        receive = ((owner_a == me) & (owner_b != me)).nonzero().flatten()
        receive = receive[torch.argsort(owner_b[receive], stable=True)]  # by source rank, then pair
        moved = int((owner_a != owner_b).sum())
        received = rows.new_zeros((0, rows.shape[1]))
        if moved:  # every rank of the group knows the pairs, so all take this branch or none
            from torch.distributed.nn.functional import all_to_all_single

            out_sizes = torch.bincount(owner_b[receive], minlength=size).tolist()
            in_sizes = torch.bincount(owner_a[send], minlength=size).tolist()
            out = rows.new_empty((len(receive), rows.shape[1]))
            received = all_to_all_single(out, rows[self.local[pair_b[send]]], out_sizes, in_sizes, group=self.sp.group)
        mine = (owner_a == me).nonzero().flatten()
        position = torch.full_like(pair_a, -1)
        position[receive] = rows.shape[0] + torch.arange(len(receive), device=rows.device)
        local_b = torch.where(owner_b[mine] == me, self.local[pair_b[mine]], position[mine])
        ntp_rows = torch.arange(rows.shape[0] + len(receive), device=rows.device) < rows.shape[0]
        return (torch.cat([rows, received]), torch.cat([targets, self.all_targets[pair_b[receive]]]),
                self.local[pair_a[mine]], local_b, lam[mine], ntp_rows)
