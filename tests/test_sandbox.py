"""Hostile candidates against the python_tests verdict: each is a wrong answer to HumanEval/0
with a trick that used to make it pass, or that reaches outside its check. Every one must be
judged wrong and leave nothing behind (no files outside its temp dir, no processes, no
connections), as root and as an unprivileged user (where this machine can make one)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from sftmix_ds.inference.judges import python_tests

from .helpers import ROOT

MARK = "sftmix-hostile"  # in every file name and process name a candidate leaves, so the test can look for it
WRONG = "def has_close_elements(numbers, threshold):\n    return False\n"
HOSTILE = {
    "os._exit(0) at module level": WRONG + "import os\nos._exit(0)\n",
    "sys.exit(0) at module level": WRONG + "import sys\nsys.exit(0)\n",
    "sys.exit(main()) ending": WRONG + "def main():\n    return 0\nimport sys\nsys.exit(main())\n",
    "SystemExit(0) in the function": "def has_close_elements(numbers, threshold):\n    raise SystemExit(0)\n",
    "atexit handler exits 0": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "excepthook exits 0": WRONG + "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "thread exits 0 after main": WRONG + (
        "import os, threading\n"
        "main = threading.main_thread()\n"
        "threading.Thread(target=lambda: (main.join(), os._exit(0))).start()\n"),
    "__eq__ always true": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __ne__ = lambda s, o: False\n"
        "    __bool__ = lambda s: True\n"
        "def has_close_elements(numbers, threshold):\n    return Yes()\n"),
    "bool subclass result": (
        "class B(int):\n    def __eq__(self, other):\n        return True\n"
        "def has_close_elements(numbers, threshold):\n    return B(0)\n"),
    "settrace skips failing lines": WRONG + (
        "import sys\n"
        "def skip(frame, event, arg):\n    frame.f_trace_lines = True\n    return skip\n"
        "sys.settrace(skip)\n"),
    "reads the expected value from the caller's frame": (
        "import sys\n"
        "def has_close_elements(numbers, threshold):\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        for v in f.f_locals.values():\n"
        "            if isinstance(v, bool):\n"
        "                return v\n"
        "        f = f.f_back\n"
        "    return False\n"),
    "redefines check": WRONG + "def check(candidate):\n    pass\nimport builtins\nbuiltins.check = check\n",
    "monkeypatches the harness": WRONG + (
        "import builtins\n"
        "builtins.AssertionError = type('Nope', (Exception,), {})\n"
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n        os.write(fd, b'0' * 32)\n    except OSError:\n        pass\n"),
    "prints fake PASS markers": WRONG + "print('PASS\\nall tests passed\\nOK')\nprint('0' * 32)\n",
    "hunts the token in /proc": WRONG + (
        "import os\n"
        "for pid in os.listdir('/proc'):\n"
        "    if not pid.isdigit():\n        continue\n"
        "    for path in ('/proc/%s/fd' % pid, '/proc/%s/mem' % pid, '/proc/%s/environ' % pid):\n"
        "        try:\n"
        "            for fd in os.listdir(path):\n"
        "                with open(os.path.join(path, fd), 'wb') as f:\n                    f.write(b'x' * 32)\n"
        "        except OSError:\n            pass\n"),
    "lingering setsid daemon": WRONG + (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        import ctypes\n"
        f"        ctypes.CDLL(None).prctl(15, b'{MARK}', 0, 0, 0)  # PR_SET_NAME, for the test to find it\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"),
    "writes outside its directory": WRONG + "".join(
        f"try:\n    open('{d}/{MARK}', 'w').write('x')\nexcept OSError:\n    pass\n"
        for d in ("/tmp", "/dev/shm", "/var/tmp", ROOT, os.path.expanduser("~"))),
    "fills the disk": WRONG + (
        "import os\n"
        "for i in range(64):\n"
        f"    try:\n        open('/tmp/{MARK}-%d' % i, 'wb').write(b'x' * (8 << 20))\n"
        "    except OSError:\n        break\n"),
    "reaches a listener on 127.0.0.1": WRONG + (
        "import _socket\n"
        "s = _socket.socket()\n"
        "s.settimeout(2)\n"
        "s.connect(('127.0.0.1', PORT))\n"
        "s.sendall(b'{\"id\": \"x\", \"source\": \"own\"}\\n')\n"),
    "connects to a unix socket outside /tmp": WRONG + (
        "import _socket\n"
        "s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
        "s.connect('SOCKPATH')\n"
        "s.sendall(b'{\"id\": \"x\", \"source\": \"own\"}\\n')\n"),
    "copies the canonical solution from the checkout": (
        "import json\n"
        "for line in open('GOLDPATH'):\n"
        "    record = json.loads(line)\n"
        "    if record['entry_point'] == 'has_close_elements':\n"
        "        fence = chr(96) * 3  # no literal fence: the candidate itself arrives fenced\n"
        "        exec(record['completion'].split(fence + 'python', 1)[1].split(fence)[0])\n"
        "        break\n"),
    "copies the canonical solution from the project's checkout": (
        "import json\n"
        "for line in open('CHECKOUTPATH'):\n"
        "    record = json.loads(line)\n"
        "    if record['entry_point'] == 'has_close_elements':\n"
        "        fence = chr(96) * 3\n"
        "        exec(record['completion'].split(fence + 'python', 1)[1].split(fence)[0])\n"
        "        break\n"),
    "writes to inherited descriptors": WRONG + (
        "import os\n"
        "for fd in range(3, 256):\n"
        "    try:\n        os.write(fd, b'{\"source\": \"own\"}\\n')\n    except OSError:\n        pass\n"),
}


def needs_sandbox():
    from sftmix_ds.inference.sandbox import isolation

    if isolation()[0] is None:
        pytest.skip(f"this machine cannot sandbox code ({isolation()[2]}); python_tests is refused here, as "
                    "test_no_sandbox_refuses_code_unless_allowed checks")


@pytest.fixture(scope="module")
def problem():
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "humaneval.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["entry_point"] == "has_close_elements"
    return record


def leftovers() -> list:
    found = [os.path.join(d, n) for d in ("/tmp", "/dev/shm", "/var/tmp", ROOT, os.path.expanduser("~"))
             if os.path.isdir(d) for n in os.listdir(d) if n.startswith(MARK)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == MARK[:15]:
                    found.append(f"process {pid}")
        except OSError:
            pass
    return found


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_candidate_is_judged_wrong_and_leaves_nothing(name, problem, tmp_path, monkeypatch):
    from sftmix_ds.inference import sandbox

    needs_sandbox()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    # A filesystem socket anyone may connect to (as a system bus's is), outside the sandbox's /tmp.
    sockets = tempfile.mkdtemp(dir="/run" if os.access("/run", os.W_OK) else ROOT, prefix=MARK)
    os.chmod(sockets, 0o755)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(os.path.join(sockets, "bus"))
    os.chmod(os.path.join(sockets, "bus"), 0o777)
    unix.listen(1)
    unix.setblocking(False)
    # The project's data in a checkout anyone may read (the suite's own may sit in a 0700 folder).
    gold = os.path.join(sockets, "builtin_data")
    shutil.copytree(os.path.join(ROOT, "sftmix_ds", "builtin_data"), gold, ignore=shutil.ignore_patterns("*_tokenizer"))
    for folder, _, files in os.walk(sockets):
        os.chmod(folder, 0o755)
    os.chmod(os.path.join(gold, "humaneval.jsonl"), 0o644)
    monkeypatch.setattr(sandbox, "HIDDEN", (gold,))
    targets = tmp_path / "targets.jsonl"
    targets.write_text("")
    held = os.open(targets, os.O_WRONLY | os.O_APPEND)  # as an open targets file would be
    os.set_inheritable(held, True)
    try:
        code = HOSTILE[name].replace("PORT", str(listener.getsockname()[1])).replace(
            "SOCKPATH", os.path.join(sockets, "bus")).replace("GOLDPATH", os.path.join(gold, "humaneval.jsonl"))
        code = code.replace("CHECKOUTPATH", os.path.join(ROOT, "sftmix_ds", "builtin_data", "humaneval.jsonl"))
        assert not python_tests(problem, f"```python\n{code}```", timeout_s=5)
        for server in (listener, unix):
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        os.close(held)
        listener.close()
        unix.close()
        shutil.rmtree(sockets)
    assert targets.read_text() == ""
    assert leftovers() == []
    assert python_tests(problem, problem["completion"])  # the next checks are judged normally
    assert not python_tests(problem, WRONG)


@pytest.mark.e2e
def test_judge_memory_stays_bounded_whatever_the_candidate_prints(problem):
    """A 400 MiB print: the judge's peak memory grows by less than 64 MiB (fresh process, so its
    peak is its own)."""
    needs_sandbox()
    code = ("import resource, json\n"
            "from sftmix_ds.inference.judges import python_tests\n"
            f"record = json.loads({json.dumps(json.dumps(problem))})\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "flood = 'import sys\\nfor _ in range(400):\\n    sys.stdout.write(\"x\" * (1 << 20))\\n'\n"
            "assert not python_tests(record, flood + record['completion'].replace('```python', '').replace('```', '')"
            ".replace('return False', 'return None'), timeout_s=30)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 64


NOBODY_TABLE = """
import json, sys, types
job = json.loads(sys.stdin.read())
# The package's modules sandbox.py needs, from the job's sources: nobody may not read the checkout.
for name, (path, source) in job["sources"].items():
    module = sys.modules[name] = types.ModuleType(name)
    module.__path__, module.__package__, module.__file__ = [], name.rpartition(".")[0], path
    exec(compile(source, name, "exec"), module.__dict__)
sandbox = sys.modules["sftmix_ds.inference.sandbox"]
if sandbox.isolation()[0] is None:
    print(json.dumps({"unavailable": sandbox.isolation()[2]}))
    raise SystemExit(0)
verdicts = {name: sandbox.run_tests(code, job["test"], job["entry_point"], helpers=job["stub"], timeout_s=5).passed
            for name, code in job["cases"].items()}
print(json.dumps(verdicts))
"""


@pytest.mark.e2e
def test_hostile_candidates_as_an_unprivileged_user(problem):
    """The same table with the judge itself running as nobody: user namespaces instead of root."""
    if os.geteuid() != 0:
        pytest.skip("the suite does not run as root, so it is already the unprivileged case")
    python = "/usr/bin/python3"  # nobody cannot always reach this venv's interpreter; sandbox.py needs the stdlib only
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is missing: no interpreter an unprivileged user can run")
    cases = {n: c.replace("PORT", "9").replace("SOCKPATH", "/run/nonexistent").replace(
        "GOLDPATH", os.path.join(ROOT, "sftmix_ds", "builtin_data", "humaneval.jsonl")).replace(
        "CHECKOUTPATH", os.path.join(ROOT, "sftmix_ds", "builtin_data", "humaneval.jsonl")) for n, c in HOSTILE.items()}
    cases["the gold solution"] = problem["completion"].split("```python\n", 1)[1].rsplit("```", 1)[0]
    sources = {"sftmix_ds": "", "sftmix_ds.common": "common.py", "sftmix_ds.inference": "",
               "sftmix_ds.inference.sandbox": "inference/sandbox.py"}
    for name, path in sources.items():
        path = os.path.join(ROOT, "sftmix_ds", path or "__init__.py")
        with open(path) as f:
            sources[name] = (path, f.read() if name in ("sftmix_ds.common", "sftmix_ds.inference.sandbox") else "")
    job = {"test": problem["test"], "entry_point": problem["entry_point"], "stub": problem["stub"], "cases": cases,
           "sources": sources}
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                           NOBODY_TABLE], input=json.dumps(job), capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = json.loads(proc.stdout.splitlines()[-1])
    if "unavailable" in verdicts:
        pytest.skip(f"no unprivileged sandbox on this machine: {verdicts['unavailable']}")
    assert verdicts.pop("the gold solution") is True
    assert [n for n, passed in verdicts.items() if passed] == []
    assert leftovers() == []


def private_venv(folder) -> str:
    """An interpreter in a folder only root can enter (mode 0700, like /root or a mktemp -d checkout),
    laid out as a venv over this one; returns its path."""
    folder.mkdir(mode=0o700)
    os.mkdir(folder / "bin")
    os.symlink(os.path.realpath(sys.executable), folder / "bin" / "python")
    venv = os.path.dirname(os.path.dirname(sys.executable))
    if os.path.exists(os.path.join(venv, "pyvenv.cfg")):
        shutil.copy(os.path.join(venv, "pyvenv.cfg"), folder / "pyvenv.cfg")
        os.symlink(os.path.join(venv, "lib"), folder / "lib")
    shutil.copytree(os.path.join(ROOT, "sftmix_ds"), folder / "sftmix_ds",
                    ignore=shutil.ignore_patterns("__pycache__", "builtin_data"))
    return str(folder / "bin" / "python")


@pytest.mark.e2e
def test_the_judge_works_from_a_folder_nobody_can_read(problem, tmp_path):
    """The project and its interpreter under a 0700 folder, the judge run as root: the sandbox drops to
    nobody, who can read neither, and still judges (it needs no file of the project's)."""
    if os.geteuid() != 0:
        pytest.skip("only root drops to nobody")
    needs_sandbox()
    python = private_venv(tmp_path / "private")
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(tmp_path / 'private')!r})\n"
            "from sftmix_ds.inference.judges import python_tests\n"
            "record = json.loads(sys.stdin.read())\n"
            "print(json.dumps([python_tests(record, record['completion']), python_tests(record, sys.argv[1])]))\n")
    proc = subprocess.run([python, "-I", "-c", code, WRONG], input=json.dumps(problem), capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [True, False]


def test_a_sandbox_that_cannot_start_is_an_error_not_a_verdict(problem, monkeypatch):
    """An interpreter the sandboxed user cannot run: the check raises, naming it and the cause, where
    it used to count as a wrong answer."""
    from sftmix_ds.inference import sandbox

    needs_sandbox()
    prefix = sandbox.isolation()[0]
    monkeypatch.setattr(sandbox, "isolation", lambda: (prefix, "/nonexistent/python3", None))
    with pytest.raises(sandbox.SandboxUnavailable, match="did not start /nonexistent/python3 .*No such file"):
        python_tests(problem, problem["completion"])
    with pytest.raises(sandbox.SandboxUnavailable, match="did not start /nonexistent/python3"):
        sandbox.run_python("print(1)")





def test_no_sandbox_refuses_code_unless_allowed(problem, monkeypatch):
    from sftmix_ds.inference import judges, sandbox

    monkeypatch.setattr(sandbox, "isolation", lambda: (None, None, "namespaces are not available here (test)"))
    monkeypatch.setattr(judges, "isolation", sandbox.isolation)
    with pytest.raises(ValueError, match="cannot sandbox it .*allow_unsandboxed_code=true"):
        judges.check_judge_name("python_tests", llm_ok=False)
    judges.check_judge_name("python_tests", llm_ok=False, allow_unsandboxed_code=True)
    with pytest.raises(sandbox.SandboxUnavailable, match="method.allow_unsandboxed_code=true"):
        python_tests(problem, problem["completion"])
    # Allowed: no isolation, but still limits and the token verdict.
    assert python_tests(problem, problem["completion"], allow_unsandboxed=True)
    assert not python_tests(problem, HOSTILE["os._exit(0) at module level"], allow_unsandboxed=True)
    assert not python_tests(problem, HOSTILE["__eq__ always true"], allow_unsandboxed=True)


def test_checks_share_no_keyring(problem):
    """Check A stores a key in its user and session keyrings; check B, later, finds neither."""
    import platform

    from sftmix_ds.inference.sandbox import run_python

    needs_sandbox()
    if platform.machine() != "x86_64":
        pytest.skip("the syscall numbers below are x86_64's")
    keys = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    add = keys + "print([libc.syscall(248, b'user', b'sftmix-hostile', b'secret', 6, ring) for ring in (-4, -3)])\n"
    find = keys + "print([libc.syscall(250, 10, ring, b'user', b'sftmix-hostile', 0) for ring in (-4, -3)])\n"
    assert run_python(add).passed
    found = run_python(find)
    assert found.passed and found.output.strip() == "[-1, -1]", found.output


def test_a_fork_storm_does_not_starve_a_check_running_beside_it(problem):
    """One candidate holds every process its limit allows; a gold answer judged meanwhile still
    passes (each check runs as its own user id, so the process limits are separate)."""
    import threading

    from sftmix_ds.inference.sandbox import run_python

    needs_sandbox()
    storm = ("import os, time\n"
             "while True:\n"
             "    try:\n"
             "        if os.fork() == 0:\n            time.sleep(8)\n            os._exit(0)\n"
             "    except OSError:\n        break\n"
             "print('full', flush=True)\n"
             "time.sleep(8)\n")
    storming = threading.Thread(target=run_python, args=(storm,), kwargs={"timeout_s": 10})
    storming.start()
    try:
        import time

        time.sleep(2)  # the storm has taken its processes
        assert python_tests(problem, problem["completion"])
    finally:
        storming.join()


def test_memory_split_over_forked_children_is_capped_for_the_whole_check():
    """Four children each allocate 200 MiB under memory_mb=400: each stays within its own RLIMIT_AS,
    together they exceed the check's memory, which a per-check cgroup caps (where one can be made)."""
    from sftmix_ds.inference.sandbox import memory_cgroup, run_python

    needs_sandbox()
    probe = memory_cgroup(16)
    if probe is None:
        pytest.skip("no memory cgroup can be made here (not root, or no writable memory controller); "
                    "docs/reliability.md gives the residual bound")
    os.rmdir(probe)
    bomb = ("import os, time\n"
            "kids = []\n"
            "for _ in range(4):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        block = bytearray(200 << 20)\n"
            "        for i in range(0, len(block), 4096):\n            block[i] = 1  # touch every page\n"
            "        time.sleep(3)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n"
            "held = [os.waitpid(pid, 0)[1] for pid in kids]\n"
            "print('ALL HELD' if all(status == 0 for status in held) else 'CAPPED', held)\n")
    result = run_python(bomb, timeout_s=20, memory_mb=400)
    assert "ALL HELD" not in result.output and "CAPPED" in result.output, result.output
    assert run_python("block = bytearray(100 << 20)\nprint('ok')", memory_mb=400).output.strip() == "ok"
