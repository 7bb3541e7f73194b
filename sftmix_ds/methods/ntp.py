"""Plain SFT: next-token cross-entropy on response tokens. The base of the other methods."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batches, collate, example_lengths
from ..data.batching import pack, response_rows, response_tokens
from ..losses import Head, fused_sftmix_loss
from .base import Method, MethodConfig


@dataclass
class NTPConfig(MethodConfig):
    name: str = "ntp"
    _target_: str = "sftmix_ds.methods.ntp.NTP"


def lengths_if_grouped(train_set, train_cfg):
    return example_lengths(train_set) if train_cfg.group_by_length else None


class NTP(Method):
    weights = {"ntp": 1.0}
    config_class = NTPConfig

    def batches(self, train_set, train_cfg, world_size: int, rank: int) -> Batches:
        return Batches(len(train_set), train_cfg.micro_batch_size, train_cfg.grad_accum, world_size, rank,
                       train_cfg.seed, lengths=lengths_if_grouped(train_set, train_cfg))

    def collate(self, examples, pad_id: int, key: tuple = (0, 0)) -> dict:
        width = self.options.pack_width
        return pack(examples, pad_id, width, self.options.pad_multiple) if width else \
            collate(examples, pad_id, self.options.pad_multiple)

    def token_counts(self, batch: dict) -> dict:
        return {"ntp": response_tokens(batch["labels"])}

    def loss_terms(self, hidden: torch.Tensor, head: Head, batch: dict) -> dict:
        rows, targets, _ = response_rows(hidden, batch)
        empty = torch.zeros(0, dtype=torch.long, device=rows.device)
        ntp_sum, _ = fused_sftmix_loss(rows, head.weight, targets, empty, empty, empty.to(rows.dtype),
                                       self.options.chunk_size, self.options.loss_backend, head.bias, head.scale,
                                       head.softcap)
        return {"ntp": ntp_sum}
