"""Checkpoints: every rank writes its part, then complete.json with a manifest (size and checksum
of every file) marks the folder usable; loading verifies the manifest, passes over a broken
checkpoint to an older one, and on another rank count goes through DeepSpeed's universal
conversion (made once, kept beside the checkpoint). Collective where it says so."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch

from ..common import UserError, file_digest, out_of_space, write_json_atomic
from ..faults import maybe_die, maybe_disk_full

log = logging.getLogger(__name__)
COMPLETE = "complete.json"
# A checkpoint's conversion to DeepSpeed's universal format (to resume on another rank count)
# lives in this subfolder, complete once UNIVERSAL_DONE is in it.
UNIVERSAL, UNIVERSAL_DONE = "universal", "converted.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says what is intact."""


STEP_FOLDER = re.compile(r"step_(\d+)")


def read_complete(folder: str) -> dict:
    """A checkpoint's complete.json, or CheckpointError saying why it cannot be used."""
    try:
        with open(os.path.join(folder, COMPLETE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {COMPLETE} (an interrupted save)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable {COMPLETE} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{folder}: {COMPLETE} has no step")
    return meta


def complete_checkpoints(ckpt_root: str, skipped: Optional[list] = None) -> list[str]:
    """Folders step_N whose save finished on every rank (a readable complete.json), oldest
    first; the reasons for passing over the others are appended to `skipped`."""
    found = []
    for name in os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []:
        match = STEP_FOLDER.fullmatch(name)
        folder = os.path.join(ckpt_root, name)
        if not match or not os.path.isdir(folder):
            continue  # a stray folder or file (step_4.bak, notes.txt) is not a checkpoint
        try:
            read_complete(folder)
        except CheckpointError as e:
            if skipped is not None:
                skipped.append(str(e))
            continue
        found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


class Checkpointer:
    """Saves and loads one engine's checkpoints (a DeepSpeedStrategy with a prepared engine)."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.comm = strategy.comm

    def save(self, ckpt_root: str, step: int, client_state: dict, keep: int, meta: Optional[dict] = None) -> str:
        """Every rank writes its part; then complete.json, with the manifest (sizes, checksums)
        and `meta`, marks the folder usable. Collective."""
        tag = f"step_{step}"
        folder = os.path.join(ckpt_root, tag)
        if self.comm.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a partial save from an interrupted run
        self.comm.barrier()
        error = None
        try:
            self.strategy.engine.save_checkpoint(ckpt_root, tag=tag, client_state=client_state)
            maybe_disk_full(self.comm.rank, step)
            torch.save(_rng_state(), os.path.join(folder, f"rng_rank{self.comm.rank}.pt"))
        except (OSError, RuntimeError) as e:  # disk full (torch.save: RuntimeError), quota, lost mount: every
            error = out_of_space(folder, e) or e  # rank must learn of it, or the rest hang
        maybe_die("in_save", self.comm.rank, step)
        if self.comm.any_rank(error is not None):
            if self.comm.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            done = complete_checkpoints(ckpt_root)
            raise CheckpointError(f"saving checkpoint {folder} failed ({error or 'on another rank'}); the "
                                  f"partial one was removed, the newest complete one is "
                                  f"{done[-1] if done else 'none'}; free space and run again with resume=auto")
        manifest = self._manifest(folder)
        if self.comm.rank == 0:
            write_json_atomic(os.path.join(folder, COMPLETE),
                              {"step": step, **self.strategy.layout(), "files": manifest, **(meta or {})})
            for old in complete_checkpoints(ckpt_root)[:-keep] if keep else []:
                shutil.rmtree(old, ignore_errors=True)
        self.comm.barrier()
        return folder

    def _manifest(self, folder: str) -> dict:
        """{relative path: [size, checksum]} of every file of a checkpoint; the checksums are
        computed by the ranks in turn (file i by rank i mod world size). Collective."""
        paths = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                       if f != COMPLETE)
        mine = {p: [os.path.getsize(os.path.join(folder, p)), file_digest(os.path.join(folder, p))]
                for p in paths[self.comm.rank::self.comm.world_size]}
        return {p: v for part in self.comm.all_gather_object(mine) for p, v in part.items()}

    def _verify(self, folder: str, meta: dict) -> Optional[str]:
        """None when every file the manifest lists is there with its size and checksum (checked
        by the ranks in turn), else what is wrong. Collective."""
        files = meta.get("files")
        if files is None:
            log.warning("%s: written before checkpoints carried checksums; loading it unverified", folder)
            return None
        problems = []
        for rel, (size, digest) in sorted(files.items())[self.comm.rank::self.comm.world_size]:
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                problems.append(f"{rel} is missing")
            elif os.path.getsize(path) != size:
                problems.append(f"{rel} has {os.path.getsize(path)} bytes, {size} were written")
            elif file_digest(path) != digest:
                problems.append(f"{rel} does not match its checksum (bit rot or an overwrite)")
        problems = [p for part in self.comm.all_gather_object(problems) for p in part]
        return "; ".join(problems[:5]) if problems else None

    def load(self, candidates: list, check_meta=None) -> tuple:
        """Load the newest usable checkpoint of `candidates` (newest first): one whose files all
        match its manifest and that DeepSpeed can read; the others are passed over, saying why.
        check_meta(folder, meta) may refuse one (raising), e.g. for other run settings. With the
        strategy's use_universal_checkpoints() each is loaded from its universal conversion (made once).
        Returns (folder, client state). Collective."""
        reasons = []
        universal = self.strategy.ds_config.get("checkpoint", {}).get("load_universal", False)
        for folder in candidates:
            meta = read_complete(folder)
            written = {"world_size": meta["world_size"],
                       "zero_stage": meta.get("zero_stage", self.strategy.zero_stage)}
            if written != self.strategy.layout() and not universal:
                raise CheckpointError(f"{folder}: written with {written}, resuming with {self.strategy.layout()} "
                                      "without a universal checkpoint")
            if check_meta is not None:
                check_meta(folder, meta)
            problem = self._verify(folder, meta)
            if problem is None:
                engine = self.strategy.engine
                try:
                    if universal:
                        _, client_state = engine.load_checkpoint(folder, tag=self._universal(folder),
                                                                 load_optimizer_states=True,
                                                                 load_lr_scheduler_states=True)
                        _unshare_adam_steps(engine.optimizer)
                    else:
                        root, tag = os.path.split(os.path.normpath(folder))
                        _, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                                 load_lr_scheduler_states=True)
                        _set_rng_state(torch.load(os.path.join(folder, f"rng_rank{self.comm.rank}.pt"),
                                                  weights_only=False))
                except CheckpointError:
                    raise
                except Exception as e:  # a shard that passed no manifest (an old checkpoint), or a bug
                    problem = f"DeepSpeed could not load it ({type(e).__name__}: {e})"
                if self.comm.any_rank(problem is not None):
                    problem = problem or "another rank could not load it"
                else:
                    return folder, client_state
            log.warning("resume: passing over %s: %s", folder, problem)
            reasons.append(f"{os.path.basename(folder)}: {problem}")
        raise CheckpointError(f"no usable checkpoint among {len(candidates)}: " + " | ".join(reasons) +
                              "; remove the broken folders to start over, or restore them")

    def _universal(self, folder: str) -> str:
        """The tag (subfolder) of `folder`'s universal conversion, made by rank 0 the first time
        (into a temporary folder renamed when done, so a conversion cut short is never used)
        and reused after while its files match the manifest in its converted.json; one that does
        not (bit rot, a truncated shard) is made again. Collective."""
        out = os.path.join(folder, UNIVERSAL)
        done = os.path.join(out, UNIVERSAL_DONE)
        if self.comm.any_rank(self.comm.rank == 0 and os.path.isfile(done)):
            with open(done) as f:
                problem = self._verify(out, json.load(f))
            if problem is not None:
                log.warning("resume: the universal conversion %s is damaged (%s); converting again", out, problem)
                if self.comm.rank == 0:
                    os.remove(done)
            self.comm.barrier()
        error = None
        if self.comm.rank == 0 and not os.path.isfile(done):
            tmp = f"{out}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("resume: converting %s to a universal checkpoint (once; kept in %s)", folder, out)
            started = time.perf_counter()
            try:
                _ds_to_universal(folder, tmp)
                maybe_die("in_convert", self.comm.rank, read_complete(folder)["step"])
                files = {os.path.relpath(os.path.join(d, f), tmp): [os.path.getsize(os.path.join(d, f)),
                                                                     file_digest(os.path.join(d, f))]
                         for d, _, fs in os.walk(tmp) for f in fs}
                size = sum(size for size, _ in files.values())
                write_json_atomic(os.path.join(tmp, UNIVERSAL_DONE), {
                    "seconds": round(time.perf_counter() - started, 1), "bytes": size, "files": files})
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
                log.info("resume: universal checkpoint %s: %.1f s, %.1f MB", out, time.perf_counter() - started,
                         size / 1e6)
            except Exception as e:  # every rank must learn of it, or the others wait at the barrier
                error = e
        if self.comm.any_rank(error is not None):
            detail = f"{type(error).__name__}: {error}" if error else "on rank 0; its log says why"
            raise CheckpointError(f"{folder}: converting it to a universal checkpoint failed ({detail}); resume "
                                  f"on the {read_complete(folder)['world_size']} ranks it was written by")
        return UNIVERSAL


def _unshare_adam_steps(optimizer) -> None:
    """DeepSpeed's universal loader gives every parameter group's Adam state one shared `step`
    tensor, which torch's Adam then increments once per group per step: the bias correction of
    all groups but the first runs ahead (seen as a loss drift right after resume). One tensor each."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _ds_to_universal(folder: str, out: str) -> None:
    """DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py) on one checkpoint
    folder, in a fresh process: its worker pool must not fork this one (threads, process group)."""
    import subprocess
    import sys

    workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
                           "--output_folder", out, "--num_extract_workers", workers, "--num_merge_workers", workers,
                           # ZeRO-1/2: the converter wants Megatron's layout info, empty without TP/PP
                           "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"deepspeed.checkpoint.ds_to_universal exited with {proc.returncode}: "
                           f"{proc.stderr.strip()[-1500:]}")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
