"""Against a real one-node Slurm on localhost (Debian's slurmctld, slurmd, slurm-client):
launch/slurm/train.sbatch with 2 tasks, a requeue on SIGUSR1 that resumes, and a Hydra
multirun through the submitit Slurm launcher."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sftmix_ds.common import free_port

from .helpers import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")) or os.geteuid() != 0,
    reason="needs Debian's slurmctld, slurmd and slurm-client and root to start them (.ci/run installs them)")]

CONF = """ClusterName=sftmixtest
SlurmctldHost=localhost(127.0.0.1)
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
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(dir=d, ctld_port=free_port(), d_port=free_port(), cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf), "SFTMIX_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    daemons = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for cmd in (["slurmctld", "-D", "-i", "-f", str(conf)],
                           ["slurmd", "-D", "-N", "localhost", "-f", str(conf)])]
    try:
        for _ in range(60):
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mixed"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"Slurm did not come up: {(d / 'slurmctld.log').read_text()[-2000:]}")
        yield {"env": env, "dir": d}
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for p in daemons:
            p.send_signal(signal.SIGTERM)
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def read_log(log) -> str:
    # The job's log interleaves both tasks' output, so a multibyte progress-bar character can be
    # split by another task's line.
    return log.read_text(errors="replace")


def sbatch(slurm, out_dir, overrides, wait=True):
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
           f"--output={slurm['dir']}/%x-%j.out", f"--chdir={ROOT}"] + (["--wait"] if wait else []) + \
          [os.path.join(ROOT, "launch", "slurm", "train.sbatch"), "model=tiny", "method=ntp", *overrides]
    proc = subprocess.run(cmd, env={**slurm["env"], "OUTPUT_DIR": str(out_dir)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().splitlines()[0].split(";")[0]
    return job, slurm["dir"] / f"sftmix-{job}.out"


def job_field(slurm, job, field):
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm["env"], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return None


def test_sbatch_runs_two_tasks_and_exports(slurm, tmp_path):
    out = tmp_path / "run"
    job, log = sbatch(slurm, out, ["train.max_steps=2", "train.micro_batch_size=2"])
    text = read_log(log)
    assert "2 tasks" in text and "2 ranks" in text
    assert (out / "model" / "model.safetensors").exists()


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    out = tmp_path / "run"
    job, log = sbatch(slurm, out, ["train.max_steps=300", "train.micro_batch_size=2", "data.eval_files=[]"],
                      wait=False)
    for _ in range(240):
        if log.exists() and "train ntp" in read_log(log):
            break
        time.sleep(1)
    time.sleep(2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm["env"], check=True)
    for _ in range(120):
        if job_field(slurm, job, "Restarts") == "1":
            break
        time.sleep(1)
    # Skip Slurm's requeue delay, but not the second it needs: a restart within the second of the
    # requeue gets "Job credential revoked" from slurmd.
    time.sleep(10)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm["env"])
    for _ in range(400):
        if job_field(slurm, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", None):
            break
        time.sleep(1)
    text = read_log(log).replace("\r", "\n")
    assert job_field(slurm, job, "JobState") in ("COMPLETED", None), text[-3000:]
    assert "for SIGUSR1" in text and "(restart 1)" in text
    stopped = int(text.split("stopping at step ")[1].split()[0])
    assert f"resumed from {out}/checkpoints/step_{stopped} at step {stopped}" in text
    assert (out / "model" / "model.safetensors").exists()


def test_hydra_multirun_through_submitit_slurm(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "-m", "hydra/launcher=slurm",
                           f"hydra.sweep.dir={sweep}", "model=tiny", "method=ntp", "train.max_steps=2",
                           "train.lr=1e-3,2e-3"], cwd=ROOT, env=slurm["env"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for point, lr in (("0", "0.001"), ("1", "0.002")):
        assert (sweep / point / "model" / "model.safetensors").exists()
        assert f"train.lr={lr}" in (sweep / point / "overrides.yaml").read_text()
        assert "group: sweep" in (sweep / point / "config.yaml").read_text()  # the sweep's wandb group
    table = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep_table.py"), str(sweep)],
                           capture_output=True, text=True, check=True).stdout
    assert table.count("train.lr=") == 2
