"""A Slurm cluster of several hosts on this machine, for the tests.

Each node is a network and UTS namespace of its own: hostname node1, node2..., an address on a
bridge in the head namespace, where slurmctld runs and every client command (sbatch, scontrol)
is run. All of them read one hosts file (bind-mounted over /etc/hosts in a private mount
namespace), so node names resolve everywhere. Everything the cluster starts (daemons, job steps,
ranks) lives in these namespaces, so stop() reaps it all by namespace, and a lost node is made by
cutting its link and killing every process in it.

Needs root, iproute2, util-linux (nsenter, unshare) and Debian's slurmctld, slurmd and
slurm-client; `unavailable()` says what is missing.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from sftmix_ds.common import free_port

CONF = """ClusterName=sftmixtest
SlurmctldHost=head({head_addr})
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# A node that stops answering is down (and its jobs requeued) after this many seconds.
SlurmdTimeout=20
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

NEEDED = ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "sbatch", "scontrol")


def unavailable() -> str:
    """Why this machine cannot run the cluster ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces and start Slurm's daemons"
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        return f"needs {', '.join(missing)} (iproute2, util-linux, Debian's slurmctld slurmd slurm-client)"
    probe = f"sfxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except FileNotFoundError:
        return ""


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Cluster:
    def __init__(self, folder: Path, nodes: int = 2, cpus: int = 2, env: dict | None = None, cwd: str = "."):
        self.dir, self.cwd = folder, cwd
        self.tag = f"sfx{os.getpid() % 10_000_000}"
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.net = f"10.{77 + os.getpid() % 100}.0"  # private, and only inside these namespaces
        self.addr = {"head": f"{self.net}.1", **{n: f"{self.net}.{10 + i}" for i, n in enumerate(self.nodes, 1)}}
        self.cpus = cpus
        self.conf = folder / "slurm.conf"
        self.env = {**(env or os.environ), "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}

    def netns(self, host: str) -> str:
        return f"{self.tag}{'h' if host == 'head' else host[4:]}"

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> "Cluster":
        for sub in ("state", "spool", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.addr.items()))
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr[n]} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
                          for n in self.nodes)
        self.conf.write_text(CONF.format(head_addr=self.addr["head"], ctld_port=free_port(), d_port=free_port(),
                                         dir=self.dir, nodes=nodes, names=",".join(self.nodes)))
        head = self.netns("head")
        _sh("ip", "netns", "add", head)
        _sh("ip", "-n", head, "link", "set", "lo", "up")
        _sh("ip", "-n", head, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", head, "addr", "add", f"{self.addr['head']}/24", "dev", "br0")
        _sh("ip", "-n", head, "link", "set", "br0", "up")
        for n in self.nodes:
            ns, veth = self.netns(n), f"{self.netns(n)}v"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "netns", head)
            _sh("ip", "-n", head, "link", "set", veth, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.addr[n]}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.daemons["head"] = self._popen("head", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            self._start_slurmd(n)
        self.wait_idle(self.nodes)
        return self

    def _start_slurmd(self, node: str) -> None:
        self.daemons[node] = self._popen(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

    def stop(self) -> list[str]:
        """Cancel every job and let the steps end (a finished job's slurmstepd outlives it by a few
        seconds), stop the daemons, kill whatever is left in the namespaces and delete them.
        Returns what had to be killed."""
        self.run(["scancel", "--user=root"], check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (self.run(["squeue", "-h"], check=False).stdout.strip()
                                               or any(self._stepds(n) for n in self.nodes)):
            time.sleep(1)
        for p in self.daemons.values():
            p.send_signal(signal.SIGTERM)
        for p in self.daemons.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        killed = []
        for host in ["head", *self.nodes]:
            killed += self.kill_all(host)
            subprocess.run(["ip", "netns", "del", self.netns(host)], capture_output=True)
        return killed

    # -- running things --------------------------------------------------------------------------

    def _in(self, host: str, args: list[str]) -> list[str]:
        """args run on `host`: in its network namespace, with its hostname and the cluster's hosts file."""
        return ["nsenter", f"--net=/run/netns/{self.netns(host)}", "unshare", "--uts", "--mount", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"',
                str(self.dir / "hosts"), host, *args]

    def _popen(self, host: str, args: list[str]) -> subprocess.Popen:
        with open(self.dir / f"{host}.out", "ab") as log:  # the daemon keeps its own descriptor
            return subprocess.Popen(self._in(host, args), env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def run(self, args: list[str], check: bool = True, timeout: float = 900, env: dict | None = None,
            cwd: str | None = None):
        """A client command (sbatch, scontrol...) on the head node, from `cwd` (default: the cluster's)."""
        proc = subprocess.run(self._in("head", args), env={**self.env, **(env or {})}, cwd=cwd or self.cwd,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return proc

    def run_in_background(self, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """A client command on the head node, not waited for."""
        return subprocess.Popen(self._in("head", args), env={**self.env, **(env or {})}, cwd=self.cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def job_field(self, job: str, field: str):
        out = self.run(["scontrol", "show", "job", job], check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return None

    def node_states(self) -> dict[str, str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_idle(self, nodes: list[str], timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(n) == "idle" for n in nodes):
                return
            time.sleep(1)
        raise AssertionError(f"nodes {nodes} not idle after {timeout_s:.0f} s: {self.node_states()}\n"
                             + (self.dir / "slurmctld.log").read_text()[-2000:])

    # -- failures --------------------------------------------------------------------------------

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns(host)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def _stepds(self, host: str) -> list[int]:
        return [pid for pid in self.pids(host) if _cmdline(pid).startswith("slurmstepd")]

    def kill_all(self, host: str) -> list[str]:
        """SIGKILL every process in host's namespace; returns their command lines."""
        killed = []
        for _ in range(50):
            pids = self.pids(host)
            if not pids:
                return killed
            for pid in pids:
                killed.append(_cmdline(pid))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"{host}: processes survive SIGKILL: {self.pids(host)}")

    def lose(self, node: str) -> None:
        """The node is gone as a dead machine is: its link goes first (so no connection is closed
        cleanly: peers hear nothing at all), then every process on it."""
        _sh("ip", "-n", self.netns(node), "link", "set", "eth0", "down")
        self.kill_all(node)
        self.daemons[node].wait()

    def revive(self, node: str) -> None:
        """Back up and idle, as after a reboot."""
        _sh("ip", "-n", self.netns(node), "link", "set", "eth0", "up")
        self._start_slurmd(node)
        time.sleep(2)
        self.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=revived"], check=False)
        self.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
        self.wait_idle([node])
