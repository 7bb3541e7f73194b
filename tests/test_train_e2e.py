"""Real training runs of the tiny model through launch/train.py: one process and
2 ranks over gloo via the deepspeed launcher, ZeRO-3 against ZeRO-2."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sftmix_ds.tracking import MEASURED

from .helpers import ROOT, read_metrics, train_cli

pytestmark = pytest.mark.e2e  # every test here launches processes

ROOT_DATA = os.path.join(ROOT, "sftmix_ds", "builtin_data")

# adam_eps: Adam's first update is about lr * sign(g), and for near-zero gradients that sign is
# reduction-order noise that differs between layouts; a larger eps makes the update proportional to g.
BASE = ["model=tiny", "method=ntp", "train.max_steps=2", "train.lr=1e-3", "train.adam_eps=1e-4",
        "train.warmup_ratio=0", "train.save_every=0",
        "train.eval_every=0", "train.export_dtype=fp32", "train.seed=7"]
# The same global batch of 4 split four ways: (micro, accum, ranks, zero stage).
LAYOUTS = {"m4a1r1z3": (4, 1, 0, 3), "m2a2r1z2": (2, 2, 0, 2), "m1a2r2z3": (1, 2, 2, 3), "m2a1r2z2": (2, 1, 2, 2),
           "m4a1r1z3_speed": (4, 1, 0, 3), "m4a1r1z2_varlen": (4, 1, 0, 2)}
# The speed switches change how the same math is computed, not the result (the reference runs them as they
# were before they existed: the padding mask passed, ZeRO-3 hooks on every layer).
SPEED = ["train.packing=true", "train.gradient_checkpointing=true", "train.compile=true",
         "model.attn_implementation=eager", "train.pad_to_multiple_of=128"]


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (mb, accum, nproc, zero) in LAYOUTS.items():
        out[name] = str(root / name)
        extra = {"m4a1r1z3": ["logger=wandb", "train.padding_mask=true", "deepspeed.gather_per_block=false"],
                 "m4a1r1z3_speed": SPEED,
                 "m4a1r1z2_varlen": ["train.packing=true", "model.attn_implementation=varlen"]}.get(name, [])
        proc = train_cli(BASE + [f"train.micro_batch_size={mb}", f"train.grad_accum={accum}", f"deepspeed=zero{zero}",
                                 f"output_dir={out[name]}"] + extra, nproc=nproc, runner=True)  # the README's way
        # The compiled blocks (ZeRO-3, each block gathered whole) compile once for all widths.
        assert "recompil" not in proc.stderr, proc.stderr[-3000:]
    return out


def test_same_loss_and_update_for_every_layout(runs):
    ref = read_metrics(runs["m4a1r1z3"])
    assert [m["step"] for m in ref] == [1, 2]
    ref_w = weights(runs["m4a1r1z3"])
    for name, run_dir in runs.items():
        got = read_metrics(run_dir)
        for r, g in zip(ref, got, strict=True):
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), name
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), name
        assert got[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-5), name
        w = weights(run_dir)
        assert w.keys() == ref_w.keys()
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
    # The update is real: the loss after two steps of lr 1e-3 moved.
    assert ref[1]["loss"] != ref[0]["loss"]


def test_export_loads_in_transformers_and_generates(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(runs["m1a2r2z3"], "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert all(p.numel() > 0 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    w = load_file(os.path.join(path, "model.safetensors"))
    torch.testing.assert_close(model.model.embed_tokens.weight, w["model.embed_tokens.weight"])


def test_wandb_offline_run_and_saved_config(runs):
    run_dir = runs["m4a1r1z3"]
    assert glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "micro_batch_size: 4" in f.read()


def test_stop_then_resume_equals_uninterrupted(runs, tmp_path):
    run_dir = str(tmp_path / "resumed")
    overrides = BASE + ["train.micro_batch_size=1", "train.grad_accum=2", "deepspeed=zero3", f"output_dir={run_dir}"]
    train_cli(overrides + ["train.stop_after_steps=1"], nproc=2)
    assert not os.path.exists(os.path.join(run_dir, "model"))
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "step_1", "complete.json"))
    proc = train_cli(overrides, nproc=2)  # resume=auto is the default
    assert "resumed from" in proc.stderr
    ref = runs["m1a2r2z3"]
    strip = lambda records: [{k: v for k, v in r.items() if k not in MEASURED} for r in records]
    assert strip(read_metrics(run_dir)) == strip(read_metrics(ref))  # every step's record, not only the losses
    w, ref_w = weights(run_dir), weights(ref)
    for k in ref_w:
        assert torch.equal(w[k], ref_w[k]), k  # bitwise: fp32 on CPU


def test_bf16_export_and_no_resume_over_existing_checkpoints(tmp_path):
    run_dir = str(tmp_path / "bf16")
    train_cli(["model=tiny", "method=ntp", "train.max_steps=1", "train.save_every=1", "train.micro_batch_size=2",
               f"output_dir={run_dir}"], nproc=2)
    w = weights(run_dir)
    assert all(v.dtype == torch.bfloat16 and v.numel() > 0 for v in w.values())
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", "resume=none", f"output_dir={run_dir}"],
                     check=False)
    assert proc.returncode == 2 and "resume=none but" in proc.stderr
    before = os.path.getmtime(os.path.join(run_dir, "model", "model.safetensors"))
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", f"output_dir={run_dir}"])
    assert "this run is finished" in proc.stderr  # resume=auto after the end: nothing redone, nothing lost
    assert os.path.getmtime(os.path.join(run_dir, "model", "model.safetensors")) == before


def test_local_multirun_gives_each_point_its_folder_and_shares_stage1(tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT

    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "-m", f"hydra.sweep.dir={sweep}",
                           "model=tiny", "method=sftmix", "method.checkpoints=1", "train.max_steps=1",
                           "method.mu=0.1,0.5"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for point, mu in (("0", "0.1"), ("1", "0.5")):
        assert (sweep / point / "model" / "model.safetensors").exists()
        assert f"method.mu={mu}" in (sweep / point / "overrides.yaml").read_text()
    assert len(list((sweep / "confidence").glob("*/confidence.jsonl"))) == 1  # computed once, reused
    assert proc.stderr.count("stage 1: reusing") == 1


# Counts the library's own host collectives (Collectives' all_reduce / all_gather_object / barrier;
# DeepSpeed's internal ones are not counted) inside each optimizer step of a real run, and the operations
# that on a GPU make the host wait for the device (a tensor read on the host: .item(), .tolist(), bool();
# a shape that depends on the data: nonzero, a boolean mask) between the first forward and the optimizer
# step (Recipe._loss_step), by whose code asked for them, and in the step's read at its end.
COUNT_COLLECTIVES = """
import collections, json, sys, torch, torch.distributed
from torch.utils._python_dispatch import TorchDispatchMode
import sftmix_ds.engine.collectives as collectives_module
from sftmix_ds.trainer import Recipe

calls, per_step, syncs = [0], [], []
class Counting:
    def __getattr__(self, name):
        fn = getattr(torch.distributed, name)
        if name not in ("all_reduce", "all_gather_object", "barrier"):
            return fn
        def counted(*a, **k):
            calls[0] += 1
            return fn(*a, **k)
        return counted
collectives_module.dist = Counting()

def owner():
    frame = sys._getframe(2)
    while frame is not None:
        for package in ("sftmix_ds", "deepspeed", "transformers"):
            if f"/{package}/" in frame.f_code.co_filename:
                return package
        frame = frame.f_back
    return "other"

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")
class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name.startswith("aten::index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                        for i in (args[1] if len(args) > 1 else ()) or ())
        if name in SYNC_OPS or masked:
            self.count[owner()] += 1
        return func(*args, **(kwargs or {}))

tolist = torch.Tensor.tolist
active = []
def counted_tolist(self):
    if active:
        active[-1].count[owner() + " tolist"] += 1
    return tolist(self)
torch.Tensor.tolist = counted_tolist

def counting(method, key):
    def run(self, *a, **k):
        mode = Syncs()
        active.append(mode)
        try:
            with mode:
                return method(self, *a, **k)
        finally:
            active.pop()
            syncs[-1][key] = dict(mode.count)
    return run
Recipe._loss_step = counting(Recipe._loss_step, "loss_step")
collectives_module.Collectives.read = counting(collectives_module.Collectives.read, "read")

train_step = Recipe._train_step
def counted_step(self):
    before = calls[0]
    syncs.append({})
    record = train_step(self)
    per_step.append(calls[0] - before)
    return record
Recipe._train_step = counted_step
import atexit
atexit.register(lambda: print("PER_STEP", json.dumps(per_step), "SYNCS", json.dumps(syncs)))
from sftmix_ds.cli import train_main
train_main()
"""


@pytest.mark.parametrize("method,grad_accum", [("ntp", 1), ("ntp", 4), ("sftmix", 4)])
def test_two_host_collectives_and_one_host_read_per_step_whatever_the_accumulation(method, grad_accum, tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT

    extra = ["method.confidence_file=" + _uniform_confidence(tmp_path)] if method == "sftmix" else []
    proc = subprocess.run([sys.executable, "-c", COUNT_COLLECTIVES, "model=tiny", f"method={method}",
                           "train.max_steps=3", "train.micro_batch_size=2", f"train.grad_accum={grad_accum}",
                           "train.eval_every=0", "train.export_final=false", f"output_dir={tmp_path}/run"] + extra,
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_step, syncs = proc.stdout.split("PER_STEP", 1)[1].split("SYNCS")
    assert json.loads(per_step) == [2, 2, 2]  # was 4 + grad_accum (ntp) and 5 + grad_accum (sftmix)
    syncs = json.loads(syncs)
    print(syncs)  # DeepSpeed's own (its check of the gradient norm) are counted, not asserted
    for step in syncs:
        # Between the first forward and the optimizer step the library reads nothing from the device (was: a
        # boolean mask per forward, the fused loss's unpaired rows and its upstream gradients, and the loss
        # sums and flags before the last backward); everything is read once, at the end. transformers checks
        # the position ids for packed sequences once per forward (DeepSpeed's own are counted, not asserted).
        assert {k: n for k, n in step["loss_step"].items() if not k.startswith(("deepspeed", "transformers"))} == {}
        assert step["loss_step"].get("transformers", 0) <= grad_accum
        assert step["read"] == {"sftmix_ds tolist": 1}


def _uniform_confidence(tmp_path) -> str:
    from sftmix_ds.confidence import confidence_records, write_confidence_file

    from .helpers import ROOT

    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f]
    path = str(tmp_path / "confidence.jsonl")
    write_confidence_file(path, confidence_records([{i: float(n) for n, i in enumerate(ids)}]), "test")
    return path


def test_bf16_training_on_cpu_matches_fp32_within_bf16_tolerance(runs, tmp_path):
    """The dtype path of a GPU run (bf16 parameters and activations, fp32 master weights and loss
    accumulation, bf16 export) on 2 CPU ranks under ZeRO-3, against the fp32 run of the same layout."""
    run_dir = str(tmp_path / "bf16")
    proc = train_cli(BASE + ["train.micro_batch_size=1", "train.grad_accum=2", "deepspeed=zero3",
                             "train.precision=bf16", "train.export_dtype=bf16", f"output_dir={run_dir}"], nproc=2)
    assert "torch.bfloat16, ZeRO-3" in proc.stderr
    ref, got = read_metrics(runs["m1a2r2z3"]), read_metrics(run_dir)
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for r, g in zip(ref, got, strict=True):
        # bf16 keeps 8 bits of mantissa: logits and activations round at about 4e-3 relative.
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-2)
        assert g["eval_loss" if "eval_loss" in r else "loss"] == pytest.approx(r.get("eval_loss", r["loss"]), rel=1e-2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model"))
    assert model.dtype == torch.bfloat16 and all(p.numel() > 0 for p in model.parameters())
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def naive_response_nll(model_dir, data_cfg, files):
    """Mean response-token NLL of `files` under the model, from full logits (no chunking, no engine)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftmix_ds.data import load_split

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for e in load_split(data_cfg, AutoTokenizer.from_pretrained(model_dir), files):
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
        labels = torch.tensor(e.labels[1:])
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


def test_named_eval_sets_each_epoch_and_before_the_first_step(tmp_path):
    """data.eval_sets: one eval_loss/NAME per set, at step 0 (eval_on_start) and at every epoch's end
    (eval_each_epoch); a set equal to data.eval_files gives eval_loss exactly, and the last value
    equals a full-logits computation on the exported model."""
    from omegaconf import OmegaConf

    data = os.path.join(ROOT_DATA, "arith_train.jsonl")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(open(data).readlines()[:12]))  # 3 steps of 4 per epoch
    held_out, other = os.path.join(ROOT_DATA, "arith_eval.jsonl"), os.path.join(ROOT_DATA, "capitals.jsonl")
    out = str(tmp_path / "run")
    train_cli(["model=tiny", "method=ntp", "data=jsonl", f"data.train_files=[{train}]", f"data.eval_files=[{held_out}]",
               f"+data.eval_sets.same=[{held_out}]", f"+data.eval_sets.capitals=[{other}]", "train.epochs=2",
               "train.micro_batch_size=4", "train.lr=1e-3", "train.eval_each_epoch=true", "train.eval_on_start=true",
               "train.export_dtype=fp32", f"output_dir={out}"])
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(0, 0.0), (3, 1.0), (6, 2.0)]
    for r in evals:
        assert r["eval_loss/same"] == r["eval_loss"]
    assert evals[0]["eval_loss/capitals"] != evals[-1]["eval_loss/capitals"]  # training moved it
    data_cfg = OmegaConf.load(os.path.join(out, "config.yaml")).data
    assert evals[-1]["eval_loss/capitals"] == pytest.approx(
        naive_response_nll(os.path.join(out, "model"), data_cfg, [other]), rel=1e-4)


def test_a_second_run_with_other_settings_in_a_finished_folder_is_refused(tmp_path):
    """The default output_dir names a run by method, model and data option only: a second run with
    another learning rate lands in the first run's folder, and must not exit 0 as "finished"."""
    common = ["model=tiny", "method=ntp", "train.max_steps=1", "train.eval_every=0", f"output_dir={tmp_path}"]
    train_cli(common)
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["train.max_steps"] == 1
    again = train_cli(common + ["train.log_every=3"])
    assert "this run is finished" in again.stderr
    other = train_cli(common + ["train.lr=0.001"], check=False)
    assert other.returncode == 2 and "holds a finished run with other data or settings (train.lr: " in other.stderr


def test_the_model_trains_in_train_mode(tmp_path):
    """from_pretrained gives a model in eval mode; trained so, dropout and gradient checkpointing are off
    (an evaluation, which restores train mode afterwards, used to turn them on). With attention dropout
    and no evaluation first, the first step's loss differs from dropout 0's."""
    args = ["model=tiny", "method=ntp", "train.max_steps=1", "train.eval_every=0", "train.export_final=false",
            "train.gradient_checkpointing=true"]
    train_cli(args + [f"output_dir={tmp_path}/off"])
    train_cli(args + ["+model.arch.attention_dropout=0.5", f"output_dir={tmp_path}/on"])
    (off,), (on,) = read_metrics(str(tmp_path / "off")), read_metrics(str(tmp_path / "on"))
    assert abs(on["loss"] - off["loss"]) > 1e-4 * off["loss"]
