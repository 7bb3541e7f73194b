"""What tests share besides fixtures (pytest's conftest.py is for fixtures and hooks, and is not
imported): the repo's paths, launching the entry points for real, reading a run's metrics, and a
confidence file for the embedded training set."""
import base64
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(PY), "deepspeed")


def launch_cli(script, overrides, nproc=0, timeout=600, check=True, env=None, runner=False):
    """Run launch/<script> for real: nproc=0 as plain python, else through DeepSpeed's launcher on nproc
    local ranks. That is the node launcher (deepspeed.launcher.launch) that the `deepspeed` command runs on
    each node; runner=True goes through the `deepspeed` command itself, as the README writes it (2 s
    more per launch: one more process importing DeepSpeed)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    path = os.path.join(ROOT, "launch", script)
    if nproc:
        from sftmix_ds.common import free_port

        port = str(free_port())
        if runner:
            cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", port, path, *overrides]
        else:
            world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
            cmd = [PY, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", path, *overrides]
    else:
        cmd = [PY, path, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def train_cli(overrides, nproc=0, timeout=600, check=True, env=None, runner=False):
    return launch_cli("train.py", overrides, nproc, timeout, check, env, runner)


def lines(path) -> list:
    """A JSON-lines file's records."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def same_run_within_fp32(a, b) -> None:
    """Runs a and b trained the same examples at every step, with losses and weights equal to fp32
    reduction-order noise (relative 1e-6 on the losses, 1e-5 on the weights): the elastic tolerance.
    Measured: bitwise equal on CPU."""
    import pytest
    import torch
    from safetensors.torch import load_file

    assert lines(os.path.join(a, "samples.jsonl")) == lines(os.path.join(b, "samples.jsonl"))
    for r, g in zip(lines(os.path.join(a, "metrics.jsonl")), lines(os.path.join(b, "metrics.jsonl")), strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6) and g["lr"] == r["lr"], r["step"]
    wa, wb = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (a, b))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)


def same_weights(a, b) -> bool:
    """Runs a and b exported bitwise-equal models."""
    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def same_history(a, b) -> bool:
    """Same losses and the same examples at every step (nothing skipped or repeated)."""
    from sftmix_ds.tracking import MEASURED

    strip = lambda rs: [{k: v for k, v in r.items() if k not in MEASURED} for r in rs]
    return (strip(lines(os.path.join(a, "metrics.jsonl"))) == strip(lines(os.path.join(b, "metrics.jsonl")))
            and lines(os.path.join(a, "samples.jsonl")) == lines(os.path.join(b, "samples.jsonl")))


def read_metrics(run_dir) -> list:
    """A run's metrics.jsonl, one dict per logged record."""
    return lines(os.path.join(run_dir, "metrics.jsonl"))


def write_random_confidence_file(path: str, seed: int = 0) -> str:
    """A confidence file for the embedded training set (arith_train.jsonl) from random perplexities."""
    from sftmix_ds.confidence import confidence_records, write_confidence_file

    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f]
    rng = random.Random(seed)
    write_confidence_file(path, confidence_records([{i: rng.uniform(1, 5) for i in ids}]), "test")
    return path
