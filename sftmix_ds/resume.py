"""Resume policy, with no process group and no engine: which checkpoints to try, what a run's
identity is and how two identities differ, and how a checkpoint's layout (rank count, ZeRO
stage, global batch) maps onto the resuming run's. The recipe applies the decisions; the engine
(engine/checkpoint.py) does the loading."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import NamedTuple, Optional

from omegaconf import OmegaConf

from .config import ConfigError
from .data.tokenize import content_digest
from .engine.checkpoint import complete_checkpoints
from .identity import examples_hash, kept_settings

log = logging.getLogger(__name__)
RUN_FILE = "run.json"  # in OUTPUT_DIR: run_record of the run, written when it starts

def finished(cfg) -> bool:
    """The final export is there (with LoRA and train.export_merged=false: the adapter folder)."""
    if cfg.peft.kind == "lora" and not cfg.train.export_merged:
        return os.path.exists(os.path.join(cfg.output_dir, "adapter", "adapter_config.json"))
    return os.path.exists(os.path.join(cfg.output_dir, "model", "config.json"))


def find_resume(cfg) -> list:
    """The checkpoints to try, newest first (resume=auto: every complete one in output_dir)."""
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    if cfg.resume == "none":
        if complete_checkpoints(ckpt_root) or finished(cfg):
            raise ConfigError(f"resume=none but {cfg.output_dir} already holds checkpoints or a finished model; "
                              "pass resume=auto to continue, or choose another output_dir")
        return []
    if cfg.resume == "auto":
        skipped: list = []
        done = complete_checkpoints(ckpt_root, skipped)
        for why in skipped:
            log.warning("resume: passing over %s", why)
        return done[::-1]
    return [cfg.resume]


def run_identity(settings: dict, examples, method_identity: dict, global_batch: int) -> dict:
    """What a checkpoint must share with the run that resumes it: the training examples (and the
    method's state, e.g. SFTMix's split) by digest, the global batch, and every setting (the
    resolved config as a plain dict) but RESUMABLE_CHANGES."""
    kept = kept_settings(settings)
    kept["global_batch"] = global_batch
    h = examples_hash(examples)
    h.update(json.dumps(method_identity, sort_keys=True).encode())
    return {"data": h.hexdigest()[:16], "settings": kept}


def identity_changes(old: dict, new: dict) -> list:
    changes = []
    if old.get("data") != new["data"]:
        changes.append("the training examples differ (other data, tokenizer, max_length or method state)")
    if old.get("model") and new.get("model") and old["model"] != new["model"]:
        changes.append("the model folder's files differ (other weights: a file's size or modification time changed)")
    before, after = old.get("settings", {}), new["settings"]
    for key in sorted(set(before) | set(after)):
        if key == "global_batch" and key not in before:  # a checkpoint from before it was recorded
            continue
        if before.get(key, "<unset>") != after.get(key, "<unset>"):
            changes.append(f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return changes


def same_run_problem(folder: str, meta: dict, identity: dict, allow_new_global_batch: bool) -> Optional[str]:
    """Why the checkpoint in `folder` (its complete.json `meta`) was written by another run than the
    one with `identity`, or None when it is the same run (or too old to say)."""
    if "identity" not in meta:
        log.warning("%s: written before checkpoints recorded their run's settings; not compared", folder)
        return None
    changes = identity_changes(meta["identity"], identity)
    if allow_new_global_batch:
        changes = [c for c in changes if not c.startswith("global_batch:")]
    if not changes:
        return None
    return "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")


def run_record(cfg) -> dict:
    """What a finished run in OUTPUT_DIR (RUN_FILE) is compared by before it counts as this run: every
    setting but RESUMABLE_CHANGES, the content of the training data files (not their names), and a
    model folder's files (model.source=hf)."""
    return {"settings": kept_settings(OmegaConf.to_container(cfg, resolve=True)),
            "data": content_digest(list(cfg.data.train_files)),
            "model": model_files(cfg.model.path) if cfg.model.source == "hf" else None}


def model_files(path: str) -> str:
    """A model folder by its files' names, sizes and modification times (hashing gigabytes of weights at
    every start would cost minutes): weights replaced under the same path are another model."""
    h = hashlib.sha256()
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def check_finished_run(cfg) -> None:
    """resume=auto on an OUTPUT_DIR whose run is finished has nothing to do, but only if that run is
    this one: another model, method, data or settings is refused, naming what differs (the second
    run would otherwise exit 0 and leave the first run's model as if it were its own)."""
    path = os.path.join(cfg.output_dir, RUN_FILE)
    if not os.path.exists(path):
        log.warning("%s holds a finished run from before runs recorded what they trained; not compared",
                    cfg.output_dir)
        return
    with open(path) as f:
        changes = identity_changes(json.load(f), run_record(cfg))
    if changes:
        what = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ConfigError(f"output_dir={cfg.output_dir} holds a finished run with other data or settings ({what}); "
                          "choose another output_dir")


class Layout(NamedTuple):
    """How to load a checkpoint: through its universal conversion or not, and the grad_accum that
    keeps its global batch."""
    universal: bool
    grad_accum: int


def fit_layout(folder: str, meta: dict, *, world_size: int, zero_stage: int, micro_batch_size: int, grad_accum: int,
               allow_new_global_batch: bool, sequence_parallel: int = 1) -> Layout:
    """The resuming run's layout for the checkpoint in `folder` (its complete.json `meta`). On another
    rank count it loads through a universal checkpoint (another ZeRO stage is refused) and keeps
    the checkpoint's global batch (micro-batch x accumulation x ranks), which defines the examples
    of every step: grad_accum is derived when it was left as it was; otherwise the given settings
    must keep it, or allow_new_global_batch. The batch is dealt to world_size / sequence_parallel
    groups; ZeRO shards over all ranks whatever sequence_parallel is, so changing only that needs no
    universal conversion, only the grad_accum that keeps the global batch."""
    written = (meta["world_size"], meta.get("zero_stage", zero_stage))
    if written[1] != zero_stage:
        # DeepSpeed 0.19's universal loader fails (a bare AssertionError) across stages, both ways.
        raise ConfigError(f"resume: {folder} was written under ZeRO-{written[1]} and deepspeed.zero_stage="
                          f"{zero_stage}; DeepSpeed cannot load a checkpoint under another ZeRO stage, resume with "
                          f"deepspeed.zero_stage={written[1]} (any rank count)")
    universal = written != (world_size, zero_stage)
    data_parallel = world_size // sequence_parallel
    now = micro_batch_size * grad_accum * data_parallel
    unchanged = (meta.get("grad_accum"), meta.get("micro_batch_size")) == (grad_accum, micro_batch_size)
    if not universal and (meta.get("global_batch", now) == now or not unchanged or allow_new_global_batch):
        return Layout(False, grad_accum)  # the same ranks: the identity check judges a new global batch
    if "global_batch" not in meta:
        raise ConfigError(f"resume: {folder} was written by {written[0]} ranks before checkpoints recorded their "
                          f"global batch; resume it on {written[0]} ranks")
    saved = meta["global_batch"]
    log.info("resume: %s was written by %d ranks under ZeRO-%d; resuming on %d ranks under ZeRO-%d", folder, *written,
             world_size, zero_stage)
    groups = f"{data_parallel} ranks" if sequence_parallel == 1 else \
        f"{data_parallel} data-parallel groups (train.sequence_parallel={sequence_parallel})"
    if now == saved:
        return Layout(True, grad_accum)
    per_rank, rest = divmod(saved, micro_batch_size * data_parallel)
    if unchanged and not rest and not allow_new_global_batch:
        log.info("resume: keeping the global batch of %d: train.grad_accum %d -> %d on %d ranks", saved, grad_accum,
                 per_rank, world_size)
        return Layout(universal, per_rank)
    if allow_new_global_batch:
        log.warning("resume: train.allow_new_global_batch=true: global batch %d -> %d; the examples of the steps "
                    "from here differ from the original run's (some of this epoch may repeat or be skipped)",
                    saved, now)
        return Layout(universal, grad_accum)
    ways = [f"train.micro_batch_size={m} train.grad_accum={saved // (m * data_parallel)}"
            for m in range(1, saved + 1) if saved % (m * data_parallel) == 0][:3]
    raise ConfigError(f"resume: the checkpoint's global batch is {saved} examples per step, and "
                      f"train.micro_batch_size={micro_batch_size} x train.grad_accum={grad_accum} x "
                      f"{groups} = {now}; "
                      + (f"keep it with {' or '.join(ways)}" if ways else
                         f"no micro-batch x accumulation gives {saved} on {groups} (use a count dividing {saved})")
                      + ", or continue with a new global batch with train.allow_new_global_batch=true")
