import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # the Triton loss kernels are tested in triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(PY), "deepspeed")


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct folder (converted once per machine, cached)."""
    from omegaconf import OmegaConf

    from sftmix_ds.models import prepare_model

    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    return prepare_model(OmegaConf.create({"name": "smollm2_135m", "source": "smollm2"}), cache)


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def launch_cli(script, overrides, nproc=0, timeout=600, check=True, env=None):
    """Run launch/<script> for real: nproc=0 as plain python, else through the deepspeed launcher."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    path = os.path.join(ROOT, "launch", script)
    if nproc:
        from sftmix_ds.common import free_port

        cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), path, *overrides]
    else:
        cmd = [PY, path, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_cli(overrides, nproc=0, timeout=600, check=True, env=None):
    return launch_cli("train.py", overrides, nproc, timeout, check, env)
