"""Stages give their memory back: after each stage (the reference run, every scoring pass, S3FT
generation, training, evaluation) no parameter of its model is reachable any more, so the next
stage does not stack on top of it."""
import json
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.e2e  # every test here launches processes

# Runs an entry point with every model a stage builds tracked by weak references; before each new
# stage (and at the end) it records how many of the earlier stages' parameters are still alive.
TRACK_STAGES = """
import atexit, gc, json, sys, weakref
import sftmix_ds.engine.strategy as strategy_module
import sftmix_ds.inference.generate as generate_module

stages, checks = [], []

def check(now):
    gc.collect()
    checks.append({"before": now, "alive": {name: sum(r() is not None for r in refs) for name, refs in stages}})

def track(name, model):
    stages.append((name, [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]))

load_model = strategy_module.DeepSpeedStrategy.load_model
def tracked_load(self, path, *a, **k):
    check("engine " + path)
    model = load_model(self, path, *a, **k)
    track("engine " + path, model)
    return model
strategy_module.DeepSpeedStrategy.load_model = tracked_load

generator_init = generate_module.Generator.__init__
def tracked_generator(self, path, *a, **k):
    check("generator " + path)
    generator_init(self, path, *a, **k)
    track("generator " + path, self.model)
generate_module.Generator.__init__ = tracked_generator

atexit.register(lambda: (check("end"), print("STAGES", json.dumps(checks))))
from sftmix_ds import cli
getattr(cli, sys.argv.pop(1))()
"""


def stage_checks(entry, overrides, tmp_path):
    proc = subprocess.run([sys.executable, "-c", TRACK_STAGES, entry, *overrides, f"output_dir={tmp_path}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("STAGES", 1)[1])


def test_every_sftmix_stage_releases_its_model(tmp_path):
    checks = stage_checks("train_main", ["model=tiny", "method=sftmix", "method.checkpoints=2", "train.max_steps=2",
                                         "eval=arith", "eval.tasks.0.limit=4", "eval.general.0.limit=4",
                                         "eval.max_new_tokens=2"], tmp_path)
    kinds = [c["before"].split()[0] for c in checks]
    # reference run, 2 scoring passes, training, evaluation's generator and its perplexity pass
    assert kinds == ["engine"] * 4 + ["generator", "engine", "end"], kinds
    for c in checks:
        assert all(n == 0 for n in c["alive"].values()), c


def test_s3ft_generation_releases_its_model_before_training(tmp_path):
    data = tmp_path / "d.jsonl"
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:4]))
    checks = stage_checks("train_main", ["model=tiny", "method=s3ft", "data=jsonl", "data.judge=numeric",
                                         f"data.train_files=[{data}]", "method.max_new_tokens=4",
                                         "train.micro_batch_size=2", "train.max_steps=1"], tmp_path)
    assert [c["before"].split()[0] for c in checks] == ["generator", "engine", "end"]
    for c in checks:
        assert all(n == 0 for n in c["alive"].values()), c
