"""Plain SFT: next-token cross-entropy on response tokens. The base of the other methods."""
from __future__ import annotations

import torch

from ..data import Batches, collate
from ..data.batching import pack, response_tokens
from ..data.tokenize import IGNORE
from ..losses import fused_sftmix_loss


def response_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states of the positions whose next token is a response token, with those tokens."""
    target = labels[:, 1:]
    mask = target != IGNORE
    return hidden[:, :-1][mask], target[mask]


def lengths_if_grouped(train_set, train_cfg):
    return [len(e.input_ids) for e in train_set] if train_cfg.group_by_length else None


class NTP:
    """What a method tells the trainer: a stage to run first, how examples are
    batched, which loss terms it sums, over how many tokens each is normalised
    (globally, by the trainer) and with what weight the normalised terms add up."""

    weights = {"ntp": 1.0}

    def __init__(self, name: str = "ntp", chunk_size: int = 0, loss_backend: str = "auto", pack_width: int = 0,
                 **_stage_options):
        """pack_width: pack micro-batches into rows of this many tokens (0: pad each example)."""
        self.name = name
        self.chunk_size, self.loss_backend, self.pack_width = chunk_size, loss_backend, pack_width

    def before_training(self, cfg, train_set, tokenizer):
        """A stage before training; returns the examples to train on."""
        return train_set

    def batches(self, train_set, train_cfg, world_size: int, rank: int) -> Batches:
        return Batches(len(train_set), train_cfg.micro_batch_size, train_cfg.grad_accum, world_size, rank,
                       train_cfg.seed, lengths=lengths_if_grouped(train_set, train_cfg))

    def collate(self, examples, pad_id: int, key: tuple = (0, 0)) -> dict:
        """key = (epoch, step): a stable handle for per-step randomness."""
        return pack(examples, pad_id, self.pack_width) if self.pack_width else collate(examples, pad_id)

    def token_counts(self, batch: dict) -> dict:
        return {"ntp": response_tokens(batch["labels"])}

    def loss_terms(self, hidden: torch.Tensor, weight: torch.Tensor, batch: dict) -> dict:
        rows, targets = response_rows(hidden, batch["labels"])
        empty = torch.zeros(0, dtype=torch.long, device=rows.device)
        ntp_sum, _ = fused_sftmix_loss(rows, weight, targets, empty, empty, empty.to(rows.dtype), self.chunk_size,
                                       self.loss_backend)
        return {"ntp": ntp_sum}

    def step_metrics(self, micro_batches, strategy) -> dict:
        return {}
