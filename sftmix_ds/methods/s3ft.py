"""S3FT (Gupta et al., arXiv 2502.08130): plain SFT on targets the base model already
produces when it is right (own answers, else judged paraphrases of the gold, else gold)."""
from __future__ import annotations

from ..data import load_split
from ..s3ft import build_targets
from .ntp import NTP


class S3FT(NTP):
    def before_training(self, cfg, train_set, tokenizer):
        path = cfg.method.targets_file or build_targets(cfg)
        data = cfg.data.copy()
        data.format = "chat"
        data.system_prompt = None  # the targets keep the messages the build used
        return load_split(data, tokenizer, [path])
