"""Fault injection for the reliability tests, through SFTMIX_FAULT=POINT:RANK:STEP.

after_step and in_save (checkpoint files written, not yet marked complete) make that
rank die by SIGKILL (no clean-up, as under the OOM killer or a node failure);
nan_loss makes its loss NaN; usr1 sends that rank SIGUSR1 after the step (a time-limit warning);
enospc fails its checkpoint write (enospc_eval: the evaluation's
results); slow_publish:RANK:0 delays that rank's write of a stage's published file by DELAY_S
(so readers on other ranks come first);
slow_build:RANK:0 delays that process's build of a shared cache (token cache, model folder) while it
holds the build lock (RANK from the environment: these run before any process group).
Unset, this does nothing."""
import errno
import os
import signal
import time

DELAY_S = 5.0


def _armed(point: str, rank: int, step: int) -> bool:
    """SFTMIX_FAULT=POINT:RANK:STEP, or POINT:RANK:FIRST-LAST for a run of steps."""
    spec = os.environ.get("SFTMIX_FAULT", "")
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != point or parts[1] != str(rank):
        return False
    first, _, last = parts[2].partition("-")
    return int(first) <= step <= int(last or first)


def maybe_die(point: str, rank: int, step: int) -> None:
    if _armed(point, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(rank: int, step: int) -> None:
    if _armed("usr1", rank, step):
        os.kill(os.getpid(), signal.SIGUSR1)


def maybe_delay(point: str, rank: int, step: int) -> None:
    if _armed(point, rank, step):
        time.sleep(DELAY_S)


def maybe_delay_build() -> None:
    maybe_delay("slow_build", int(os.environ.get("RANK", "0")), 0)


def maybe_disk_full(rank: int, step: int, point: str = "enospc") -> None:
    """enospc: the checkpoint write fails as on a full disk (enospc_eval:RANK:0: the evaluation's results)."""
    if _armed(point, rank, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def maybe_poison(values, rank: int, step: int):
    """SFTMIX_FAULT=nan_loss:RANK:STEP turns that rank's loss values (a tensor) at STEP into NaN."""
    return values.new_full(values.shape, float("nan")) if _armed("nan_loss", rank, step) else values
