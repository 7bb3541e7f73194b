"""Small helpers every layer shares; this module imports nothing from the package."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket

IGNORE = -100  # the label of a token that is not trained on (prompt, padding)


class UserError(Exception):
    """Something the user can fix (a config value, a data file, a checkpoint, the machine): the entry
    points print the message as one `error:` line and exit with status 2, no traceback."""


class Preempted(Exception):
    """A run stopped for a preemption or time-limit signal after saving a checkpoint: the entry points
    exit 0 for the requeue, and nothing after the stopped run (a stage-1 reference run's scoring, the
    next sweep point) starts."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key."""


def evenly_spaced(total_steps: int, count: int) -> list:
    """`count` evenly spaced steps of 1..total_steps, the last one at the end (export and scoring points)."""
    return sorted({round(total_steps * c / count) for c in range(1, count + 1)}) if count else []


def torch_dtype(name: str):
    """bf16 | fp16 | fp32 -> the torch dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def to_device(batch: dict, device) -> dict:
    """The tensors of a collated batch, on `device` (other entries are dropped). To a GPU through pinned
    memory without waiting: a copy from pageable memory waits until the device has run all it was given."""
    import torch

    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class OutOfSpace(UserError, OSError):
    """A write failed because its filesystem is full; what was there before is intact."""


def out_of_space(path: str, error: BaseException):
    """OutOfSpace naming `path` when `error` comes from a full filesystem: ENOSPC or EDQUOT, or any
    write error while under 64 MiB are free (torch.save and safetensors raise their own types);
    None otherwise."""
    import errno
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (full or (free is not None and free < (64 << 20))):
        return None
    room = f", {free >> 20} MiB free" if free is not None else ""
    return OutOfSpace(f"{path}: no space left on its filesystem ({folder}{room}): {error}; what was there before "
                      "is intact; free space and run again")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Write `path` whole or not at all: a temporary file beside it, renamed over it on success."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = out_of_space(path, e)
        if full is None:
            raise
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, obj, indent=None) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent)


def file_digest(path: str) -> str:
    """A fast checksum of a file's bytes (BLAKE2b, 128 bits), read in 4 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def process_alive(pid: str) -> bool:
    """Whether process `pid` (a string, possibly malformed) runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
