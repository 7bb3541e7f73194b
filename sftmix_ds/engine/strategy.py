"""The one owner of DeepSpeed: process group, model loading, engine, step, checkpoints, export.

Nothing else in the library imports deepspeed.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..common import UserError, file_digest, free_port, torch_dtype, write_json_atomic
from ..config import resolve_precision
from ..faults import maybe_die, maybe_disk_full

log = logging.getLogger(__name__)
COMPLETE = "complete.json"
# A checkpoint's conversion to DeepSpeed's universal format (to resume on another rank count)
# lives in this subfolder, complete once UNIVERSAL_DONE is in it.
UNIVERSAL, UNIVERSAL_DONE = "universal", "converted.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says what is intact."""


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment: the deepspeed or
    torchrun launcher (RANK...), Slurm's srun (SLURM_PROCID...), or a plain
    `python launch/train.py`, which becomes a one-process group."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        # srun: one task per device; MASTER_ADDR/MASTER_PORT come from launch/slurm/train.sbatch.
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          WORLD_SIZE=os.environ["SLURM_NTASKS"])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def device_index(local_rank: int, visible_devices: int) -> int:
    """This process's GPU among the visible ones: its local rank where each task sees every GPU of the
    node (deepspeed, torchrun), else 0 where a scheduler binds one GPU per task (Slurm --gpus-per-task,
    --gpu-bind), which leaves every local rank past 0 an invalid device ordinal."""
    if visible_devices == 1:
        return 0
    if local_rank < visible_devices:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} but this process sees {visible_devices} GPUs "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most one "
                       "task per GPU, or bind one GPU to each task")


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


class DeepSpeedStrategy:
    def __init__(self, ds_cfg, train_cfg):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.rank, self.local_rank, self.world_size = dist_env()
        self.cfg, self.train_cfg = ds_cfg, train_cfg
        accel = get_accelerator()
        self.on_gpu = accel.device_name() == "cuda"
        self.device = torch.device("cpu")
        if self.on_gpu:
            index = device_index(self.local_rank, accel.device_count())
            accel.set_device(index)
            self.device = torch.device(accel.device_name(index))
        precision = resolve_precision(train_cfg.precision)
        self.dtype = torch_dtype(precision)
        wait_for_build_locks(ds_cfg.build_lock_wait_minutes * 60)
        deepspeed.init_distributed(timeout=timedelta(minutes=ds_cfg.timeout_minutes))
        _unlink_shm_buffer(self.rank)
        self.ds_config = deepspeed_config(ds_cfg, train_cfg, self.world_size, precision, self.on_gpu)
        self._hf_ds_config = None
        self.engine = None

    def load_model(self, path: str, attn_implementation: str = "sdpa"):
        """A transformers model, built partitioned under ZeRO-3 (never whole on one rank)."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        if self.cfg.zero_stage == 3:
            self._size_zero3_buckets(path)
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # must stay alive while from_pretrained runs
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, attn_implementation=attn_implementation)
        if self.train_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.train_cfg.compile:
            for block in model.get_decoder().layers:
                block.compile(dynamic=True)
        model.config.use_cache = False
        return model

    def _size_zero3_buckets(self, path: str) -> None:
        """ZeRO-3's communication buckets sized to the model, as the HF Trainer's "auto" does;
        DeepSpeed's defaults (5e8 elements, 2 GB in fp32 each) are meant for large models and
        dominate a small model's memory. Values given in deepspeed.extra win."""
        from transformers import AutoConfig

        hidden = getattr(AutoConfig.from_pretrained(path), "hidden_size", None)
        if hidden:
            zero = self.ds_config["zero_optimization"]
            zero.setdefault("reduce_bucket_size", hidden * hidden)
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)

    def register_external_parameter(self, module, param) -> None:
        """Let `module`'s forward use a parameter owned by another module (ZeRO-3 gathers it)."""
        if self.cfg.zero_stage == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(module, param)

    def prepare(self, module, total_steps: int):
        import deepspeed

        t = self.train_cfg
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 parameters are flattened
                (decay if ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        warmup = int(t.warmup_ratio * total_steps)

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, warmup,
                                                                                     t.min_lr_ratio))

        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=groups, config=self.ds_config,
                                               lr_scheduler=schedule)
        log.info("DeepSpeed runs ZeRO stage %d; effective config: %s", self.engine.zero_optimization_stage(),
                 json.dumps(self.ds_config, sort_keys=True))
        return self.engine

    def prepare_inference(self, module):
        """An engine for forward passes only: ZeRO-3 keeps weights partitioned; below
        stage 3 the whole model sits on each device."""
        import deepspeed

        config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "gradient_clipping")}
        if self.cfg.zero_stage != 3:
            config["zero_optimization"] = {"stage": 0}
        self.engine, *_ = deepspeed.initialize(model=module, config=config)
        return self.engine

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """`loss` is already normalised by global token counts; DeepSpeed averages gradients
        over ranks and would divide by grad_accum, so undo both here."""
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def peak_memory_gb(self) -> float:
        """Peak accelerator memory allocated (GPU), else this process's peak resident memory."""
        if self.on_gpu:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def peak_reserved_gb(self) -> Optional[float]:
        """Peak memory the CUDA caching allocator held (what other processes could not have): GPU only."""
        return torch.cuda.max_memory_reserved() / 2**30 if self.on_gpu else None

    def update_skipped(self) -> bool:
        """Whether the last step's update was skipped by fp16 loss scaling (an overflow: DeepSpeed lowers
        the scale and reports an infinite gradient norm; the weights are untouched)."""
        return self.engine.fp16_enabled() and not self.engine.was_step_applied()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def all_reduce_sum(self, values):
        """Sums over ranks in one collective: of a list or tensor (-> a CPU float64 tensor), or of
        a dict of scalars, Python numbers or 0-d tensors (-> a dict of floats, the same keys)."""
        if isinstance(values, dict):
            scalars = [torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values.values()]
            return dict(zip(values, self.all_reduce_sum(torch.stack(scalars)).tolist()))
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (so all ranks take the same branch)."""
        return bool(self.all_reduce_sum([float(flag)]).item() > 0)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def release(self) -> None:
        """Drop the engine (and with it model, optimizer and ZeRO state) before the next stage,
        logging the stage's peak memory (on CUDA the peak counter then starts again)."""
        log.info("stage peak memory: %.2f GB (%s)", self.peak_memory_gb(),
                 f"this stage's allocated, {self.peak_reserved_gb():.2f} GB reserved" if self.on_gpu
                 else "the process's so far: resident memory cannot be reset")
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        if self.engine is not None:
            self.engine.destroy()
            _drop_zero3_globals()
        self.engine, self._hf_ds_config = None, None
        import gc

        gc.collect()

    def barrier(self) -> None:
        dist.barrier()

    @staticmethod
    def barrier_if_initialized() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    # -- checkpoints: collective; every rank calls these ------------------------------------------

    def save_checkpoint(self, ckpt_root: str, step: int, client_state: dict, keep: int,
                        meta: Optional[dict] = None) -> str:
        """Every rank writes its part; then complete.json, with the manifest (sizes, checksums)
        and `meta`, marks the folder usable. Collective."""
        tag = f"step_{step}"
        folder = os.path.join(ckpt_root, tag)
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a partial save from an interrupted run
        self.barrier()
        error = None
        try:
            self.engine.save_checkpoint(ckpt_root, tag=tag, client_state=client_state)
            maybe_disk_full(self.rank, step)
            torch.save(_rng_state(), os.path.join(folder, f"rng_rank{self.rank}.pt"))
        except OSError as e:  # disk full, quota, lost mount: every rank must learn of it, or the rest hang
            error = e
        maybe_die("in_save", self.rank, step)
        if self.any_rank(error is not None):
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            done = complete_checkpoints(ckpt_root)
            raise CheckpointError(f"saving checkpoint {folder} failed ({error or 'on another rank'}); the "
                                  f"partial one was removed, the newest complete one is "
                                  f"{done[-1] if done else 'none'}; free space and run again with resume=auto")
        manifest = self._manifest(folder)
        if self.rank == 0:
            write_json_atomic(os.path.join(folder, COMPLETE), {"step": step, **self.layout(), "files": manifest,
                                                               **(meta or {})})
            for old in complete_checkpoints(ckpt_root)[:-keep] if keep else []:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return folder

    def _manifest(self, folder: str) -> dict:
        """{relative path: [size, checksum]} of every file of a checkpoint; the checksums are
        computed by the ranks in turn (file i by rank i mod world size). Collective."""
        paths = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                       if f != COMPLETE)
        mine = {p: [os.path.getsize(os.path.join(folder, p)), file_digest(os.path.join(folder, p))]
                for p in paths[self.rank::self.world_size]}
        return {p: v for part in self.all_gather_object(mine) for p, v in part.items()}

    def _verify(self, folder: str, meta: dict) -> Optional[str]:
        """None when every file the manifest lists is there with its size and checksum (checked
        by the ranks in turn), else what is wrong. Collective."""
        files = meta.get("files")
        if files is None:
            log.warning("%s: written before checkpoints carried checksums; loading it unverified", folder)
            return None
        problems = []
        for rel, (size, digest) in sorted(files.items())[self.rank::self.world_size]:
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                problems.append(f"{rel} is missing")
            elif os.path.getsize(path) != size:
                problems.append(f"{rel} has {os.path.getsize(path)} bytes, {size} were written")
            elif file_digest(path) != digest:
                problems.append(f"{rel} does not match its checksum (bit rot or an overwrite)")
        problems = [p for part in self.all_gather_object(problems) for p in part]
        return "; ".join(problems[:5]) if problems else None

    def layout(self) -> dict:
        """What a checkpoint's files depend on: the rank count and the ZeRO stage."""
        return {"world_size": self.world_size, "zero_stage": self.cfg.zero_stage}

    def use_universal_checkpoints(self) -> None:
        """Load checkpoints through their universal conversion (another rank count than they were
        written by). Before prepare()."""
        self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

    def load_checkpoint(self, candidates: list, check_meta=None) -> tuple:
        """Load the newest usable checkpoint of `candidates` (newest first): one whose files all
        match its manifest and that DeepSpeed can read; the others are passed over, saying why.
        check_meta(folder, meta) may refuse one (raising), e.g. for other run settings. With
        use_universal_checkpoints() each is loaded from its universal conversion (made once).
        Returns (folder, client state). Collective."""
        reasons = []
        universal = self.ds_config.get("checkpoint", {}).get("load_universal", False)
        for folder in candidates:
            meta = read_complete(folder)
            written = {"world_size": meta["world_size"], "zero_stage": meta.get("zero_stage", self.cfg.zero_stage)}
            if written != self.layout() and not universal:
                raise CheckpointError(f"{folder}: written with {written}, resuming with {self.layout()} "
                                      "without a universal checkpoint")
            if check_meta is not None:
                check_meta(folder, meta)
            problem = self._verify(folder, meta)
            if problem is None:
                try:
                    if universal:
                        _, client_state = self.engine.load_checkpoint(folder, tag=self._universal(folder),
                                                                      load_optimizer_states=True,
                                                                      load_lr_scheduler_states=True)
                        _unshare_adam_steps(self.engine.optimizer)
                    else:
                        root, tag = os.path.split(os.path.normpath(folder))
                        _, client_state = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                                      load_lr_scheduler_states=True)
                        _set_rng_state(torch.load(os.path.join(folder, f"rng_rank{self.rank}.pt"),
                                                  weights_only=False))
                except CheckpointError:
                    raise
                except Exception as e:  # a shard that passed no manifest (an old checkpoint), or a bug
                    problem = f"DeepSpeed could not load it ({type(e).__name__}: {e})"
                if self.any_rank(problem is not None):
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
        and reused after. Collective."""
        out = os.path.join(folder, UNIVERSAL)
        error = None
        if self.rank == 0 and not os.path.isfile(os.path.join(out, UNIVERSAL_DONE)):
            tmp = f"{out}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("resume: converting %s to a universal checkpoint (once; kept in %s)", folder, out)
            started = time.perf_counter()
            try:
                _ds_to_universal(folder, tmp)
                maybe_die("in_convert", self.rank, read_complete(folder)["step"])
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
                write_json_atomic(os.path.join(tmp, UNIVERSAL_DONE),
                                  {"seconds": round(time.perf_counter() - started, 1), "bytes": size})
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
                log.info("resume: universal checkpoint %s: %.1f s, %.1f MB", out, time.perf_counter() - started,
                         size / 1e6)
            except Exception as e:  # every rank must learn of it, or the others wait at the barrier
                error = e
        if self.any_rank(error is not None):
            detail = f"{type(error).__name__}: {error}" if error else "on rank 0; its log says why"
            raise CheckpointError(f"{folder}: converting it to a universal checkpoint failed ({detail}); resume "
                                  f"on the {read_complete(folder)['world_size']} ranks it was written by")
        return UNIVERSAL

    def export(self, out_dir: Optional[str], model, tokenizer, dtype: str, prefix: str = "",
               adapter_dir: Optional[str] = None) -> None:
        """Consolidated 16-bit (or fp32) safetensors + config + tokenizer, loadable by from_pretrained.

        `model` is the transformers model inside the engine's module, whose
        parameters appear under `prefix` in the engine's state dict. A LoRA model
        (sftmix_ds.adapters) is exported merged to out_dir (None: not at all), and
        its adapter folder to adapter_dir when given.
        """
        from huggingface_hub import save_torch_state_dict

        from ..adapters import is_peft, merged_state, save_adapter

        if self.cfg.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            export_dtype = torch_dtype(dtype)
            # clone: ZeRO-1/2 parameters are views into one flat buffer, which safetensors refuses
            state = {k[len(prefix):]: v.detach().to("cpu").clone() for k, v in state.items() if k.startswith(prefix)}
            if is_peft(model):
                if adapter_dir:
                    save_adapter(model, state, adapter_dir, export_dtype)
                state, model = merged_state(model, state), model.get_base_model()
            state = {k: v.to(export_dtype) for k, v in state.items()}
        if self.rank == 0 and out_dir is not None:
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)
            empty = [k for k, v in state.items() if v.numel() == 0]
            if empty:
                raise RuntimeError(f"export: parameters with no elements (ZeRO-3 partitions leaked): {empty[:5]}")
            tmp = f"{out_dir}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            save_torch_state_dict(state, tmp, max_shard_size="5GB")
            config = model.config.__class__.from_dict(model.config.to_dict())
            config.dtype = export_dtype
            config.use_cache = True
            config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        self.barrier()


class BuildLockError(UserError, RuntimeError):
    """A torch-extensions build lock outlived the wait; the message names the file."""


def wait_for_build_locks(wait_s: float) -> None:
    """Wait (bounded) while an extension build lock exists under the torch extensions folder.
    torch's FileBaton waits on such a lock forever, and one left by a killed build never goes."""
    from torch.utils.cpp_extension import _get_build_directory

    root = os.path.dirname(_get_build_directory("deepspeed_shm_comm", verbose=False))
    deadline, announced = time.monotonic() + wait_s, False
    while True:
        locks = [os.path.join(root, name, "lock") for name in sorted(os.listdir(root))
                 if os.path.exists(os.path.join(root, name, "lock"))]
        if not locks:
            return
        if time.monotonic() >= deadline:
            age = time.time() - os.path.getmtime(locks[0])
            raise BuildLockError(f"{locks[0]}: an extension build lock has been there for {age:.0f} s (a build "
                                 "killed midway leaves it behind); if no other job on this machine is building, "
                                 "delete it and run again (deepspeed.build_lock_wait_minutes sets the wait)")
        if not announced:
            log.warning("waiting up to %.0f s for %s (another process is building an extension)", wait_s, locks[0])
            announced = True
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _drop_zero3_globals() -> None:
    """ZeRO-3 keeps references that engine.destroy() leaves in place, each of which keeps the
    whole model (and so its parameters and optimizer state) alive into the next stage: the
    outermost module on a module-level stack, and a class-wide lru_cache keyed by modules."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK.clear()
    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(method, "__closure__", None) or ():  # under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves a 66 MiB /dev/shm file per rank behind,
    even on a clean exit, and /dev/shm is RAM: dozens of runs fill the machine. Every rank
    maps every buffer during init, so after a barrier each rank can drop its file's name;
    the mappings live on until the process ends, however it ends."""
    if not dist.is_initialized():
        return
    dist.barrier()
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_" \
           f"{os.environ.get('MASTER_PORT')}_{rank}"
    if os.path.exists(name):
        os.unlink(name)


def deepspeed_config(ds, t, world_size: int, precision: str, on_gpu: bool) -> dict:
    """The DeepSpeed config of the typed options, with deepspeed.extra merged in key by key
    (nested keys join their section, not replace it)."""
    zero = {"stage": ds.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps, "weight_decay": t.weight_decay,
            **optimizer_implementation(on_gpu, ds.offload_optimizer)}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    from omegaconf import OmegaConf

    extra = OmegaConf.to_container(ds.extra, resolve=True) if OmegaConf.is_config(ds.extra) else dict(ds.extra)
    return _merge(config, extra)


def optimizer_implementation(on_gpu: bool, offload: bool) -> dict:
    """torch's AdamW through DeepSpeed's pass-through (torch_adam), fused on CUDA: DeepSpeed's own
    FusedAdam is compiled with nvcc at the first step on every fresh machine (minutes, or a failure
    where nvcc, ninja or a known CUDA version is missing); torch's fused kernel ships built.
    With the optimizer offloaded DeepSpeed runs its CPU Adam instead."""
    if offload:
        return {"torch_adam": False}
    return {"torch_adam": True, **({"fused": True} if on_gpu else {})}


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    import math

    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


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
