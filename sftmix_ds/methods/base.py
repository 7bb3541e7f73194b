"""The contract between the training recipe and a method.

A method is one module in this package plus one `conf/method/NAME.yaml`: the
module defines a config schema (a MethodConfig subclass, where its defaults live;
Hydra checks the yaml against it, registered as NAME_schema) and a Method subclass
that the yaml's `_target_` names, built from that config object and the run's
options (build_method). The recipe (sftmix_ds/trainer.py) relies on nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from omegaconf import MISSING

from ..data import Batches
from ..losses import Head


@dataclass
class MethodConfig:
    name: str = MISSING
    _target_: str = MISSING


@dataclass
class RunOptions:
    """What a method takes from the rest of the run's config."""
    chunk_size: int = 0  # the fused loss's rows per chunk (train.loss_chunk_size; 0: automatic)
    loss_backend: str = "auto"  # train.loss_backend
    pack_width: int = 0  # pack rows of this many tokens (data.max_length with train.packing; 0: pad)
    pad_multiple: int = 1  # pad widths up to a multiple of this (train.pad_to_multiple_of, resolved)
    seed: int = 0  # train.seed
    output_dir: str = "."  # where the run's outputs go
    # A digest of every setting of the run but those a resumed run may change (identity.py): it keys what
    # the run publishes where other runs publish too (a sweep's shared method.stage_dir).
    run_digest: str = ""

    @classmethod
    def of(cls, cfg) -> "RunOptions":
        import hashlib
        import json

        from omegaconf import OmegaConf

        from ..config import resolve_pad_multiple
        from ..identity import kept_settings

        t = cfg.train
        kept = kept_settings(OmegaConf.to_container(cfg, resolve=True))
        return cls(chunk_size=t.loss_chunk_size, loss_backend=t.loss_backend,
                   pack_width=cfg.data.max_length if t.packing else 0,
                   pad_multiple=resolve_pad_multiple(t.pad_to_multiple_of), seed=t.seed, output_dir=cfg.output_dir,
                   run_digest=hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest())


def build_method(cfg) -> "Method":
    """The run's method, from its typed config (cfg.method) and the run's options."""
    from ..config import method_class

    return method_class(cfg.method)(cfg.method, RunOptions.of(cfg))


class Method:
    """What the recipe asks of a method, in the order it asks:

    check_config(cfg)    checks beyond types, before any process group starts
    before_training(...) a stage to run first (SFTMix: confidence; S3FT: targets)
    batches(...)         which examples form each micro-batch of each step
    collate(...)         a micro-batch as tensors (plus what the loss needs)
    token_counts(batch)  per loss term, the tokens it is normalised by (summed over ranks and the window)
    batch_stats(batch)   other additive per-batch figures, summed over ranks with the counts
    loss_terms(...)      per loss term, its sum over the batch (runs inside the engine's forward)
    weights              per loss term, its weight once normalised: loss = sum w_n term_n / count_n
    step_metrics(stats)  metrics of a step from the summed batch_stats
    after_step(step, score)  work between steps (SFTMix online: score the training set); metrics to log
    state(), load_state  what the method learns during the run, saved in and restored from checkpoints
    identity()           what else a checkpoint must share with the run resuming it (JSON-able)
    """

    weights: Dict[str, float] = {}
    config_class = MethodConfig

    def __init__(self, config: Optional[MethodConfig] = None, options: Optional[RunOptions] = None):
        """config: this method's config (its MethodConfig subclass; default: its defaults)."""
        self.config = config if config is not None else self.config_class()
        self.options = options or RunOptions()
        self.name = self.config.name

    @staticmethod
    def check_config(cfg) -> None:
        """Raise ConfigError naming the key for a setting this method cannot run with."""

    def before_training(self, cfg, train_set, tokenizer):
        """Returns the examples to train on."""
        return train_set

    def batches(self, train_set, train_cfg, world_size: int, rank: int) -> Batches:
        raise NotImplementedError

    def collate(self, examples, pad_id: int, key: tuple = (0, 0)) -> dict:
        """key = (epoch, step): a stable handle for per-step randomness."""
        raise NotImplementedError

    def token_counts(self, batch: dict) -> Dict[str, int]:
        raise NotImplementedError

    def batch_stats(self, batch: dict) -> Dict[str, float]:
        return {}

    def loss_terms(self, hidden: torch.Tensor, head: Head, batch: dict) -> Dict[str, torch.Tensor]:
        """head: the model's LM head (weight, bias, scale, soft cap; sftmix_ds.losses.Head)."""
        raise NotImplementedError

    def step_metrics(self, stats: Dict[str, float]) -> dict:
        return {}

    def after_step(self, step: int, score) -> dict:
        """Called on every rank after optimizer step `step` (1-based), before its checkpoint.
        score(batch_size) -> {id: response perplexity} of every training example under the
        current weights (inference only; collective). Returns metrics for that step's record."""
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """state: what state() returned when the checkpoint being resumed was saved."""

    def identity(self) -> dict:
        return {}
