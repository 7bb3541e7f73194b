"""The training recipe: one explicit loop, assembled from config.

Order matters: config checks, model conversion and tokenization all happen
before the process group starts, so bad input fails fast and rank 0's
preparation can never hit a collective timeout.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
import math
import time
import warnings

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from .config import ConfigError, validate
from .data import Batches, collate, load_split
from .engine import PREFIX, DeepSpeedStrategy, LossModule, complete_checkpoints, dist_env
from .models import load_tokenizer, prepare_model
from .eval import evaluate_model
from .faults import maybe_die, maybe_poison
from .tracking import MetricsLog, append_jsonl, keep_steps_up_to

log = logging.getLogger("sftmix_ds")


def setup_logging(rank: int, output_dir: str) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed still calls collectives that torch marks deprecated, on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class NumericalError(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step, the examples and the values."""


class NonFiniteGuard:
    """What to do about a NaN/inf loss (seen on any rank before backward, so the weights are
    untouched): `stop`, or `skip` the step (grad_accum=1) until more than `max_in_a_row` come
    in a row; and a non-finite gradient norm after an update always stops."""

    def __init__(self, policy: str, max_in_a_row: int, grad_accum: int):
        self.policy, self.max_in_a_row, self.grad_accum, self.in_a_row = policy, max_in_a_row, grad_accum, 0

    def non_finite_loss(self, step: int, bad: list) -> bool:
        """bad: (rank, example ids, loss values) of each rank whose micro-batch went non-finite."""
        where = f"step {step}: non-finite loss " + "; ".join(f"on rank {r}: {v}, examples {ids}" for r, ids, v in bad)
        if self.policy == "stop":
            raise NumericalError(f"{where}; stopping before the update (train.nonfinite=stop)")
        self.in_a_row += 1
        if self.in_a_row > self.max_in_a_row:
            raise NumericalError(f"{where}; {self.in_a_row} steps in a row, more than "
                                 f"train.max_nonfinite_steps={self.max_in_a_row}: stopping")
        log.warning("%s; step skipped (%d in a row)", where, self.in_a_row)
        return True

    def check_grad_norm(self, step: int, grad_norm, skipped: bool, ckpt_root: str) -> None:
        if skipped:
            return
        self.in_a_row = 0
        if grad_norm is not None and not math.isfinite(grad_norm):
            checkpoints = complete_checkpoints(ckpt_root)
            last = checkpoints[-1] if checkpoints else "none"
            raise NumericalError(f"step {step}: gradient norm {grad_norm} after the update; the weights are "
                                 f"suspect, resume from the last checkpoint ({last}) with a lower lr")


class PreemptionFlag:
    """Set by SIGUSR1 (Slurm's --signal before a time limit, or scancel --signal=USR1): the
    loop then saves a checkpoint at the end of the step and returns, for a requeue."""

    def __init__(self):
        self.raised = False
        signal.signal(signal.SIGUSR1, self._set)

    def _set(self, *_):
        self.raised = True


def finished(cfg) -> bool:
    return os.path.exists(os.path.join(cfg.output_dir, "model", "config.json"))


def find_resume(cfg) -> str | None:
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    if cfg.resume == "none":
        if complete_checkpoints(ckpt_root) or finished(cfg):
            raise ConfigError(f"resume=none but {cfg.output_dir} already holds checkpoints or a finished model; "
                              "pass resume=auto to continue, or choose another output_dir")
        return None
    if cfg.resume == "auto":
        done = complete_checkpoints(ckpt_root)
        return done[-1] if done else None
    return cfg.resume


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def evaluate(engine, strategy, method, examples, micro_batch_size: int, pad_id: int) -> float:
    """Mean response-token CE over `examples`, split across ranks."""
    batches = Batches(len(examples), micro_batch_size, 1, strategy.world_size, strategy.rank, seed=0, shuffle=False)
    total = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for step in range(batches.steps_per_epoch):
            (indices,) = batches.micro_batches(0, step)
            batch = collate([examples[i] if i is not None else None for i in indices], pad_id)  # no pairs
            terms = engine(**to_device(batch, strategy.device))
            total += torch.tensor([float(terms["ntp"]), method.token_counts(batch)["ntp"]], dtype=torch.float64)
    engine.train()
    loss_sum, count = strategy.all_reduce_sum(total).tolist()
    return loss_sum / max(count, 1)


def export_steps(total_steps: int, count: int) -> set:
    """`count` evenly spaced steps, the last one at the end."""
    return {round(total_steps * c / count) for c in range(1, count + 1)} if count else set()


def train(cfg) -> dict:
    """Train, evaluate, checkpoint and export as `cfg` says; returns the last metrics.

    The method may run a stage first (SFTMix: confidence from a reference run)
    and chooses the batches and the loss terms; the loop itself is the same for all.
    """
    validate(cfg)
    rank, _, world_size = dist_env()
    t = cfg.train
    resume_from = find_resume(cfg)
    if cfg.resume == "auto" and finished(cfg):
        log.info("%s/model exists: this run is finished (resume=none with a new output_dir trains again)",
                 cfg.output_dir)
        return {}
    model_path = prepare_model(cfg.model, cfg.model_cache_dir)
    tokenizer, pad_id = load_tokenizer(model_path)
    train_set = load_split(cfg.data, tokenizer, cfg.data.train_files)
    eval_set = load_split(cfg.data, tokenizer, cfg.data.eval_files) if cfg.data.eval_files else []
    method = instantiate(cfg.method, chunk_size=t.loss_chunk_size, loss_backend=t.loss_backend,
                         pack_width=cfg.data.max_length if t.packing else 0)
    train_set = method.before_training(cfg, train_set, tokenizer)

    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    strategy = DeepSpeedStrategy(cfg.deepspeed, t)
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    batches = method.batches(train_set, t, world_size, rank)
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * batches.steps_per_epoch
    exports = export_steps(total_steps, t.export_count)
    model = strategy.load_model(model_path, cfg.model.attn_implementation)
    engine = strategy.prepare(LossModule(model, method.loss_terms, strategy), total_steps)
    log.info("%s: %d train / %d eval examples, %d ranks, global batch %d, %d steps, %s, ZeRO-%d", cfg.method.name,
             len(train_set), len(eval_set), world_size, batches.global_batch, total_steps, strategy.dtype,
             cfg.deepspeed.zero_stage)

    step = 0
    if resume_from:
        step = strategy.load_checkpoint(resume_from)["step"]
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = MetricsLog(cfg, enabled=rank == 0, fresh=resume_from is None)
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")  # the example ids of every step
    if rank == 0:
        for path in (metrics.path, samples_path):  # steps after the checkpoint run again: drop their old lines
            keep_steps_up_to(path, step)
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    guard = NonFiniteGuard(t.nonfinite, t.max_nonfinite_steps, t.grad_accum)
    preempted = PreemptionFlag()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=f"train {cfg.method.name}",
               dynamic_ncols=True)
    names = list(method.weights)
    record: dict = {}
    while step < total_steps:
        started = time.perf_counter()
        epoch, in_epoch = divmod(step, batches.steps_per_epoch)
        micro = [method.collate([train_set[i] if i is not None else None for i in mb], pad_id, key=(epoch, in_epoch))
                 for mb in batches.micro_batches(epoch, in_epoch)]
        local_counts = [method.token_counts(b) for b in micro]
        global_counts = strategy.all_reduce_sum([sum(c[n] for c in local_counts) for n in names]).tolist()
        norms = dict(zip(names, global_counts))
        term_sums = torch.zeros(len(names), dtype=torch.float64)
        lr = strategy.lr()  # the rate this step uses; the scheduler advances inside the step
        skipped = False
        for b in micro:
            terms = engine(**to_device(b, strategy.device))
            values = maybe_poison([terms[n].item() for n in names], rank, step + 1)
            if strategy.any_rank(not all(math.isfinite(v) for v in values)):
                bad = [(r, [i for i in ids if i], dict(zip(names, v)))
                       for r, (ids, v) in enumerate(strategy.all_gather_object((b["ids"], values)))
                       if not all(math.isfinite(x) for x in v)]
                skipped = guard.non_finite_loss(step + 1, bad)
                break  # skip policy: no backward and no optimizer step for this step
            loss = sum(method.weights[n] * terms[n] / max(norms[n], 1) for n in names)
            strategy.backward_and_step(loss)
            term_sums += torch.tensor(values, dtype=torch.float64)
        step += 1
        if rank == 0:
            append_jsonl(samples_path, {"step": step, "ids": [train_set[i].id for i in batches.step_examples(
                epoch, in_epoch)], **({"skipped": True} if skipped else {})})
        guard.check_grad_norm(step, strategy.grad_norm(), skipped, ckpt_root)
        maybe_die("after_step", rank, step)
        sums = strategy.all_reduce_sum(term_sums).tolist()
        tokens = strategy.all_reduce_sum([sum(int(b["attention_mask"].sum()) for b in micro)]).item()
        elapsed = time.perf_counter() - started
        record = {"step": step, "epoch": epoch + (in_epoch + 1) / batches.steps_per_epoch, "lr": lr,
                  "grad_norm": strategy.grad_norm(), "tokens_per_s": tokens / elapsed, "step_s": elapsed,
                  "peak_mem_gb": strategy.peak_memory_gb()}
        record.update({f"loss/{n}": s / max(norms[n], 1) for n, s in zip(names, sums)})
        record.update({f"tokens/{n}": int(norms[n]) for n in names})
        record["loss"] = sum(method.weights[n] * record[f"loss/{n}"] for n in names)
        record.update(method.step_metrics(micro, strategy))
        if skipped:
            record["skipped"] = True
        if eval_set and ((t.eval_every and step % t.eval_every == 0) or step == total_steps):
            record["eval_loss"] = evaluate(engine, strategy, method, eval_set, t.micro_batch_size, pad_id)
        if step % t.log_every == 0 or "eval_loss" in record or step == total_steps:
            metrics.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if step in exports:
            strategy.export(os.path.join(cfg.output_dir, f"model_step_{step}"), model, tokenizer, t.export_dtype,
                            prefix=PREFIX)
        signalled = strategy.any_rank(preempted.raised)
        stopping = step < total_steps and (signalled or (t.stop_after_steps and step >= t.stop_after_steps))
        if (t.save_every and step % t.save_every == 0) or stopping:
            strategy.save_checkpoint(ckpt_root, step, {"step": step}, t.keep_checkpoints)
        if stopping:
            why = "SIGUSR1 (preemption or time limit)" if signalled else "train.stop_after_steps"
            log.info("stopping at step %d after a checkpoint, for %s; resume=auto continues", step, why)
            break
    bar.close()
    export_dir = os.path.join(cfg.output_dir, "model")
    if step == total_steps and t.export_final:
        strategy.export(export_dir, model, tokenizer, t.export_dtype, prefix=PREFIX)
        log.info("exported %s model to %s; final metrics %s", t.export_dtype, export_dir, record)
    strategy.release()
    if step == total_steps and cfg.eval is not None:
        results = evaluate_model(cfg, cfg.eval.model_path or export_dir, os.path.join(cfg.output_dir, "eval"))
        summary = {f"eval/{g}/{n}": r["accuracy"] for g in ("tasks", "general") for n, r in results[g].items()}
        if "perplexity" in results:
            summary["eval/perplexity"] = results["perplexity"]["perplexity"]
        metrics.log_summary(summary)
    metrics.close()
    return record
