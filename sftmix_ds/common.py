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


def evenly_spaced(total_steps: int, count: int) -> list:
    """`count` evenly spaced steps of 1..total_steps, the last one at the end (export and scoring points)."""
    return sorted({round(total_steps * c / count) for c in range(1, count + 1)}) if count else []


def torch_dtype(name: str):
    """bf16 | fp16 | fp32 -> the torch dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def to_device(batch: dict, device) -> dict:
    """The tensors of a collated batch, on `device` (other entries are dropped)."""
    import torch

    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Write `path` whole or not at all: a temporary file beside it, renamed over it on success."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
