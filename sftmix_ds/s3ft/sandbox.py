"""Run untrusted, model-written Python in a separate process that can harm nothing else.

Each check gets: a fresh temporary working directory (deleted afterwards), a
wall-clock and CPU time limit, an address-space limit, a process-count limit
(fork bombs), an empty environment, Python's isolated mode, no network (a new
network namespace via `unshare -n` where the machine allows it; sockets are
disabled inside the interpreter in any case), and, when we run as root, an
unprivileged user (nobody), so files outside the directory cannot be written
and the process limit is enforced.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NOBODY = 65534
# Runs before the user's code, inside the sandboxed interpreter.
PRELUDE = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
del _s
"""


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # ok | failed | timeout | crashed
    output: str


@functools.lru_cache(maxsize=1)
def _wrapper() -> list:
    """The command prefix that adds a network namespace and drops to nobody, where possible."""
    prefix = []
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["unshare", "-n", "--"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        prefix += ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    return prefix


def _limits(timeout_s: float, memory_mb: int, max_procs: int):
    def apply():
        os.setsid()  # its own process group, so a timeout kills every child too
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout_s) + 1, int(timeout_s) + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_procs: int = 64) -> SandboxResult:
    """Run `code`; passed means it exited 0 within the limits."""
    workdir = tempfile.mkdtemp(prefix="sftmix-sandbox-")
    try:
        os.chmod(workdir, 0o777)  # writable by the unprivileged user; nothing else is
        path = os.path.join(workdir, "check.py")
        with open(path, "w") as f:
            f.write(PRELUDE + code)
        cmd = _wrapper() + [sys.executable, "-I", "-B", path]
        proc = subprocess.Popen(cmd, cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": workdir},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_limits(timeout_s, memory_mb, max_procs))
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult(False, "timeout", "")
        finally:
            _kill_group(proc)  # children it left behind
        text = out.decode("utf-8", "replace")[-2000:]
        if proc.returncode == 0:
            return SandboxResult(True, "ok", text)
        return SandboxResult(False, "failed" if proc.returncode > 0 else "crashed", text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
