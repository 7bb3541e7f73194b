"""SFTMix (Xiao et al., arXiv 2410.05248): confidence from a reference run's training
dynamics (stage 1), then cross-confidence Mixup on last-layer hidden states (stage 2)."""
from __future__ import annotations

import logging

from ..confidence import read_confidence_file, run_confidence_stage
from .ntp import NTP

log = logging.getLogger(__name__)


class SFTMix(NTP):
    def __init__(self, name: str = "sftmix", chunk_size: int = 1024, **options):
        super().__init__(name, chunk_size)
        self.options = options
        self.split = None  # id -> confident | unconfident

    def before_training(self, cfg, train_set) -> None:
        path = run_confidence_stage(cfg)
        records = read_confidence_file(path, expected_ids=[e.id for e in train_set])
        self.split = {r["id"]: r["split"] for r in records}
