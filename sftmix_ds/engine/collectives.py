"""This process's place in the job and the collectives every stage uses.

One `Collectives` per process, for the whole run: rank and world size from the launcher, the
device and dtype, the process group (through DeepSpeed, so its engines find it), and the host
collectives. Engines (engine/strategy.py) come and go with the stages; generation and judging
(S3FT, evaluation) need only this.
"""
from __future__ import annotations

import logging
import os
import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..common import UserError, free_port, torch_dtype
from ..config import resolve_precision
from .peers import watch_peers
from .sequence import sequence_group

log = logging.getLogger(__name__)


class Collectives:
    def __init__(self, ds_cfg, precision: str, sequence_parallel: int = 1):
        """ds_cfg: the deepspeed config group (timeouts); precision: train.precision;
        sequence_parallel: train.sequence_parallel (ranks per sequence; the others see whole ones)."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.rank, self.local_rank, self.world_size = dist_env()
        accel = get_accelerator()
        self.on_gpu = accel.device_name() == "cuda"
        self.device = torch.device("cpu")
        if self.on_gpu:
            index = device_index(self.local_rank, accel.device_count())
            accel.set_device(index)
            self.device = torch.device(accel.device_name(index))
        self.precision = resolve_precision(precision)
        self.dtype = torch_dtype(self.precision)
        wait_for_build_locks(ds_cfg.build_lock_wait_minutes * 60)
        deepspeed.init_distributed(timeout=timedelta(minutes=ds_cfg.timeout_minutes))
        watch_peers(self.rank, self.world_size, ds_cfg.peer_timeout_s)
        _unlink_shm_buffer(self.rank)
        # Data parallelism is over groups of sequence_parallel consecutive ranks, which share each micro-batch.
        self.sequence_parallel = sequence_parallel
        self.data_parallel_size = self.world_size // sequence_parallel
        self.data_parallel_rank = self.rank // sequence_parallel
        self.sequence = sequence_group(sequence_parallel, self.rank, self.world_size) if sequence_parallel > 1 else None

    def sum_on_device(self, values: dict) -> dict:
        """{name: 0-d float64 tensor on this rank's device}: the values (0-d tensors or numbers) summed
        over ranks in one collective, with nothing read back on the host. The numbers travel in one
        pinned, non-blocking copy (a copy from pageable memory would wait for the device's queue)."""
        numbers = [k for k, v in values.items() if not isinstance(v, torch.Tensor)]
        parts = {k: v.to(torch.float64).reshape(()) for k, v in values.items() if isinstance(v, torch.Tensor)}
        if numbers:
            host = torch.tensor([float(values[k]) for k in numbers], dtype=torch.float64)
            host = host.pin_memory().to(self.device, non_blocking=True) if self.on_gpu else host
            parts.update(zip(numbers, host.unbind()))
        stacked = torch.stack([parts[k] for k in values])
        dist.all_reduce(stacked)
        return dict(zip(values, stacked.unbind()))

    def read(self, values: dict) -> dict:
        """{name: float} of 0-d tensors, numbers and Nones, the tensors brought to the host in one copy per
        device they are on (a device's copy is a host-device synchronisation, however many values)."""
        out = {k: None if v is None else float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
        by_device = {}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, {})[k] = v.detach().reshape(()).double()
        for tensors in by_device.values():
            out.update(zip(tensors, torch.stack(list(tensors.values())).tolist()))
        return {k: out[k] for k in values}

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (so all ranks take the same branch)."""
        return self.read(self.sum_on_device({"flag": float(flag)}))["flag"] > 0

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


def after_rank0_wrote(path: str, timeout_s: float = 600.0) -> None:
    """Return on every rank once rank 0 has written `path` (whole: written by rename): a barrier in
    the process group, and before there is one (a stage run before any engine starts, where a
    barrier would be a no-op) a bounded wait for the file to appear."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return
    rank, _, world_size = dist_env()
    deadline = time.monotonic() + timeout_s
    while rank != 0 and world_size > 1 and not os.path.exists(path):
        if time.monotonic() > deadline:
            raise UserError(f"{path}: rank 0 has not written it after {timeout_s:.0f} s; its log says why")
        time.sleep(0.2)


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment: the deepspeed or
    torchrun launcher (RANK...), Slurm's srun (SLURM_PROCID...), or a plain
    `python launch/train.py`, which becomes a one-process group."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        # srun: one task per device (launch/slurm/train.sbatch, or a submitit sweep point).
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          WORLD_SIZE=os.environ["SLURM_NTASKS"])
        os.environ.setdefault("MASTER_ADDR", first_host(os.environ["SLURM_JOB_NODELIST"]))
        # Stable across a requeue (the job id is kept), distinct between jobs that share a node.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("node[03-08,11],gpu2" -> "node03"), as
    `scontrol show hostnames` would say it."""
    found = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
    if found is None:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r}: not a Slurm node list")
    return found.group(1) + (found.group(2) or "")


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
