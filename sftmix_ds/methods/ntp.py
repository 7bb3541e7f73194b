"""Plain SFT: next-token cross-entropy on response tokens."""
from __future__ import annotations

import torch

from ..data.batching import response_tokens
from ..data.tokenize import IGNORE
from ..losses import fused_sftmix_loss


def response_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states of the positions whose next token is a response token, with those tokens."""
    target = labels[:, 1:]
    mask = target != IGNORE
    return hidden[:, :-1][mask], target[mask]


class NTP:
    """A method tells the trainer which loss terms it sums, over how many tokens each
    is normalised, and with what weight the normalised terms are added."""

    name = "ntp"
    weights = {"ntp": 1.0}

    def __init__(self, name: str = "ntp", chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def token_counts(self, batch: dict) -> dict:
        return {"ntp": response_tokens(batch["labels"])}

    def loss_terms(self, hidden: torch.Tensor, weight: torch.Tensor, batch: dict) -> dict:
        rows, targets = response_rows(hidden, batch["labels"])
        empty = torch.zeros(0, dtype=torch.long, device=rows.device)
        ntp_sum, _ = fused_sftmix_loss(rows, weight, targets, empty, empty, empty.to(rows.dtype), self.chunk_size)
        return {"ntp": ntp_sum}
