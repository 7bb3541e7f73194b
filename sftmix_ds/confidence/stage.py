"""SFTMix stage 1: reference run -> C checkpoints -> scoring passes -> median split.

Outputs live in STAGE_DIR/<fingerprint>/ (STAGE_DIR defaults to
OUTPUT_DIR/confidence): reference/ (the run, with model_step_N exports),
scores_<checkpoint>_<path digest>.json per checkpoint, confidence.jsonl, confidence.png and
summary.json. The fingerprint covers the tokenized data, the reference model,
C, the training settings and the rank count, so a re-run with the same inputs
finds every finished piece and redoes nothing.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Optional

from omegaconf import OmegaConf, open_dict

from ..config import ConfigError, load_model_config, resolve_precision, resolve_score_batch_tokens
from ..data import example_ids, train_split
from ..engine import Collectives, after_rank0_wrote, dist_env
from ..faults import maybe_delay
from ..models import load_tokenizer, prepare_model
from ..common import process_alive, write_json_atomic
from ..identity import examples_hash, kept_settings
from ..inference import perplexities, score_model
from ..tracking import log_stage_summary
from .split import confidence_records, plot_confidence, random_split_records, summarize, write_confidence_file

log = logging.getLogger(__name__)
CONFIDENCE_FILE = "confidence.jsonl"


def reference_model_config(cfg):
    m = cfg.method
    return load_model_config(m.reference_model) if m.reference_model else cfg.model


def fingerprint(cfg, ref_model_cfg, examples, world_size: int) -> str:
    """Stage 1's identity: the examples, the reference model, the scoring points, and every training
    setting that changes the reference run's math: not those a resumed run may change (identity.py, one
    list for both), nor the run's length (the reference run is one epoch), and the global batch in place
    of the layout, so the same run on other nodes (an sbatch resubmission) reuses it."""
    t = cfg.train
    train = kept_settings(OmegaConf.to_container(t, resolve=True), "train.")
    for own in ("train.epochs", "train.max_steps"):
        train.pop(own, None)
    settings = {"model": kept_settings(OmegaConf.to_container(ref_model_cfg, resolve=True), "model."),
                "checkpoints": cfg.method.checkpoints, "score_checkpoints": list(cfg.method.score_checkpoints),
                "train": train, "global_batch": t.micro_batch_size * t.grad_accum * (world_size // t.sequence_parallel),
                "precision": resolve_precision(t.precision)}
    h = examples_hash(examples)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def reference_run_config(cfg, ref_model_cfg, out_dir: str):
    """Plain SFT of the reference model for one epoch, exporting C evenly spaced checkpoints."""
    ref = copy.deepcopy(cfg)
    with open_dict(ref):
        ref.method = OmegaConf.create({"name": "ntp", "_target_": "sftmix_ds.methods.ntp.NTP"})
        ref.model = ref_model_cfg
        ref.output_dir = out_dir
        ref.resume = "auto"
        ref.data.eval_files, ref.data.eval_sets = [], {}
        ref.eval = None  # the reference run is not the model being studied
        ref.train.epochs, ref.train.max_steps, ref.train.stop_after_steps = 1, -1, 0
        ref.train.export_count = cfg.method.checkpoints
        # Score in the precision the reference trained in (fp32 on CPU).
        ref.train.export_dtype = "fp32" if resolve_precision(cfg.train.precision) == "fp32" else "bf16"
    return ref


def stage_root(stage_dir: Optional[str], output_dir: str) -> str:
    """Where stage-1 outputs go: method.stage_dir, or OUTPUT_DIR/confidence."""
    return stage_dir or os.path.join(output_dir, "confidence")


def _step_of(path: str) -> int:
    return int(path.rsplit("_", 1)[1])


def run_confidence_stage(cfg) -> str:
    """The confidence file for cfg's training data: the given one, a finished one, or a new one."""
    if cfg.method.confidence_source == "online":
        raise ConfigError("method.confidence_source=online has no separate stage 1: the training run scores its "
                          "own warm-up epochs (launch/train.py)")
    if cfg.method.confidence_file:
        return cfg.method.confidence_file
    if cfg.method.confidence_source == "random":
        return random_confidence_file(cfg)
    rank, _, world_size = dist_env()
    ref_model_cfg = reference_model_config(cfg)
    ref_path = prepare_model(ref_model_cfg, cfg.model_cache_dir)
    tokenizer, pad_id = load_tokenizer(ref_path, ref_model_cfg.chat_template)
    examples = train_split(cfg.data, tokenizer, cfg.train.seed)
    fp = fingerprint(cfg, ref_model_cfg, examples, world_size)
    stage_dir = os.path.join(stage_root(cfg.method.stage_dir, cfg.output_dir), fp)
    out_path = os.path.join(stage_dir, CONFIDENCE_FILE)
    if os.path.exists(out_path):
        log.info("stage 1: reusing %s", out_path)
        return out_path
    with owned(stage_dir, out_path, rank) as mine:
        if not mine:
            log.info("stage 1: reusing %s (built by another job meanwhile)", out_path)
            return out_path
        return build_stage(cfg, ref_model_cfg, examples, pad_id, stage_dir, fp, world_size)


def build_stage(cfg, ref_model_cfg, examples, pad_id: int, stage_dir: str, fp: str, world_size: int) -> str:
    """The reference run, its checkpoints' scores and the split, each piece reused when it is there."""
    from ..trainer import train  # the reference run is an ordinary training run

    checkpoints = list(cfg.method.score_checkpoints)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    steps = math.ceil(len(examples) / global_batch)
    if not checkpoints and cfg.method.checkpoints > steps:
        raise ConfigError(f"method.checkpoints={cfg.method.checkpoints}: the one-epoch reference run has only {steps} "
                          f"optimizer steps ({len(examples)} examples / global batch {global_batch}); use at most "
                          f"{steps}, or a smaller train.micro_batch_size")
    if not checkpoints:
        ref_dir = os.path.join(stage_dir, "reference")
        exports = sorted(glob.glob(os.path.join(ref_dir, "model_step_*")), key=_step_of)
        if not (os.path.isdir(os.path.join(ref_dir, "model")) and len(exports) == cfg.method.checkpoints):
            log.info("stage 1: reference run (%s, 1 epoch, %d checkpoints) in %s", ref_model_cfg.name,
                     cfg.method.checkpoints, ref_dir)
            train(reference_run_config(cfg, ref_model_cfg, ref_dir))
            exports = sorted(glob.glob(os.path.join(ref_dir, "model_step_*")), key=_step_of)
        checkpoints = exports

    perplexities = [score_checkpoint(cfg, path, examples, pad_id, stage_dir) for path in checkpoints]
    return publish_split(confidence_records(perplexities), stage_dir, fp, {"checkpoints": checkpoints}, cfg)


def job_identity() -> str:
    """What the ranks of one job share and no other running job has (after dist_env set the master)."""
    return f"{os.environ.get('SLURM_JOB_ID', '')}@{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


@contextlib.contextmanager
def owned(stage_dir: str, done: str, rank: int):
    """One job at a time builds a stage folder (sweep points sharing method.stage_dir start together):
    yields True in every rank of the job that owns it (rank 0 claims it in STAGE_DIR.owner, keeping the
    file fresh while it builds), False once another job has finished it (`done` exists). A claim whose
    process is gone (on this machine) or not kept fresh for STALE_S (elsewhere) is taken over; the same
    job, requeued, continues its own."""
    owner, me = stage_dir.rstrip("/") + ".owner", job_identity()
    os.makedirs(os.path.dirname(owner), exist_ok=True)
    last_said = 0.0
    while not os.path.exists(done):
        holder = _read_owner(owner)
        if holder and holder[0] == me:
            break
        if rank == 0 and (holder is None or _abandoned(owner, holder)):
            if holder is not None:
                log.warning("stage 1: %s was claimed by %s, which is gone: taking it over", stage_dir, holder[0])
                _remove(owner)
            _claim(owner, f"{me}\n{socket.gethostname()} {os.getpid()}")
            continue
        if time.monotonic() - last_said > 300:
            log.info("stage 1: %s is being built by another job (%s); waiting for %s", stage_dir,
                     holder[0] if holder else "starting", done)
            last_said = time.monotonic()
        time.sleep(POLL_S)
    else:
        yield False
        return
    stop = threading.Event()
    if rank == 0:
        threading.Thread(target=_keep_fresh, args=(owner, stop), daemon=True).start()
    try:
        yield True
    finally:
        stop.set()
        if rank == 0 and (_read_owner(owner) or [None])[0] == me:
            _remove(owner)


STALE_S, POLL_S = 180, 2.0


def _read_owner(path: str) -> Optional[list]:
    """[job, "HOST PID"] of a claim, or None."""
    try:
        with open(path) as f:
            return f.read().split("\n")
    except FileNotFoundError:
        return None


def _abandoned(path: str, holder: list) -> bool:
    host, _, pid = holder[-1].partition(" ")
    if host == socket.gethostname():
        return not process_alive(pid)
    try:
        return time.time() - os.path.getmtime(path) > STALE_S
    except FileNotFoundError:
        return False


def _claim(path: str, me: str) -> None:
    """Create `path` holding `me`, whole, unless it exists (a hard link fails on an existing name)."""
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(me)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _keep_fresh(path: str, stop: threading.Event) -> None:
    while not stop.wait(STALE_S / 6):
        try:
            os.utime(path)
        except OSError:
            pass


def publish_split(records, stage_dir: str, fp: str, extra: dict, cfg=None) -> str:
    """confidence.jsonl, its histogram and summary.json in stage_dir (rank 0), and the log line;
    given the run's cfg, the summary as a wandb run of its own (not from inside a training run)."""
    out_path = os.path.join(stage_dir, CONFIDENCE_FILE)
    summary = summarize(records)
    if dist_env()[0] == 0:
        maybe_delay("slow_publish", 0, 0)
        os.makedirs(stage_dir, exist_ok=True)
        write_confidence_file(out_path, records, fp)
        plot_confidence(records, os.path.join(stage_dir, "confidence.png"))
        write_json_atomic(os.path.join(stage_dir, "summary.json"), {**summary, **extra}, indent=1)
        if cfg is not None:
            log_stage_summary(cfg, "confidence", summary, stage_dir, os.path.join(stage_dir, "confidence.png"))
    log.info("stage 1: %s -> %s", summary, out_path)
    after_rank0_wrote(out_path)
    return out_path


def random_confidence_file(cfg) -> str:
    """method.confidence_source=random: a seeded half/half split of the training ids (the ablation:
    Mixup across a split that carries no confidence), in the same files as stage 1's."""
    tokenizer, _ = load_tokenizer(prepare_model(cfg.model, cfg.model_cache_dir), cfg.model.chat_template)
    ids = example_ids(train_split(cfg.data, tokenizer, cfg.train.seed))
    fp = hashlib.sha256(json.dumps([cfg.train.seed, sorted(ids)]).encode()).hexdigest()[:16]
    stage_dir = os.path.join(stage_root(cfg.method.stage_dir, cfg.output_dir), f"random-{fp}")
    return publish_split(random_split_records(ids, cfg.train.seed), stage_dir, fp,
                         {"source": "random", "seed": cfg.train.seed}, cfg)


def scores_cache(stage_dir: str, model_path: str) -> str:
    """Where a checkpoint's scores are kept: named by its folder and a digest of its path (relative to
    stage_dir for the reference run's exports, so a moved stage folder keeps them), since the folders
    given to method.score_checkpoints often share a name (run1/model, run2/model)."""
    path, root = os.path.abspath(model_path), os.path.abspath(stage_dir)
    key = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return os.path.join(stage_dir, f"scores_{os.path.basename(path)}_{digest}.json")


def score_checkpoint(cfg, model_path: str, examples, pad_id: int, stage_dir: str) -> dict:
    """{id: perplexity} under one checkpoint; cached in stage_dir."""
    cache = scores_cache(stage_dir, model_path)
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    comm = Collectives(cfg.deepspeed, cfg.train.precision, cfg.train.sequence_parallel)
    perplexity = perplexities(score_model(cfg.deepspeed, cfg.train, comm, model_path, examples,
                                          batch_size=cfg.method.score_batch_size, pad_id=pad_id,
                                          max_tokens=resolve_score_batch_tokens(cfg.method.score_batch_tokens),
                                          attn_implementation=cfg.model.attn_implementation,
                                          desc=f"score {os.path.basename(model_path)}"))
    if comm.rank == 0:
        os.makedirs(stage_dir, exist_ok=True)
        write_json_atomic(cache, perplexity)
    return perplexity
