"""Run untrusted, model-written Python where it can harm nothing and forge no verdict.

Isolation (`isolation()`, probed once): every check runs under `unshare` in new
PID, mount, network and IPC namespaces, plus a user namespace when we are not
root. Inside, a trusted setup step remounts every filesystem read-only, pivots
into a new root that holds only the system's folders (/usr, /bin, /lib*, /etc,
/dev, /proc) and the interpreter's installation, so no file of the project or the
user (checkout, home, data, outputs) is there, mounts fresh size-capped tmpfs
over /tmp, /var/tmp and /dev/shm (the only writable places; the check's working
directory is in /tmp), hides the project's own data where it is installed
under /usr,
starts a new session keyring, installs a seccomp filter against unix sockets
and io_uring, drops to a fresh user id of no account (its own process limit and
keyrings) when run as root, and drops every capability; then the check runs with time, memory
(per process, and for all its processes together in a memory cgroup of its own where root can
make one), process-count and file-size limits, an empty environment and Python's isolated
mode. When the check's first process ends, the kernel kills every process left
in its PID namespace (daemons included), and its tmpfs files are gone with the
mount namespace. Output is read with a hard cap, so a flood of prints costs the
judge no memory.

A test verdict (`run_tests`) cannot be forged by the candidate's code: the
tests run in a trusted runner process that calls the candidate's function in a
second process over a pipe, passing arguments and results as pickles that may
hold only builtin values (no classes are loaded: a result with a rigged
`__eq__` cannot arrive). Only when `check(candidate)` has returned does the
runner write a random per-check token, which it received on a pipe of its own
and which no candidate process can read (the runner is not dumpable and holds
the pipes alone), to a verdict pipe. Any exit, signal, timeout, exception or
missing token is a fail.

Where the machine allows no namespaces (no root and no unprivileged user
namespaces), `isolation()` says why and callers refuse unless the user allows
unsandboxed code; the fallback keeps the limits and a process group only.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from ..common import UserError

log = logging.getLogger(__name__)
OUTPUT_CAP = 1 << 20  # bytes of a check's output kept; the rest is read and dropped
TMPFS_MB = 32  # each of /tmp, /var/tmp, /dev/shm inside the sandbox
# Hidden inside the sandbox: the project's own data, gold answers and canonical solutions included.
HIDDEN = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "builtin_data"),)

# Runs first inside the candidate's interpreter: sockets off (the network namespace is the real wall).
PRELUDE = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
del _s
"""

# Trusted: runs in the new namespaces before any untrusted code, then execs argv[2:].
SETUP = r"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
        "relatime": 1 << 21}
def mount(src, target, fstype, flags, data):
    if libc.mount(src, target.encode(), fstype, flags, data) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")
points = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        points.append((point, fields[5].split(",")))
for point, options in points:
    if "ro" in options or point == "/proc" or point.startswith(("/proc/", "/sys", "/dev")):
        continue
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for option in options:
        flags |= KEEP.get(option, 0)
    mount(None, point, None, flags, None)
# A new root holding the system's folders and the interpreter's, read-only (a bind keeps its source's
# flags): no file of the project, the user (home, checkout, data, outputs) or the machine's other
# folders is reachable. It is built on a tmpfs over /tmp, then pivoted into.
MS_REC, MNT_DETACH = 16384, 2
pivot_root = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
if pivot_root is None:
    raise OSError(f"the sandbox knows no pivot_root syscall of {os.uname().machine}")
interpreter = os.path.dirname(os.path.dirname(os.path.realpath(sys.argv[2])))  # PREFIX of PREFIX/bin/python
mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755")
for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/dev", "/proc", interpreter):
    if path == "/":  # an interpreter in /bin (or none): nothing more to keep
        continue
    target = "/tmp" + path
    if os.path.islink(path):  # merged /usr: /bin -> usr/bin
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path) and not os.path.exists(target):
        os.makedirs(target)
        mount(path.encode(), target, None, MS_BIND | MS_REC, None)
for point in ("/tmp/tmp", "/tmp/var/tmp"):
    os.makedirs(point)
os.chdir("/tmp")
if libc.syscall(ctypes.c_long(pivot_root), b".", b".") != 0 or libc.umount2(b".", MNT_DETACH) != 0:
    raise OSError(ctypes.get_errno(), f"pivot_root: {os.strerror(ctypes.get_errno())}")
os.chdir("/")
mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
for point in ("/tmp", "/var/tmp", "/dev/shm"):
    if os.path.isdir(point):
        mount(b"tmpfs", point, b"tmpfs", MS_NOSUID | MS_NODEV, f"size={sys.argv[1]}m,mode=1777".encode())
for hidden in filter(None, os.environ.pop("SANDBOX_HIDE", "").split(os.pathsep)):
    if os.path.isdir(hidden):  # gold answers shipped with the project: an empty, unreadable folder instead
        mount(b"tmpfs", hidden, b"tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, b"size=4k,mode=0")
os.makedirs("/tmp/work", mode=0o777)
os.chmod("/tmp/work", 0o777)
os.chdir("/tmp/work")
machine = os.uname().machine
# A new, empty session keyring (keyctl JOIN_SESSION_KEYRING); a container that filters keyctl away
# already keeps candidates from every keyring.
keyctl = {"x86_64": 250, "aarch64": 219}.get(machine)
if keyctl:
    libc.syscall(ctypes.c_long(keyctl), ctypes.c_int(1), ctypes.c_void_p(None))
# seccomp: no unix sockets (a filesystem socket outside /tmp, such as a system bus, is reachable
# through a read-only mount and across network namespaces), no io_uring (it makes sockets without
# socket()), and no other syscall ABI (x32, int 0x80) to go around the filter.
abi = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199)}.get(machine)
if abi is None:
    raise OSError(f"the sandbox's seccomp filter knows no syscalls of {machine}")
arch, socket_nr, socketpair_nr = abi
LD, JEQ, JGE, RET, DENY, ALLOW = 0x20, 0x15, 0x35, 0x06, 0x00050001, 0x7FFF0000  # DENY: errno EPERM
program = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, DENY), (LD, 0, 0, 0), (JGE, 5, 0, 0x40000000),
           (JEQ, 4, 0, 425), (JEQ, 1, 0, socket_nr), (JEQ, 0, 3, socketpair_nr), (LD, 0, 0, 16),
           (JEQ, 0, 1, 1), (RET, 0, 0, DENY), (RET, 0, 0, ALLOW)]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Program(len(program), ctypes.cast(code, ctypes.c_void_p))
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
    raise OSError(ctypes.get_errno(), f"seccomp: {os.strerror(ctypes.get_errno())}")
uid = os.environ.pop("SANDBOX_UID", "")
drop = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
os.execvp("setpriv", ["setpriv", *drop, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                      "--securebits=+noroot,+noroot_locked", "--",
                      *sys.argv[2:]])
"""

# The first thing each trusted script does (argv[1]: the start pipe): a runner that cannot start
# (an interpreter the sandboxed user cannot run, a failed mount) is then an error, not a failed verdict.
STARTED = "import os, sys; os.write(int(sys.argv[1]), b'1'); os.close(int(sys.argv[1]))\n"

# Runs a whole program read from stdin (run_python).
PROGRAM = STARTED + """\
import sys
source = sys.stdin.read()
sys.stdin.close()
del sys
exec(compile(PRELUDE + source, "check.py", "exec"), {"__name__": "__main__"})
""".replace("PRELUDE", repr(PRELUDE))

# The candidate's process in run_tests: its code, then calls of its function served over pipes.
CANDIDATE = """\
import os, pickle, struct, sys
inp, out = os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb")
def recv():
    head = inp.read(8)
    if len(head) < 8:
        raise SystemExit(0)
    return pickle.loads(inp.read(struct.unpack(">Q", head)[0]))
def send(obj):
    try:
        data = pickle.dumps(obj, 4)
    except Exception as e:
        data = pickle.dumps(("raise", "TypeError", f"result cannot be sent: {e}"), 4)
    out.write(struct.pack(">Q", len(data)) + data)
    out.flush()
source, entry_point = recv()
namespace = {"__name__": "__candidate__"}
exec(compile(PRELUDE + source, "candidate.py", "exec"), namespace)
fn = namespace[entry_point]
send(("ready",))
while True:
    args, kwargs = recv()
    try:
        send(("ok", fn(*args, **kwargs)))
    except BaseException as e:
        send(("raise", type(e).__name__, str(e)[:1000]))
""".replace("PRELUDE", repr(PRELUDE))

# Trusted: the tests' process in run_tests. argv: start fd, token fd, verdict fd; stdin: the job as JSON.
RUNNER = STARTED + """\
import builtins, ctypes, io, json, os, pickle, struct, subprocess, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: no process can read this one's memory or fds
token_fd, verdict_fd = int(sys.argv[2]), int(sys.argv[3])
token = os.read(token_fd, 64)
os.close(token_fd)
job = json.loads(sys.stdin.read())
to_r, to_w = os.pipe()
from_r, from_w = os.pipe()
child = subprocess.Popen([sys.executable, "-I", "-B", "-c", CANDIDATE, str(to_r), str(from_w)],
                         pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL)
os.close(to_r)
os.close(from_w)
to_child, from_child = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")

class BuiltinValues(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"the candidate returned a {module}.{name}: only builtin values count")

class CandidateFailed(Exception):
    pass

def call(message):
    data = pickle.dumps(message, 4)
    to_child.write(struct.pack(">Q", len(data)) + data)
    to_child.flush()
    head = from_child.read(8)
    if len(head) < 8:
        raise CandidateFailed("the candidate's process ended")
    return BuiltinValues(io.BytesIO(from_child.read(struct.unpack(">Q", head)[0]))).load()

def candidate(*args, **kwargs):
    reply = call((args, kwargs))
    if reply[0] == "ok":
        return reply[1]
    error = getattr(builtins, reply[1], None)
    if isinstance(error, type) and issubclass(error, Exception):
        raise error(reply[2])
    raise CandidateFailed(f"{reply[1]}: {reply[2]}")

try:
    if call((job["code"], job["entry_point"])) != ("ready",):
        raise CandidateFailed("the candidate's code did not load")
    namespace = {"__name__": "__tests__"}
    exec(job["helpers"], namespace)  # what the prompt defines besides the function (HumanEval: poly, ...)
    namespace[job["entry_point"]] = candidate  # tests may call it by name (HumanEval/33 does)
    exec(job["test"], namespace)
    namespace["check"](candidate)
except BaseException as e:
    print(f"tests failed: {type(e).__name__}: {e}"[:2000], file=sys.stderr)
    child.kill()
    os._exit(1)
child.kill()
os.write(verdict_fd, token)
os._exit(0)
""".replace("CANDIDATE, ", repr(CANDIDATE) + ", ")


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # ok | failed | timeout | crashed
    output: str


class SandboxUnavailable(UserError, RuntimeError):
    """This machine cannot isolate untrusted code, or the sandbox could not start; the message says why."""


@functools.lru_cache(maxsize=1)
def isolation() -> tuple:
    """(command prefix, the Python the sandboxed user can run, None) where namespaces work here,
    else (None, None, the reason)."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return None, None, "util-linux's unshare and setpriv are not on PATH"
    prefix = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net", "--ipc"]
    if os.geteuid() != 0:
        prefix += ["--user", "--map-root-user"]
    prefix += ["--", sys.executable, "-I", "-B", "-c", SETUP, str(TMPFS_MB)]
    env = {"PATH": "/usr/bin:/bin", **({"SANDBOX_UID": str(sandbox_uid())} if os.geteuid() == 0 else {})}
    # The check sees only the system's folders and its interpreter's installation, so a virtual environment's
    # interpreter (in a checkout) is replaced by the Python it was made from; an unprivileged user may not
    # reach that one either (say, under /root): the system's Python then serves.
    why = []
    for python in dict.fromkeys([os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                                 "/usr/bin/python3"]):
        # What run_tests needs: write in /tmp/work, and start this interpreter again from inside.
        probe = subprocess.run(prefix + [python, "-I", "-c", "import ctypes, json, pickle, subprocess, sys; "
                                         "open('/tmp/work/x', 'w').write('ok'); "
                                         "subprocess.run([sys.executable, '-I', '-c', 'pass'], check=True)"],
                               capture_output=True, text=True, env=env, timeout=60)
        if probe.returncode == 0:
            return prefix, python, None
        why.append(f"{python}: {(probe.stderr.strip().splitlines() or [f'exit status {probe.returncode}'])[-1]}")
    return None, None, f"namespaces are not available here, or no interpreter runs in them ({'; '.join(why)})"


def sandbox_uid() -> int:
    """A user id of no account, fresh for each check: its process limit (RLIMIT_NPROC counts a user's
    processes) and its kernel keyring are its own, so one candidate's fork storm or stored key
    never reaches another check running at the same time."""
    return 1 << 20 | secrets.randbelow(1 << 30)


def memory_cgroup(memory_mb: int) -> Optional[str]:
    """A fresh memory cgroup capping one check's processes together at memory_mb (RLIMIT_AS caps
    each process alone, so forked children could each take that much), where this process can make
    one: root, with cgroup v1's memory controller or a cgroup v2 one writable; None elsewhere."""
    if os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.split(":", 2) for line in f.read().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    v1 = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    v2 = [path for hierarchy, controllers, path in lines if hierarchy == "0" and not controllers]
    if v1:
        base, limits = os.path.join("/sys/fs/cgroup/memory", v1[0].lstrip("/")), ("memory.limit_in_bytes",
                                                                                  "memory.memsw.limit_in_bytes")
    elif v2:
        base, limits = os.path.join("/sys/fs/cgroup", v2[0].lstrip("/")), ("memory.max", "memory.swap.max")
    else:
        return None
    folder = os.path.join(base, f"sftmix-check-{secrets.token_hex(6)}")
    try:
        os.mkdir(folder)
        with open(os.path.join(folder, limits[0]), "w") as f:
            f.write(str(memory_mb << 20))
    except OSError:
        _remove_cgroup(folder)
        return None
    try:  # swap counted too where the kernel accounts it (v1: memory + swap; v2: swap alone)
        with open(os.path.join(folder, limits[1]), "w") as f:
            f.write(str(memory_mb << 20) if limits[1].startswith("memory.memsw") else "0")
    except OSError:
        pass
    return folder


def _remove_cgroup(folder: Optional[str]) -> None:
    """rmdir a check's cgroup once its processes are gone (their exit is asynchronous: retry briefly)."""
    for _ in range(50) if folder else ():
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _limits(timeout_s: float, memory_mb: int, max_procs: int, cgroup: Optional[str] = None):
    def apply():
        if cgroup:
            try:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))  # every process of the check is born in it
            except OSError:
                pass
        os.setsid()  # its own process group, so a timeout kills every child too
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout_s) + 1, int(timeout_s) + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _run(script: str, script_args: tuple, stdin: bytes, timeout_s: float, memory_mb: int, max_procs: int,
         allow_unsandboxed: bool, pass_fds: tuple = ()) -> tuple:
    """Run a trusted `script` (which starts with STARTED) isolated, with argv[1] its start pipe and
    `script_args` after it; returns (exit status or None on timeout, capped output). Raises
    SandboxUnavailable when the script never started."""
    prefix, python, why_not = isolation()
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp/work"}
    workdir = cgroup = None
    start_r, start_w = os.pipe()
    argv = ["-I", "-B", "-c", script, str(start_w), *map(str, script_args)]
    if prefix is None:
        if not allow_unsandboxed:
            os.close(start_r)
            os.close(start_w)
            raise SandboxUnavailable(f"cannot sandbox model-written code: {why_not}; run as root, enable "
                                     "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), or "
                                     "accept the risk with method.allow_unsandboxed_code=true "
                                     "(eval.allow_unsandboxed_code=true for evaluation)")
        log.warning("running model-written code WITHOUT a sandbox (allow_unsandboxed_code=true): it can read and "
                    "write your files and reach the network; only limits and a process group apply")
        workdir = tempfile.mkdtemp(prefix="sftmix-unsandboxed-")
        env["HOME"] = workdir
        cmd = [sys.executable, *argv]
    else:
        cmd = prefix + [python, *argv]
        cgroup = memory_cgroup(memory_mb)
        env["SANDBOX_HIDE"] = os.pathsep.join(HIDDEN)
        if os.geteuid() == 0:
            env["SANDBOX_UID"] = str(sandbox_uid())
    try:
        proc = subprocess.Popen(cmd, cwd=workdir or "/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, pass_fds=(start_w, *pass_fds),
                                preexec_fn=_limits(timeout_s, memory_mb, max_procs, cgroup))
        os.close(start_w)
        start_w = None
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        output, timed_out = _read_capped(proc.stdout, time.monotonic() + timeout_s)
        _kill_group(proc)
        if not _read_now(start_r):
            who = f"uid {env['SANDBOX_UID']}" if env.get("SANDBOX_UID") else "this user"
            raise SandboxUnavailable(f"the sandbox did not start {cmd[len(prefix or [])]} as {who} "
                                     f"({'timed out' if timed_out else f'exit status {proc.returncode}'}): "
                                     f"{output.strip()[-1000:] or 'no output'}")
        return (None if timed_out else proc.returncode), output
    finally:
        for fd in (start_r, start_w):
            if fd is not None:
                os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        _remove_cgroup(cgroup)


def _read_now(fd: int) -> bytes:
    """What a pipe holds now, without waiting (its writers may still hold it open)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""


def _read_capped(stream, deadline: float) -> tuple:
    """Everything the process writes until it closes its output or the deadline passes; only the
    last OUTPUT_CAP bytes are kept. Returns (text, timed out)."""
    kept, size = collections.deque(), 0
    fd = stream.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b"".join(kept).decode("utf-8", "replace"), True
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(kept).decode("utf-8", "replace"), False
        kept.append(chunk)
        size += len(chunk)
        while size - len(kept[0]) >= OUTPUT_CAP:
            size -= len(kept.popleft())


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_procs: int = 64,
               allow_unsandboxed: bool = False) -> SandboxResult:
    """Run a whole program; passed means it exited 0 within the limits. For a test verdict that
    a wrong answer cannot forge, use run_tests."""
    status, output = _run(PROGRAM, (), code.encode(), timeout_s, memory_mb, max_procs, allow_unsandboxed)
    return _result(status, status == 0, output)


def run_tests(code: str, test: str, entry_point: str, helpers: str = "", timeout_s: float = 10.0,
              memory_mb: int = 1024, max_procs: int = 64, allow_unsandboxed: bool = False) -> SandboxResult:
    """`test` defines check(candidate) (HumanEval layout); passed means check(the candidate's
    `entry_point`) returned and the runner then wrote this check's token. `helpers`: trusted code
    the tests may call (the prompt's other definitions)."""
    token = secrets.token_hex(16).encode()
    token_r, token_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    job = json.dumps({"code": code, "test": test, "entry_point": entry_point, "helpers": helpers}).encode()
    try:
        status, output = _run(RUNNER, (token_r, verdict_w), job, timeout_s, memory_mb, max_procs,
                              allow_unsandboxed, pass_fds=(token_r, verdict_w))
        os.close(verdict_w)
        verdict_w = None
        verdict = _read_now(verdict_r)
    finally:
        for fd in (token_r, verdict_w, verdict_r):
            if fd is not None:
                os.close(fd)
    return _result(status, status == 0 and secrets.compare_digest(verdict, token), output)


def _result(status: Optional[int], passed: bool, output: str) -> SandboxResult:
    if status is None:
        return SandboxResult(False, "timeout", output[-2000:])
    reason = "ok" if passed else "crashed" if status < 0 else "failed"
    return SandboxResult(passed, reason, output[-2000:])
