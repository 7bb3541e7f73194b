"""Against a real two-node Slurm on this machine (tests/cluster.py: two slurmd, each in its own
network and UTS namespace, one slurmctld): launch/slurm/train.sbatch across both nodes equals one
node; a node lost mid-run ends the survivor within deepspeed.peer_timeout_s, naming the lost rank,
and the requeued job finishes on the node left as if uninterrupted; SIGUSR1 with two nodes saves
once and requeues; a Hydra multirun through submitit with two-node points, and a point at its time
limit requeued into its own folder; the README's cluster journeys, as written, from a fresh clone."""
import os
import random
import sys
import time
import warnings

import pytest

from .cluster import Cluster, unavailable
from .helpers import ROOT, lines, same_run_within_fp32

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "-")]

PEER_TIMEOUT_S = 10
# Global batch 4 (2 x 1 x 2 ranks); one checkpoint every 5 of 60 steps, so a node can be lost mid-run.
RUN = ["model=tiny", "method=ntp", "train.max_steps=60", "train.save_every=5", "train.keep_checkpoints=2",
       "train.lr=1e-3", "train.adam_eps=1e-4", "train.micro_batch_size=2", "train.export_dtype=fp32",
       "train.eval_every=0", "data.eval_files=[]", f"deepspeed.peer_timeout_s={PEER_TIMEOUT_S}"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {**os.environ, "SFTMIX_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "offline"}
    c = Cluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2, env=env, cwd=ROOT)
    try:
        yield c.start()
    finally:
        killed = c.stop()
    if killed:  # reaped all the same; worth knowing, not worth failing the suite over
        warnings.warn(f"the cluster's teardown had to kill: {killed}")


@pytest.fixture
def both_nodes(cluster):
    for node in cluster.nodes:
        if cluster.node_states().get(node) != "idle":
            cluster.revive(node)
    cluster.wait_idle(cluster.nodes)
    return cluster


def read_log(log) -> str:
    # The job's log interleaves both tasks' output, so a multibyte progress-bar character can be
    # split by another task's line.
    return log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""


def sbatch(cluster, out_dir, overrides, nodes=2, tasks_per_node=1, wait=True, env=None):
    args = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
            "--cpus-per-task=1", f"--output={cluster.dir}/%x-%j.out", f"--chdir={ROOT}",
            *(["--wait"] if wait else []), os.path.join(ROOT, "launch", "slurm", "train.sbatch"), *overrides]
    proc = cluster.run(args, env={"OUTPUT_DIR": str(out_dir), **(env or {})}, check=False)
    job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else "?"
    log = cluster.dir / f"sftmix-{job}.out"
    assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n{read_log(log)[-4000:]}"
    return job, log


def wait_for(what, condition, timeout_s, log=None, poll_s=0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"not {what} after {timeout_s:.0f} s\n{read_log(log)[-4000:] if log else ''}")


def start_now(cluster, job):
    """Skip Slurm's requeue delay, but not the second it needs: a restart within the second of the
    requeue gets "Job credential revoked" from slurmd."""
    time.sleep(10)
    cluster.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=False)


@pytest.fixture(scope="module")
def across_two_nodes(cluster, tmp_path_factory):
    """The reference: RUN uninterrupted on 2 nodes x 1 task (the ranks meet over the namespaces' network),
    with caches of its own: both nodes see them, so the token store and the model folder are built once."""
    root = tmp_path_factory.mktemp("two_nodes")
    job, log = sbatch(cluster, root / "run", RUN, env={"SFTMIX_CACHE": str(root / "cache")})
    return root, read_log(log)


def test_two_nodes_train_as_one_node_with_two_tasks(across_two_nodes, both_nodes, tmp_path):
    root, text = across_two_nodes
    assert "on node[1-2]: 2 tasks" in text and "2 ranks, global batch 4" in text
    # One token store (the training file; no eval files), nothing half-built beside it.
    stores = sorted(p.name for p in (root / "cache" / "tokenized").iterdir() if (p / "meta.json").exists())
    assert len(stores) == 1 and not [p for p in (root / "cache").rglob("*") if ".tmp" in p.name]
    one_node = tmp_path / "one_node"
    job, log = sbatch(both_nodes, one_node, RUN, nodes=1, tasks_per_node=2)
    assert "on node1: 2 tasks" in read_log(log)
    same_run_within_fp32(root / "run", one_node)


def test_a_lost_node_ends_the_survivor_naming_it_and_the_job_finishes_on_the_node_left(
        across_two_nodes, both_nodes, tmp_path):
    out = tmp_path / "run"
    job, log = sbatch(both_nodes, out, RUN, wait=False)
    metrics = out / "metrics.jsonl"
    kill_after = random.Random(os.getpid()).randint(12, 40)  # a checkpoint (every 5 steps) is behind it
    wait_for(f"at step {kill_after}", lambda: metrics.exists() and len(lines(metrics)) >= kill_after, 300, log,
             poll_s=0.1)
    both_nodes.lose("node2")
    lost_at = time.monotonic()
    wait_for("told the loss", lambda: "lost rank 1 on node2" in read_log(log), 4 * PEER_TIMEOUT_S, log)
    waited = time.monotonic() - lost_at
    # The heartbeat goes stale PEER_TIMEOUT_S after its last beat (up to a beat, 2 s, before the loss).
    assert PEER_TIMEOUT_S - 2 <= waited <= PEER_TIMEOUT_S + 10, waited
    assert "no heartbeat for" in read_log(log)

    # Slurm sees node2 fail and requeues the job (--requeue), which waits for two nodes: shrink it to
    # the one left, as docs/scaling.md says, and it goes on through the universal checkpoint.
    wait_for("requeued", lambda: both_nodes.job_field(job, "JobState") == "PENDING"
             and int(both_nodes.job_field(job, "Restarts") or 0) >= 1, 120, log)
    both_nodes.run(["scontrol", "update", f"jobid={job}", "NumNodes=1", "NumTasks=1"])
    start_now(both_nodes, job)
    wait_for("finished", lambda: both_nodes.job_field(job, "JobState") in DONE, 400, log, poll_s=1)
    text = read_log(log)
    assert both_nodes.job_field(job, "JobState") in ("COMPLETED", None), text[-4000:]
    resumed = text.split("(restart ")[-1]
    assert "on node1: 1 tasks" in resumed
    assert "keeping the global batch of 4: train.grad_accum 1 -> 2 on 1 ranks" in resumed
    assert "universal checkpoint" in resumed and "resumed from" in resumed
    same_run_within_fp32(across_two_nodes[0] / "run", out)


def test_usr1_with_two_nodes_saves_once_and_requeues(both_nodes, tmp_path):
    out = tmp_path / "run"
    job, log = sbatch(both_nodes, out, RUN, wait=False)
    metrics = out / "metrics.jsonl"
    wait_for("training", lambda: metrics.exists() and len(lines(metrics)) >= 3, 300, log, poll_s=0.2)
    both_nodes.run(["scancel", "--batch", "--signal=USR1", job])
    wait_for("requeued", lambda: both_nodes.job_field(job, "Restarts") == "1", 120, log)
    start_now(both_nodes, job)
    wait_for("finished", lambda: both_nodes.job_field(job, "JobState") in DONE, 600, log, poll_s=1)
    text = read_log(log)
    assert both_nodes.job_field(job, "JobState") in ("COMPLETED", None), text[-3000:]
    assert text.count("for SIGUSR1") == 1 and "(restart 1) on node[1-2]: 2 tasks" in text
    stopped = int(text.split("stopping at step ")[1].split()[0])
    assert f"resumed from {out}/checkpoints/step_{stopped} at step {stopped}" in text
    assert (out / "model" / "model.safetensors").exists()


def readme_commands(section: str) -> list[list[str]]:
    """The commands of the README's bash block under `## section`, as argument lists."""
    import shlex

    with open(os.path.join(ROOT, "README.md")) as f:
        body = f.read().split(f"\n## {section}\n", 1)[1]
    block = body.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def on_this_cluster(argv: list[str], data: str) -> list[str]:
    """A README command as a user of this cluster runs it: the user's data for /data/train.jsonl, the tiny
    model standing in (model=tiny), and on the command line only the resources this cluster lacks (no
    GPUs, 2 nodes of 2 cores)."""
    argv = [a.replace("/data/train.jsonl", data) for a in argv]
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] == "sbatch":
        argv = ["sbatch", "--parsable", "--wait", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                *["--nodes=2" if a.startswith("--nodes=") else a for a in argv[1:]]]
    argv = [a.replace("hydra.launcher.gpus_per_node=8", "hydra.launcher.gpus_per_node=0") for a in argv]
    return argv + ["model=tiny"]


def test_the_readmes_cluster_journeys_run_as_written_in_a_fresh_clone(both_nodes, tmp_path):
    """From a fresh clone, with a user's chat file: the README's two sbatch lines (the recipe on one node,
    SFTMix on two), its Slurm sweep over method.mu (three points, one stage 1) and the sweep table, then
    its evaluation of the export and its lm-eval line. gsm8k (that line's second task) needs its data from
    the Hub, which this machine cannot reach: the shipped chain-of-thought task stands in. The script's
    log goes to logs/ in the clone, which Slurm does not create."""
    import glob
    import json
    import subprocess

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    data = tmp_path / "train.jsonl"  # the user's own chat data: 64 conversations
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        records = [json.loads(line) for line in f][:64]
    data.write_text("".join(json.dumps({"id": r["id"], "messages": [
        {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in records))

    exports = []
    for argv in readme_commands("Slurm"):
        proc = both_nodes.run(on_this_cluster(argv, str(data)), check=False, cwd=str(clone))
        job = proc.stdout.strip().split(";")[0]
        log = clone / "logs" / f"sftmix-{job}.out"
        assert proc.returncode == 0 and log.exists(), f"{argv}\n{proc.stderr[-2000:]}\n{read_log(log)[-4000:]}"
        exports.append(clone / "outputs" / f"slurm-sftmix-{job}" / "model")
        assert (exports[-1] / "model.safetensors").exists(), read_log(log)[-4000:]
        assert "64 train" in read_log(log)  # the user's data, not the built-in set
    assert "on node[1-2]: 2 tasks" in read_log(log)  # the second line: two nodes

    _, slurm_sweep, table = readme_commands("Sweeps")
    both_nodes.run(on_this_cluster(slurm_sweep, str(data)), cwd=str(clone))
    (sweep,) = glob.glob(str(clone / "multirun" / "*"))  # multirun/<date_time>
    for point in ("0", "1", "2"):
        assert os.path.exists(os.path.join(sweep, point, "model", "model.safetensors"))
    assert len(glob.glob(os.path.join(sweep, "confidence", "*", "confidence.jsonl"))) == 1  # one stage 1
    table = subprocess.run([sys.executable, *table[1:-1], sweep], cwd=clone, capture_output=True, text=True)
    assert table.returncode == 0 and table.stdout.count("method.mu=") == 3, table.stderr

    trained = os.path.relpath(exports[0], clone)
    for argv in readme_commands("Evaluation"):
        if "..." in argv:
            continue  # '...' stands for a training run's overrides: training with evaluation is test_eval's
        argv = [a.replace("outputs/sftmix-smollm2_135m-arith/model", trained).replace("gsm8k", "sftmix_arith_cot")
                for a in argv]
        proc = subprocess.run(on_this_cluster(argv, str(data)), cwd=clone, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, timeout=900)
        assert proc.returncode == 0, f"{argv}\n{proc.stderr[-3000:]}"
    (results,) = glob.glob(str(clone / "outputs" / "*" / "eval" / "base" / "eval.json"))
    with open(results) as f:
        harness = json.load(f)["harness"]
    assert set(harness) == {"sftmix_arith", "sftmix_arith_cot"}
    assert glob.glob(str(clone / "outputs" / "*" / "eval" / "*" / "eval.json"))


def test_a_sweep_point_at_its_time_limit_saves_and_submitit_requeues_it_into_its_own_folder(both_nodes, tmp_path):
    """Submitit's time-limit signal (USR2, which Slurm sends hydra.launcher.signal_delay_s before the limit;
    sent here by scancel) reaches a two-node point mid-run: both ranks save at the end of the step, then
    submitit (rank 0) requeues the point, counted as a time-out since a 10-minute limit leaves no
    guaranteed time, and it resumes from that checkpoint in its own folder and finishes."""
    sweep = tmp_path / "sweep"
    parent = both_nodes.run_in_background([
        sys.executable, os.path.join(ROOT, "launch", "train.py"), "-m", "hydra/launcher=slurm",
        "hydra.launcher.nodes=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}", *RUN])
    point = sweep / "0"
    metrics = point / "metrics.jsonl"
    try:
        wait_for("training", lambda: metrics.exists() and len(lines(metrics)) >= 3, 300, poll_s=0.2)
        (job,) = both_nodes.run(["squeue", "-h", "-o", "%i"]).stdout.split()
        both_nodes.run(["scancel", "--signal=USR2", job])
        wait_for("requeued", lambda: both_nodes.job_field(job, "Restarts") == "1", 120)
        start_now(both_nodes, job)
        _, err = parent.communicate(timeout=600)
    finally:
        parent.kill()
    assert parent.returncode == 0, err[-3000:]
    log = (point / "train.log").read_text()
    stopped = int(log.split("stopping at step ")[1].split()[0])
    assert log.count("after a checkpoint, for SIGUSR2") == 1 and "handing SIGUSR2 over to submitit" in log
    assert f"resumed from {point}/checkpoints/step_{stopped} at step {stopped}" in log
    assert [r["step"] for r in lines(metrics)] == list(range(1, 61))  # every step once, in the point's folder
    assert (point / "model" / "model.safetensors").exists()
    submitit_log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.err"))
    assert "this job is timed-out" in submitit_log and "19 remaining timeouts" in submitit_log


def test_hydra_multirun_through_submitit_with_two_node_points(both_nodes, tmp_path):
    sweep = tmp_path / "sweep"
    both_nodes.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "-m", "hydra/launcher=slurm",
                    "hydra.launcher.nodes=2", "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}",
                    "model=tiny", "method=ntp", "train.max_steps=2", "train.lr=1e-3,2e-3"])
    for point, lr in (("0", "0.001"), ("1", "0.002")):
        assert (sweep / point / "model" / "model.safetensors").exists()
        assert f"train.lr={lr}" in (sweep / point / "overrides.yaml").read_text()
        assert "group: sweep" in (sweep / point / "config.yaml").read_text()  # the sweep's wandb group
        assert "2 ranks" in (sweep / point / "train.log").read_text()  # one rank on each node
    table = both_nodes.run([sys.executable, os.path.join(ROOT, "launch", "sweep_table.py"), str(sweep)]).stdout
    assert table.count("train.lr=") == 2
