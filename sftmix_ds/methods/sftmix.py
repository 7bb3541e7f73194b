"""SFTMix (Xiao et al., arXiv 2410.05248): confidence from a reference run's training
dynamics (stage 1), then cross-confidence Mixup on last-layer hidden states (stage 2).

    loss = L_NTP(all response tokens) + mu * L_mix
    L_mix = mean over mixed tokens of lam CE(W z_mix, y_c) + (1 - lam) CE(W z_mix, y_u),
    z_mix = lam z_c + (1 - lam) z_u on aligned response tokens of a (confident, unconfident) pair,
    lam ~ Beta(alpha, alpha) per pair (or per batch).
Both normalisers are global token counts (all ranks, whole accumulation window).
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from ..common import evenly_spaced
from ..config import ConfigError, model_config_path, one_of, positive, resolve_score_batch_tokens
from ..confidence import CONFIDENT, OnlineSplit, read_confidence_file, run_confidence_stage, stage_root
from ..data import example_ids
from ..data.batching import PairBatches, Phases, aligned_pairs, response_rows
from ..losses import Head, fused_sftmix_loss
from .base import MethodConfig, RunOptions
from .ntp import NTP, lengths_if_grouped

log = logging.getLogger(__name__)
MAX_SCORING_POINTS = 64  # method.checkpoints: each is a pass over the data and N kept perplexities


@dataclass
class SFTMixConfig(MethodConfig):
    name: str = "sftmix"
    _target_: str = "sftmix_ds.methods.sftmix.SFTMix"
    # Stage 1 (confidence): reference (the paper: a one-epoch reference run scored at C checkpoints) |
    # online (this project's variant: this run's own first warmup_epochs epochs train plain NTP and are
    # scored at C points, the later ones train SFTMix pairs) | random (a seeded half/half split: the
    # ablation) | file (confidence_file, from an earlier run).
    confidence_source: str = "reference"
    confidence_file: Optional[str] = None
    checkpoints: int = 4  # C scoring points, evenly spaced over the (reference or warm-up) epochs, the last at the end
    warmup_epochs: int = 1  # online only
    # A model group option (conf/model/NAME.yaml) for the reference run; null: the target model.
    reference_model: Optional[str] = None
    # Scoring passes: examples sorted by length fill each forward up to score_batch_tokens padded tokens
    # (0: 16384 on a GPU, 512 on CPU), score_batch_size examples at most.
    score_batch_size: int = 64
    score_batch_tokens: int = 0
    # Where stage-1 outputs live, one folder per fingerprint; null: OUTPUT_DIR/confidence.
    stage_dir: Optional[str] = None
    # Score these model folders instead of training a reference run.
    score_checkpoints: List[str] = field(default_factory=list)
    # Stage 2 (mixup). Paper defaults; lam_per=batch draws one lam per optimizer step.
    mu: float = 0.2
    alpha: float = 0.5
    lam_per: str = "pair"  # pair | batch


class SFTMix(NTP):
    config_class = SFTMixConfig

    def __init__(self, config: Optional[SFTMixConfig] = None, options: Optional[RunOptions] = None):
        super().__init__(config, options)
        c = self.config
        self.weights = {"ntp": 1.0, "mix": c.mu}
        self.split = None  # id -> confident | unconfident
        self.online = None
        if c.confidence_source == "online":  # the split comes from this run's own warm-up epochs
            self.online = OnlineSplit(stage_root(c.stage_dir, self.options.output_dir), self.options.seed,
                                      self.options.run_digest)

    @staticmethod
    def check_config(cfg) -> None:
        m, t = cfg.method, cfg.train
        positive("method.checkpoints", m.checkpoints)
        if m.checkpoints > MAX_SCORING_POINTS:
            raise ConfigError(f"method.checkpoints={m.checkpoints}: at most {MAX_SCORING_POINTS}. Each scoring point "
                              "costs a pass over the training set, keeps one perplexity per training example (in "
                              "memory and, with the online source, in every checkpoint) and, with the reference "
                              "source, one exported model on disk; the paper scores at a handful (default 4)")
        positive("method.score_batch_size", m.score_batch_size)
        positive("method.score_batch_tokens", m.score_batch_tokens, zero_ok=True)
        positive("method.alpha", m.alpha)
        positive("method.mu", m.mu, zero_ok=True)
        one_of("method.lam_per", m.lam_per, ("pair", "batch"))
        one_of("method.confidence_source", m.confidence_source, ("reference", "online", "random", "file"))
        positive("method.warmup_epochs", m.warmup_epochs)
        if m.confidence_source == "file" and not m.confidence_file:
            raise ConfigError("method.confidence_source=file: set method.confidence_file=PATH")
        if m.confidence_source in ("random", "online") and m.confidence_file:
            raise ConfigError(f"method.confidence_source={m.confidence_source} and method.confidence_file are both "
                              "set; drop one")
        if m.confidence_source == "online":
            if m.reference_model or m.score_checkpoints:
                raise ConfigError("method.confidence_source=online scores this run's own model: drop "
                                  "method.reference_model / method.score_checkpoints, or use "
                                  "confidence_source=reference")
            if t.max_steps <= 0 and t.epochs <= m.warmup_epochs:
                raise ConfigError(f"method.confidence_source=online: train.epochs={t.epochs} leaves no epoch after "
                                  f"the method.warmup_epochs={m.warmup_epochs} NTP epoch(s) for SFTMix pairs; "
                                  "raise train.epochs")
        if t.micro_batch_size % 2:
            raise ConfigError(f"train.micro_batch_size={t.micro_batch_size}: must be even for method=sftmix "
                              "(each micro-batch holds k confident + k unconfident examples)")
        if m.confidence_file and not os.path.isfile(m.confidence_file):
            raise ConfigError(f"method.confidence_file={m.confidence_file!r}: no such file")
        if m.reference_model and not os.path.isfile(model_config_path(m.reference_model)):
            raise ConfigError(f"method.reference_model={m.reference_model!r}: no conf/model/{m.reference_model}.yaml")

    def before_training(self, cfg, train_set, tokenizer):
        if self.online:
            return train_set
        path = run_confidence_stage(cfg)
        records = read_confidence_file(path, expected_ids=example_ids(train_set))
        self.split = {r["id"]: r["split"] for r in records}
        return train_set

    def identity(self) -> dict:
        return {"split": "online" if self.online else sorted(self.split.items())}

    @property
    def _split(self) -> dict:
        return self.online.split if self.online else self.split

    def batches(self, train_set, train_cfg, world_size: int, rank: int):
        if not self.online:
            return self._pair_batches(train_set, train_cfg, world_size, rank)
        half = len(train_set) // 2  # the median split's sizes, known before the split is
        planned = PairBatches(range(half), range(half, len(train_set)), train_cfg.micro_batch_size,
                              train_cfg.grad_accum, world_size, rank, train_cfg.seed).steps_per_epoch
        c = self.config
        phases = Phases(super().batches(train_set, train_cfg, world_size, rank), c.warmup_epochs,
                        lambda: self._pair_batches(train_set, train_cfg, world_size, rank), planned)
        if c.checkpoints > phases.first_steps:
            raise ConfigError(f"method.checkpoints={c.checkpoints}: the {c.warmup_epochs} warm-up epoch(s) "
                              f"have only {phases.first_steps} optimizer steps to score at; use at most "
                              f"{phases.first_steps}, or a smaller train.micro_batch_size")
        score_steps = evenly_spaced(phases.first_steps, c.checkpoints)
        if 0 < train_cfg.max_steps < score_steps[-1]:
            raise ConfigError(f"train.max_steps={train_cfg.max_steps} ends before the online split is made at step "
                              f"{score_steps[-1]} (the end of method.warmup_epochs={c.warmup_epochs})")
        self.online.plan(example_ids(train_set), score_steps)
        return phases

    def _pair_batches(self, train_set, train_cfg, world_size: int, rank: int) -> PairBatches:
        ids = example_ids(train_set)
        confident = [i for i, name in enumerate(ids) if self._split[name] == CONFIDENT]
        unconfident = [i for i, name in enumerate(ids) if self._split[name] != CONFIDENT]
        batches = PairBatches(confident, unconfident, train_cfg.micro_batch_size, train_cfg.grad_accum, world_size,
                              rank, train_cfg.seed, lengths=lengths_if_grouped(train_set, train_cfg))
        if batches.leftovers:
            log.info("sftmix: %d confident / %d unconfident examples: %d without a partner train with NTP only "
                     "each epoch", len(confident), len(unconfident), batches.leftovers)
        return batches

    # -- online confidence: scoring points during the warm-up epochs, the split in the checkpoint --

    def after_step(self, step: int, score) -> dict:
        if not (self.online and self.online.due(step)):
            return {}
        return self.online.add(step, score(self.config.score_batch_size,
                                                resolve_score_batch_tokens(self.config.score_batch_tokens)))

    def state(self) -> dict:
        return self.online.state() if self.online else {}

    def load_state(self, state: dict) -> None:
        if self.online:
            self.online.load_state(state)

    def paired(self, epoch: int) -> bool:
        return not self.online or epoch >= self.config.warmup_epochs

    def draw_lam(self, pairs: list, key: tuple) -> torch.Tensor:
        """lam ~ Beta(alpha, alpha) for each (id_a, id_b) pair, from a generator keyed by the
        seed, the epoch and the pair's ids (or the step, for lam_per=batch): the same
        whatever the micro-batch size, accumulation or rank count, and exact on resume."""
        epoch, step = key
        seed, alpha = self.options.seed, self.config.alpha
        if self.config.lam_per == "batch":
            lam = np.random.default_rng([seed, epoch, step]).beta(alpha, alpha)
            return torch.full((len(pairs),), float(lam))
        return torch.tensor([np.random.default_rng([seed, epoch, zlib.crc32(a.encode()), zlib.crc32(b.encode())])
                             .beta(alpha, alpha) for a, b in pairs], dtype=torch.float32)

    def collate(self, examples, pad_id: int, key: tuple = (0, 0)) -> dict:
        batch = super().collate(examples, pad_id, key)
        if not self.paired(key[0]):  # online warm-up: plain NTP batches
            return batch
        k = len(examples) // 2
        pair_a, pair_b, pair_of_row = aligned_pairs(batch["labels"], k, batch.pop("placements", None))
        ids = [(e.id if e is not None else "") for e in examples]
        lam = self.draw_lam(list(zip(ids[:k], ids[k:])), key)
        present = torch.tensor([examples[j] is not None and examples[k + j] is not None for j in range(k)],
                               dtype=torch.bool)
        in_pair = torch.zeros(len(batch["response_index"]), dtype=torch.bool)
        in_pair[pair_a] = in_pair[pair_b] = True
        batch.update(pair_a=pair_a, pair_b=pair_b, lam=lam[pair_of_row], pair_lam=lam[present],
                     unpaired=(~in_pair).nonzero().flatten())
        return batch

    def token_counts(self, batch: dict) -> dict:
        counts = super().token_counts(batch)
        counts["mix"] = int(batch["pair_a"].numel()) if "pair_a" in batch else 0
        return counts

    def loss_terms(self, hidden: torch.Tensor, head: Head, batch: dict) -> dict:
        # Evaluation and online warm-up batches are plain NTP; with mu = 0 the paired batches train
        # without the Mixup term, which is then not computed.
        if "pair_a" not in batch or self.weights["mix"] == 0:
            return {**super().loss_terms(hidden, head, batch), "mix": hidden.new_zeros((), dtype=torch.float32)}
        rows, targets, _ = response_rows(hidden, batch)
        pair_a, pair_b, lam, ntp_rows = batch["pair_a"], batch["pair_b"], batch["lam"].float(), None
        unpaired = batch.get("unpaired")
        if batch.get("shard") is not None:  # sequence parallelism: each pair mixed where its first row is
            rows, targets, pair_a, pair_b, lam, ntp_rows = batch["shard"].partners(rows, targets, pair_a, pair_b, lam)
            unpaired = None
        ntp_sum, mix_sum = fused_sftmix_loss(rows, head.weight, targets, pair_a, pair_b, lam, self.options.chunk_size,
                                             self.options.loss_backend, head.bias, head.scale, head.softcap, ntp_rows,
                                             unpaired)
        return {"ntp": ntp_sum, "mix": mix_sum}

    def batch_stats(self, batch: dict) -> dict:
        if "pair_lam" not in batch:
            return {"lam_sum": 0.0, "pairs": 0}
        return {"lam_sum": float(batch["pair_lam"].sum()), "pairs": batch["pair_lam"].numel()}

    def step_metrics(self, stats: dict) -> dict:
        return {"pairs": int(stats["pairs"]), "lam_mean": stats["lam_sum"] / max(stats["pairs"], 1)}
