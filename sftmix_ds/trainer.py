"""The training recipe: one explicit loop, assembled from config.

Order matters: config checks, model conversion and tokenization all happen
before the process group starts, so bad input fails fast and rank 0's
preparation can never hit a collective timeout.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import time
from collections import Counter

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from tqdm import tqdm

from .adapters import adapter_summary, apply_lora, check_lora_targets
from .common import OutOfSpace, Preempted, UserError, atomic_file, evenly_spaced, to_device, write_json_atomic
from .config import ConfigError, resolve_zero_stage, validate
from .data import example_lengths, load_split, train_split
from .engine import (PREFIX, Checkpointer, Collectives, DeepSpeedStrategy, LossModule, check_data_parallel, check_head,
                     check_sequence_parallel, complete_checkpoints, dist_env, read_complete, sample_ids)
from .engine.long_context import check_fits, free_memory_bytes
from .eval import eval_sets, evaluate_model
from .inference import score, score_nll, scoring_plan
from .methods.base import build_method
from .models import attention_implementation, load_tokenizer, prepare_model
from .faults import maybe_die, maybe_poison, maybe_signal
from .resume import (RUN_FILE, check_finished_run, find_resume, finished, fit_layout, run_identity, run_record,
                     same_run_problem)
from .tracking import MetricsLog, append_jsonl, keep_steps_up_to

log = logging.getLogger("sftmix_ds")


class NumericalError(UserError, RuntimeError):
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
    """Set by SIGUSR1 (Slurm's --signal before a time limit, or scancel --signal=USR1) and, in a job that
    submitit started (a sweep point of hydra/launcher=slurm), by submitit's own signal (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise): the loop then saves a checkpoint at the end of the step and
    returns, for a requeue. Submitit's handler, which requeues the point, runs only after that checkpoint
    (hand_over): left to itself it would requeue at once and the steps since the last save would be lost.
    One flag per process (`installed`), from the start of the run: a stage-1 reference run and the training
    after it share it, so a signal during setup or between the two stops the next step."""

    _installed = None

    @classmethod
    def installed(cls) -> "PreemptionFlag":
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def __init__(self):
        self.raised, self.name = False, "SIGUSR1"
        self.submitit = None  # (its signal, its handler)
        signal.signal(signal.SIGUSR1, self._set)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            number = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
            handler = signal.getsignal(number)
            if callable(handler):
                self.submitit = (number, handler)
            signal.signal(number, self._set)

    def _set(self, number, _frame):
        self.raised, self.name = True, signal.Signals(number).name

    def hand_over(self) -> None:
        """After the loop stopped for the signal and saved: submitit's handler requeues the point on rank 0
        (the other ranks return at once), which resumes from that checkpoint in its own output folder."""
        if self.submitit is not None:
            number, handler = self.submitit
            log.info("handing %s over to submitit, which requeues this sweep point", self.name)
            handler(number, None)


def evaluate(engine, comm, examples, batch_size: int, pad_id: int, chunk_size: int) -> float:
    """Mean response-token NLL over `examples`: the scoring pass (each example once across ranks,
    batches sorted by length), so held-out loss and SFTMix's perplexities are one computation."""
    nll = score_nll(engine, comm, examples, batch_size, pad_id, chunk_size=chunk_size)
    return sum(s for s, _ in nll.values()) / max(sum(c for _, c in nll.values()), 1)


class Recipe:
    """One training run in three phases, as torchtune's recipes: setup() builds data, method,
    engine and run state; train() runs the steps (one step: _train_step; what follows it:
    _after_step); cleanup() exports, evaluates and releases. The method may run a stage in
    setup (SFTMix: confidence from a reference run) and chooses the batches and the loss terms;
    the loop itself is the same for all."""

    def __init__(self, cfg):
        self.cfg, self.t = cfg, cfg.train
        self.rank, _, self.world_size = dist_env()
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.export_dir = os.path.join(cfg.output_dir, "model")
        self.preempted = PreemptionFlag.installed()

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> bool:
        """False when there is nothing to do (resume=auto on a finished run)."""
        validate(self.cfg)
        check_data_parallel(self.t.sequence_parallel, self.world_size)
        self.resume_from = find_resume(self.cfg)
        if self.cfg.resume == "auto" and finished(self.cfg):
            check_finished_run(self.cfg)
            log.info("%s/model exists: this run is finished (resume=none with a new output_dir trains again)",
                     self.cfg.output_dir)
            return False
        self._fit_layout()
        self._setup_data()
        self._setup_engine()
        self._setup_state()
        return True

    def _fit_layout(self) -> None:
        """deepspeed.zero_stage=auto resolved (a resumed run keeps its checkpoint's stage), and on
        another rank count the load through a universal checkpoint that keeps the checkpoint's global
        batch (resume.fit_layout); this run's config becomes a copy holding both."""
        t = self.t
        written = read_complete(self.resume_from[0]) if self.resume_from else {}
        zero_stage, why = resolve_zero_stage(self.cfg.deepspeed, self.world_size, written.get("zero_stage"))
        if self.cfg.deepspeed.zero_stage == "auto":
            log.info("ZeRO stage %d: %s", zero_stage, why)
        self.universal, grad_accum = False, t.grad_accum
        if self.resume_from:
            layout = fit_layout(self.resume_from[0], written, world_size=self.world_size, zero_stage=zero_stage,
                                micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                                allow_new_global_batch=t.allow_new_global_batch, sequence_parallel=t.sequence_parallel)
            self.universal, grad_accum = layout.universal, layout.grad_accum
        if (zero_stage, grad_accum) != (self.cfg.deepspeed.zero_stage, t.grad_accum):
            self._resolve({"deepspeed.zero_stage": zero_stage, "train.grad_accum": grad_accum})

    def _resolve(self, values: dict) -> None:
        """This run's config becomes a copy with `values` ({dotted key: value}) set, as config.yaml records."""
        self.cfg = copy.deepcopy(self.cfg)
        with open_dict(self.cfg):
            for key, value in values.items():
                OmegaConf.update(self.cfg, key, value, merge=False)
        self.t = self.cfg.train

    def _setup_data(self) -> None:
        """Model files, tokenizer, tokenized splits and the method's stage: all before any process group."""
        cfg = self.cfg
        self.model_path = prepare_model(cfg.model, cfg.model_cache_dir)
        attention = attention_implementation(self.model_path, cfg.model.attn_implementation)
        if cfg.model.attn_implementation == "auto":
            log.info("attention: %s (model.attn_implementation=auto for %s)", attention, cfg.model.name)
            self._resolve({"model.attn_implementation": attention})
            cfg = self.cfg
        check_sequence_parallel(cfg.train.sequence_parallel, self.model_path, attention)
        if cfg.peft.kind == "lora":
            check_lora_targets(self.model_path, cfg.peft)
        self.tokenizer, self.pad_id = load_tokenizer(self.model_path, cfg.model.chat_template)
        train_set = train_split(cfg.data, self.tokenizer, cfg.train.seed)
        named = {"eval_loss": cfg.data.eval_files, **{f"eval_loss/{n}": f for n, f in cfg.data.eval_sets.items()}}
        self.eval_sets = {key: load_split(cfg.data, self.tokenizer, files, held_out=True)
                          for key, files in named.items() if files}
        if cfg.eval is not None:
            eval_sets(cfg.eval)  # bad evaluation data fails now, not after training
        self.method = build_method(cfg)
        self.train_set = self.method.before_training(cfg, train_set, self.tokenizer)
        self.names = list(self.method.weights)

    def _setup_engine(self) -> None:
        cfg, t = self.cfg, self.t
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        # A sequence-parallel group's ranks train the same examples: data parallelism is over the groups.
        self.batches = self.method.batches(self.train_set, t, self.world_size // t.sequence_parallel,
                                           self.rank // t.sequence_parallel)
        self.total_steps = t.max_steps if t.max_steps > 0 else self.batches.steps(t.epochs)
        if t.export_count > self.total_steps:
            raise ConfigError(f"train.export_count={t.export_count}: this run has only {self.total_steps} optimizer "
                              "steps to export at")
        self.exports = set(evenly_spaced(self.total_steps, t.export_count))
        self.comm = Collectives(cfg.deepspeed, t.precision, t.sequence_parallel)
        self.strategy = DeepSpeedStrategy(cfg.deepspeed, t, self.comm)
        self.checkpoints = Checkpointer(self.strategy)
        if self.universal:
            self.strategy.use_universal_checkpoints()
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with atomic_file(os.path.join(cfg.output_dir, "config.yaml")) as f:
                f.write(OmegaConf.to_yaml(cfg, resolve=True))
            write_json_atomic(os.path.join(cfg.output_dir, RUN_FILE), run_record(cfg))
        self.model = self.strategy.load_model(self.model_path, cfg.model.attn_implementation,
                                              adapters=cfg.peft.kind == "lora")
        if cfg.peft.kind == "lora":
            self.model = apply_lora(self.model, cfg.peft)
            log.info("%s", adapter_summary(self.model))
        if self.universal and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()):
            log.warning("resume on another rank count with dropout (e.g. peft.dropout): each rank's random stream "
                        "cannot carry over to a new rank count, so the dropout masks from here on differ from an "
                        "uninterrupted run's and so, slightly, do the losses and weights (equal with dropout 0)")
        self.engine = self.strategy.prepare(LossModule(self.model, self.method.loss_terms, self.strategy,
                                                       padding_mask=t.padding_mask), self.total_steps)
        check_head(self.engine, sample_ids(self.train_set, self.comm.device), cfg.model.name)
        longest = max(example_lengths(self.train_set))
        log.info("activations: %s", check_fits(self.model.config.get_text_config(), t,
                                               -(-t.micro_batch_size * longest // t.sequence_parallel),
                                               self.comm.dtype.itemsize, free_memory_bytes(self.comm.device),
                                               str(self.comm.device)))
        self.offload_reported = False
        log.info("%s: %d train / %d eval examples, %d ranks%s, global batch %d, %d steps, %s, ZeRO-%d",
                 cfg.method.name, len(self.train_set), sum(map(len, self.eval_sets.values())), self.world_size,
                 f" (sequence parallel {t.sequence_parallel})" if t.sequence_parallel > 1 else "",
                 self.batches.global_batch, self.total_steps, self.comm.dtype, self.engine.zero_optimization_stage())

    def _setup_state(self) -> None:
        """The step to start from, logs trimmed to it, and the per-run guards."""
        cfg, t = self.cfg, self.t
        self.step, resumed = 0, None
        self.identity = run_identity(OmegaConf.to_container(cfg, resolve=True), self.train_set, self.method.identity(),
                                     self.batches.global_batch)
        if self.resume_from:
            resumed, client_state = self.checkpoints.load(self.resume_from, self._check_same_run)
            self.step = client_state["step"]
            self.method.load_state(client_state.get("method", {}))
            log.info("resumed from %s at step %d", resumed, self.step)
        self.metrics = MetricsLog(cfg, enabled=self.rank == 0, fresh=resumed is None)
        if hasattr(self.train_set, "counts"):
            self.metrics.log_mixture(self.train_set.counts)
        self.samples_path = os.path.join(cfg.output_dir, "samples.jsonl")  # the example ids of every step
        if self.rank == 0:
            for path in (self.metrics.path, self.samples_path):  # steps after the checkpoint run again
                keep_steps_up_to(path, self.step)
        self.guard = NonFiniteGuard(t.nonfinite, t.max_nonfinite_steps, t.grad_accum)
        self.signalled = False
        self.last_save = time.monotonic()  # train.save_every_minutes counts from here
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0,
                        desc=f"train {cfg.method.name}", dynamic_ncols=True)

    def _check_same_run(self, folder: str, meta: dict) -> None:
        problem = same_run_problem(folder, meta, self.identity, self.t.allow_new_global_batch)
        if problem is None:
            return
        if not self.cfg.resume_force:
            raise ConfigError(f"resume: {folder} was written by a run with other data or settings ({problem}); "
                              "resume_force=true continues anyway, or choose another output_dir")
        log.warning("resume_force=true: continuing from %s although %s", folder, problem)

    # -- train -----------------------------------------------------------------------------------

    def train(self) -> dict:
        record: dict = {}
        if self.step == 0 and self.t.eval_on_start and self.eval_sets:
            self.metrics.log({"step": 0, "epoch": 0.0, **self._evaluate()})
        while self.step < self.total_steps:
            record = self._train_step()
            if self._after_step(record):
                break
        self.bar.close()
        return record

    def _train_step(self) -> dict:
        """One optimizer step over the accumulation window. The host prepares every micro-batch (collate,
        token counts) and moves them to the device before the first kernel; then nothing is read back until
        the optimizer step is enqueued: the normalisers are summed over ranks on the device, and one read at
        the end brings back the loss sums, the non-finite and preemption flags and the gradient norm."""
        started = time.perf_counter()
        epoch, in_epoch = self.batches.locate(self.step)
        plan = self.batches.plan(epoch)
        micro = [self.method.collate([self.train_set[i] if i is not None else None for i in mb], self.pad_id,
                                     key=(epoch, in_epoch))
                 for mb in plan.micro_batches(epoch, in_epoch)]
        local = Counter()
        for b in micro:
            local.update({**self.method.token_counts(b), **self.method.batch_stats(b),
                          "tokens": int(b["attention_mask"].sum())})
        if self.rank % self.t.sequence_parallel:  # a sequence-parallel group's ranks share its batches: count once
            local = {k: 0 for k in local}
        on_device = [to_device(b, self.comm.device) for b in micro]
        totals = self.comm.sum_on_device(dict(local))
        norms = {n: totals[n].clamp_min(1).float() for n in self.names}
        lr = self.strategy.lr()  # the rate this step uses; the scheduler advances inside the step
        sums, values = self._loss_step(on_device, norms)
        got = self.comm.read({**totals, **sums, "grad_norm": self.strategy.grad_norm()})
        skipped = got["nonfinite"] > 0 and self._non_finite_loss(micro, values)
        self.step += 1
        if self.rank == 0:
            append_jsonl(self.samples_path, {"step": self.step, "ids": [
                self.train_set[i].id for i in plan.step_examples(epoch, in_epoch)],
                **({"skipped": True} if skipped else {})})
        overflow = not skipped and self.strategy.update_skipped()
        if overflow:
            log.warning("step %d: fp16 loss scale overflow: DeepSpeed skipped the update and lowered the scale",
                        self.step)
        grad_norm = None if skipped else got["grad_norm"]  # a skipped step's is DeepSpeed's inf, or the last one's
        self.guard.check_grad_norm(self.step, grad_norm, skipped or overflow, self.ckpt_root)
        maybe_die("after_step", self.rank, self.step)
        maybe_signal(self.rank, self.step)
        elapsed = time.perf_counter() - started
        record = {"step": self.step, "epoch": epoch + (in_epoch + 1) / plan.steps_per_epoch, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": got["tokens"] / elapsed,
                  "tokens_per_s_per_device": got["tokens"] / elapsed / self.comm.world_size,
                  "step_s": elapsed, "peak_mem_gb": self.strategy.peak_memory_gb()}
        if self.comm.on_gpu:
            record["peak_mem_reserved_gb"] = self.strategy.peak_reserved_gb()
        if overflow:
            record["overflow_skipped"] = True
        record.update({f"loss/{n}": 0.0 if skipped else got[f"loss/{n}"] / max(got[n], 1) for n in self.names})
        record.update({f"tokens/{n}": int(got[n]) for n in self.names})
        record["loss"] = sum(self.method.weights[n] * record[f"loss/{n}"] for n in self.names)
        record.update(self.method.step_metrics({k: got[k] for k in local}))
        if skipped:
            record["skipped"] = True
        self.signalled = got["preempted"] > 0
        self.save_due = got["save_due"] > 0  # any rank's clock: every rank saves at this step
        return record

    def _save_due(self) -> bool:
        minutes = self.t.save_every_minutes
        return bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes

    def _loss_step(self, micro: list, norms: dict) -> tuple:
        """Forward and backward of each micro-batch and the optimizer step, with nothing read on the host.
        The loss values are summed over ranks on the device after the last forward; a NaN/inf on any rank
        makes the last backward's loss NaN, so the gradient norm is NaN and DeepSpeed skips the update: a
        non-finite step changes no weight. Where DeepSpeed makes no such check (ZeRO-0, or the check turned
        off in deepspeed.extra) the flag is read before the last backward instead, which is then not run.
        Returns (the summed terms and flags on the device, each micro-batch's terms [micro, terms])."""
        values = []
        with self.strategy.saved_activations() as offload:
            for i, b in enumerate(micro):
                terms = self.engine(**b)
                values.append(maybe_poison(torch.stack([terms[n].detach().double() for n in self.names]), self.rank,
                                           self.step + 1))
                loss = sum(self.method.weights[n] * terms[n] / norms[n] for n in self.names)
                if i < len(micro) - 1:
                    self.strategy.backward_and_step(loss)
            stacked = torch.stack(values)
            sums = self.comm.sum_on_device({**{f"loss/{n}": stacked[:, j].sum() for j, n in enumerate(self.names)},
                                            "nonfinite": (~torch.isfinite(stacked).all(1)).sum(),
                                            "preempted": float(self.preempted.raised),
                                            "save_due": float(self._save_due())})
            if self.strategy.skips_nonfinite_updates():
                loss = loss * torch.where(sums["nonfinite"] > 0, float("nan"), 1.0)
            elif sums["nonfinite"] > 0:  # a host-device synchronisation, where DeepSpeed would apply a NaN update
                return sums, stacked
            self.strategy.backward_and_step(loss)
        if offload is not None and not self.offload_reported:
            log.info("train.offload_activations: %.1f MiB of saved activations moved to host memory in step %d",
                     offload.offloaded_bytes / 2**20, self.step + 1)
            self.offload_reported = True
        return sums, stacked

    def _non_finite_loss(self, micro: list, values: torch.Tensor) -> bool:
        """A step with a NaN/inf loss on some rank (its update not applied): the guard stops the run or
        skips the step; the message names each rank's examples and values."""
        bad = ~torch.isfinite(values).all(1)
        mine = [(b["ids"], dict(zip(self.names, v))) for b, v, is_bad in zip(micro, values.tolist(), bad.tolist())
                if is_bad]
        where = [(r, [i for i in ids if i], v) for r, part in enumerate(self.comm.all_gather_object(mine))
                 for ids, v in part]
        if self.strategy.skips_nonfinite_updates() and self.strategy.update_applied():
            raise RuntimeError(f"step {self.step + 1}: DeepSpeed applied an update with a non-finite gradient norm")
        return self.guard.non_finite_loss(self.step + 1, where)

    def _after_step(self, record: dict) -> bool:
        """Eval, logs, exports and checkpoints after a step, as OpenRLHF's save_logs_and_checkpoints;
        True when the run stops here (preemption or train.stop_after_steps) for a later resume."""
        t, step = self.t, self.step
        method_metrics = self.method.after_step(step, self._score_train_set)
        record.update(method_metrics)
        epoch_end = float(record["epoch"]).is_integer()
        evaluating = (t.eval_every and step % t.eval_every == 0) or (t.eval_each_epoch and epoch_end)
        evaluated = bool(self.eval_sets) and (evaluating or step == self.total_steps)
        if evaluated:
            record.update(self._evaluate())
        if step % t.log_every == 0 or evaluated or method_metrics or step == self.total_steps:
            self.metrics.log(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.update(1)
        if step in self.exports:
            self.strategy.export(os.path.join(self.cfg.output_dir, f"model_step_{step}"), self.model, self.tokenizer,
                                 t.export_dtype, prefix=PREFIX)
        stopping = step < self.total_steps and (self.signalled or (t.stop_after_steps and step >= t.stop_after_steps))
        if (t.save_every and step % t.save_every == 0) or (self.save_due and step < self.total_steps) or stopping:
            self.checkpoints.save(self.ckpt_root, step, {"step": step, "method": self.method.state()},
                                  t.keep_checkpoints,
                                  meta={"identity": self.identity, "global_batch": self.batches.global_batch,
                                        "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum})
            self.last_save = time.monotonic()
        if stopping:
            why = f"{self.preempted.name} (preemption or time limit)" if self.signalled else "train.stop_after_steps"
            log.info("stopping at step %d after a checkpoint, for %s; resume=auto continues", step, why)
        return bool(stopping)

    def _evaluate(self) -> dict:
        """{eval_loss[/NAME]: mean response-token loss} of each held-out set."""
        return {key: evaluate(self.engine, self.comm, examples, self.t.micro_batch_size, self.pad_id,
                              self.t.loss_chunk_size) for key, examples in self.eval_sets.items()}

    def _score_train_set(self, batch_size: int, max_tokens: int) -> dict:
        """{id: response perplexity} of every training example under the weights now; all ranks."""
        n_batches = len(scoring_plan(self.train_set, batch_size, self.comm.data_parallel_size,
                                     self.comm.data_parallel_rank, max_tokens))
        with tqdm(total=n_batches, desc=f"score step {self.step}", disable=self.rank != 0, leave=False) as bar:
            return score(self.engine, self.comm, self.train_set, batch_size, self.pad_id, progress=bar,
                         chunk_size=self.t.loss_chunk_size, max_tokens=max_tokens)

    # -- cleanup ---------------------------------------------------------------------------------

    def cleanup(self, record: dict) -> None:
        """Export the final model, give the engine's memory back, then evaluate the export."""
        cfg, t = self.cfg, self.t
        done = self.step == self.total_steps
        if done and t.export_final:
            lora = cfg.peft.kind == "lora"
            merged = self.export_dir if t.export_merged or not lora else None
            adapter = os.path.join(cfg.output_dir, "adapter") if lora else None
            try:
                self.strategy.export(merged, self.model, self.tokenizer, t.export_dtype, prefix=PREFIX,
                                     adapter_dir=adapter)
            except OutOfSpace as e:
                checkpoints = complete_checkpoints(self.ckpt_root)
                where = (f"the newest complete checkpoint, {checkpoints[-1]}, is intact: free space and run again "
                         "(resume=auto continues from it and exports)" if checkpoints else
                         "no checkpoint was saved (train.save_every, train.save_every_minutes): free space and "
                         "run again")
                raise OutOfSpace(f"the final export: {e}; {where}") from None
            log.info("exported %s %s; final metrics %s", t.export_dtype,
                     " and ".join(f"{what} to {where}" for what, where in (("model", merged), ("adapter", adapter))
                                  if where), record)
        self.strategy.release()
        self.model = self.engine = None  # the stage's model goes with its engine, before evaluation loads one
        if done and cfg.eval is not None:
            model = cfg.eval.model_path or self.export_dir
            try:
                self._evaluate_export(model)
            except OutOfSpace as e:
                raise OutOfSpace(f"the evaluation's results: {e}; the figures are in the log above, and the model "
                                 f"at {model} is intact: free space and evaluate it again with launch/eval.py "
                                 f"eval.model_path={model} (and this run's eval settings)") from None
        self.metrics.close()

    def _evaluate_export(self, model: str) -> None:
        results = evaluate_model(self.cfg, model, os.path.join(self.cfg.output_dir, "eval"), self.comm)
        summary = {f"eval/{g}/{n}": r["accuracy"] for g in ("tasks", "general") for n, r in results[g].items()}
        for task, r in results.get("harness", {}).items():
            summary[f"eval/lm_eval/{task}"] = r["value"]
            summary.update({f"eval/lm_eval/{task}/{key}": m["value"] for key, m in r["metrics"].items()})
        if "perplexity" in results:
            summary["eval/perplexity"] = results["perplexity"]["perplexity"]
        self.metrics.log_summary(summary)


def train(cfg) -> dict:
    """Train, evaluate, checkpoint and export as `cfg` says; returns the last step's metrics."""
    recipe = Recipe(cfg)
    if not recipe.setup():
        return {}
    record = recipe.train()
    recipe.cleanup(record)
    if recipe.signalled and recipe.step < recipe.total_steps:
        recipe.preempted.hand_over()
        raise Preempted(f"exiting for a requeue: {cfg.output_dir} continues from step {recipe.step} (resume=auto)")
    return record
