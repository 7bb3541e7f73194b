"""Faults cost minutes, not the run: killed ranks, interrupted and failed saves, NaN losses,
resuming on another rank count. Faults are injected with SFTMIX_FAULT (sftmix_ds/faults.py)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file


from .helpers import ROOT, lines, same_history, same_run_within_fp32, same_weights, train_cli

pytestmark = pytest.mark.e2e  # every test here launches processes

COMMON = ["model=tiny", "train.max_steps=6", "train.save_every=2", "train.lr=1e-3", "train.micro_batch_size=2",
          "train.grad_accum=2", "train.export_dtype=fp32", "train.eval_every=0", "deepspeed=zero3"]


@pytest.mark.parametrize("method,peft", [("ntp", "none"), ("sftmix", "none"), ("sftmix", "lora")])
def test_kill_9_one_rank_then_resume_equals_uninterrupted(method, peft, tmp_path, confidence_file):
    args = COMMON + [f"method={method}", f"peft={peft}"] + (
        [f"method.confidence_file={confidence_file}"] if method == "sftmix" else [])
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    train_cli(args + [f"output_dir={clean}"], nproc=2)
    # The job stops (a hang would hit the timeout and fail the test).
    proc = train_cli(args + [f"output_dir={crashed}"], nproc=2, check=False, timeout=180,
                     env={"SFTMIX_FAULT": "after_step:1:3"})
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(crashed, "model"))
    proc = train_cli(args + [f"output_dir={crashed}"], nproc=2)  # resume=auto is the default
    assert "resumed from" in proc.stderr and "step_2" in proc.stderr
    assert same_weights(clean, crashed)  # bitwise, fp32 on CPU
    assert same_history(clean, crashed)
    if peft == "lora":
        wa, wb = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (clean, crashed))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    args = COMMON + ["method=ntp"]
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    train_cli(args + [f"output_dir={clean}"])
    proc = train_cli(args + [f"output_dir={crashed}"], check=False, env={"SFTMIX_FAULT": "in_save:0:4"})
    assert proc.returncode != 0
    ckpts = os.path.join(crashed, "checkpoints")
    assert os.path.exists(os.path.join(ckpts, "step_4")) and not os.path.exists(os.path.join(ckpts, "step_4",
                                                                                              "complete.json"))
    proc = train_cli(args + [f"output_dir={crashed}"])
    assert "checkpoints/step_2 at step 2" in proc.stderr  # the partial step_4 was never picked
    assert same_weights(clean, crashed) and same_history(clean, crashed)


def test_disk_full_while_saving_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    proc = train_cli(COMMON + ["method=ntp", f"output_dir={run}"], nproc=2, check=False,
                     env={"SFTMIX_FAULT": "enospc:1:4"})
    assert proc.returncode == 2
    assert "saving checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    assert "newest complete one is" in proc.stderr and "step_2" in proc.stderr
    ckpts = os.path.join(run, "checkpoints")
    assert not os.path.exists(os.path.join(ckpts, "step_4"))  # the partial write is gone
    assert os.path.exists(os.path.join(ckpts, "step_2", "complete.json"))


# --- another allocation: resume through DeepSpeed's universal checkpoints -------------------------

ELASTIC = ["model=tiny", "train.max_steps=6", "train.save_every=2", "train.lr=1e-3", "train.adam_eps=1e-4",
           "train.micro_batch_size=2", "train.export_dtype=fp32", "train.eval_every=0"]


@pytest.fixture(scope="module")
def elastic_clean(tmp_path_factory, confidence_file):
    """Uninterrupted runs: 2 ranks ZeRO-3 (global batch 2 x 1 x 2 = 4), ntp and sftmix."""
    root = tmp_path_factory.mktemp("elastic")
    runs = {}
    for method in ("ntp", "sftmix"):
        runs[method] = str(root / method)
        train_cli(ELASTIC + _method(method, confidence_file) + ["deepspeed=zero3", f"output_dir={runs[method]}"],
                  nproc=2)
    return runs


def _method(method, confidence_file):
    return [f"method={method}"] + ([f"method.confidence_file={confidence_file}"] if method == "sftmix" else [])


@pytest.mark.parametrize("method", ["ntp", "sftmix"])
def test_two_ranks_then_one_with_the_global_batch_kept(method, elastic_clean, confidence_file, tmp_path):
    """Stopped at step 3 on 2 ranks, resumed on 1: grad_accum 1 -> 2 is derived, the checkpoint is
    converted to a universal one once, and the run goes on as the uninterrupted 2-rank run."""
    run = str(tmp_path / "run")
    args = ELASTIC + _method(method, confidence_file) + ["deepspeed=zero3", f"output_dir={run}"]
    train_cli(args + ["train.stop_after_steps=3"], nproc=2)
    proc = train_cli(args)
    assert "keeping the global batch of 4: train.grad_accum 1 -> 2 on 1 ranks" in proc.stderr
    assert "universal checkpoint" in proc.stderr and "resumed from" in proc.stderr
    same_run_within_fp32(elastic_clean[method], run)


def test_one_rank_then_two_and_another_zero_stage_is_refused(elastic_clean, tmp_path):
    """1 rank x accum 2, stopped at 3, resumed on 2 ranks x accum 1 (given explicitly). Another ZeRO
    stage is refused: DeepSpeed 0.19.8 cannot load a ZeRO-2 checkpoint under ZeRO-3 or the reverse."""
    run = str(tmp_path / "run")
    train_cli(ELASTIC + ["method=ntp", "train.grad_accum=2", "deepspeed=zero3", "train.stop_after_steps=3",
                         f"output_dir={run}"])
    proc = train_cli(ELASTIC + ["method=ntp", "deepspeed=zero2", f"output_dir={run}"], nproc=2, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was written under ZeRO-3 and deepspeed.zero_stage=2; DeepSpeed cannot load" in proc.stderr
    proc = train_cli(ELASTIC + ["method=ntp", "train.grad_accum=1", "deepspeed=zero3", f"output_dir={run}"], nproc=2)
    assert "written by 1 ranks under ZeRO-3; resuming on 2 ranks under ZeRO-3" in proc.stderr
    same_run_within_fp32(elastic_clean["ntp"], run)


def test_a_conversion_cut_short_or_damaged_is_never_used_and_is_redone(elastic_clean, tmp_path):
    run = str(tmp_path / "run")
    args = ELASTIC + ["method=ntp", "deepspeed=zero3", f"output_dir={run}"]
    train_cli(args + ["train.stop_after_steps=2"], nproc=2)
    proc = train_cli(args, check=False, env={"SFTMIX_FAULT": "in_convert:0:2"})  # killed before the rename
    step_2 = os.path.join(run, "checkpoints", "step_2")
    assert proc.returncode != 0 and not os.path.exists(os.path.join(step_2, "universal"))
    assert os.path.isdir(os.path.join(step_2, "universal.tmp"))
    proc = train_cli(args, check=False, env={"SFTMIX_FAULT": "after_step:0:3"})  # converted, killed before step_4
    assert proc.returncode != 0 and os.path.isfile(os.path.join(step_2, "universal", "converted.json"))
    with open(os.path.join(step_2, "universal", "converted.json")) as f:
        shard = max(json.load(f)["files"], key=lambda name: "exp_avg" in name)  # an optimizer state
    with open(os.path.join(step_2, "universal", shard), "r+b") as f:  # bit rot in the kept conversion
        f.seek(os.path.getsize(f.name) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = train_cli(args)
    assert f"universal conversion {step_2}/universal is damaged ({shard} does not match its checksum" in proc.stderr
    same_run_within_fp32(elastic_clean["ntp"], run)


def test_a_global_batch_that_cannot_be_kept_is_refused_naming_the_settings(elastic_clean, tmp_path):
    run = str(tmp_path / "run")
    args = ELASTIC + ["method=ntp", "deepspeed=zero3", f"output_dir={run}"]
    train_cli(args + ["train.stop_after_steps=2"], nproc=2)
    proc = train_cli(args + ["train.grad_accum=3"], check=False)  # 1 rank x 2 x 3 = 6, the checkpoint's is 4
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("the checkpoint's global batch is 4 examples per step, and train.micro_batch_size=2 x "
            "train.grad_accum=3 x 1 ranks = 6; keep it with train.micro_batch_size=1 train.grad_accum=4 or "
            "train.micro_batch_size=2 train.grad_accum=2") in proc.stderr
    proc = train_cli(args + ["train.grad_accum=3", "train.allow_new_global_batch=true"])
    assert "global batch 4 -> 6" in proc.stderr


def test_nan_loss_stop_and_skip_policies(tmp_path):
    args = ["model=tiny", "method=ntp", "train.max_steps=6", "train.micro_batch_size=2", "train.save_every=2"]
    stop = str(tmp_path / "stop")
    proc = train_cli(args + [f"output_dir={stop}"], nproc=2, check=False, env={"SFTMIX_FAULT": "nan_loss:1:3"})
    assert proc.returncode == 2
    assert "step 3: non-finite loss on rank 1: {'ntp': nan}, examples [" in proc.stderr
    assert os.path.exists(os.path.join(stop, "checkpoints", "step_2", "complete.json"))
    skip = str(tmp_path / "skip")
    proc = train_cli(args + ["train.nonfinite=skip", f"output_dir={skip}"], nproc=2,
                     env={"SFTMIX_FAULT": "nan_loss:0:3"})
    samples = lines(os.path.join(skip, "samples.jsonl"))
    assert [s["step"] for s in samples if s.get("skipped")] == [3] and len(samples) == 6
    burst = str(tmp_path / "burst")
    proc = train_cli(args + ["train.nonfinite=skip", "train.max_nonfinite_steps=2", f"output_dir={burst}"], nproc=2,
                     check=False, env={"SFTMIX_FAULT": "nan_loss:1:2-6"})
    assert proc.returncode == 2 and "step 4: non-finite loss" in proc.stderr and "3 steps in a row" in proc.stderr


def test_a_chat_template_that_never_finishes_is_stopped_naming_it(tmp_path):
    """Nested loops escape jinja's limit on one range: each conversation's rendering has a time limit, and
    the run stops naming the template and what to fix, with nothing cached."""
    template = tmp_path / "nested.jinja"
    template.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                        "{% for m in messages %}{{ m.content }}{% endfor %}")
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", f"model.chat_template={template}",
                      f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"], check=False,
                     timeout=300)  # a hang fails here
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the chat template did not finish rendering this conversation in 10 s" in proc.stderr
    assert "model.chat_template, or the model folder's tokenizer_config.json" in proc.stderr
    assert not [p for p in (tmp_path / "cache").rglob("meta.json")]  # nothing cached


def test_time_based_checkpoints_are_saved_at_steps_every_rank_agrees_on(tmp_path):
    """train.save_every_minutes: the ranks' clocks travel with the step's flags, so both ranks save at
    the same steps (a rank saving alone would hang the other); none at the last step, the export follows."""
    run = tmp_path / "run"
    train_cli(["model=tiny", "method=ntp", "train.max_steps=3", "train.micro_batch_size=2",
               "train.save_every_minutes=1e-9", "train.keep_checkpoints=5", f"output_dir={run}"], nproc=2)
    saved = sorted(p.parent.name for p in (run / "checkpoints").glob("step_*/complete.json"))
    assert saved == ["step_1", "step_2"]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_skipped_nan_step_changes_no_weight(zero_stage, tmp_path):
    """The NaN is found on the device and the update skipped without the host reading the loss before the
    backward (ZeRO 1-3: DeepSpeed's check of the gradient norm; ZeRO-0: the flag read first): one skipped
    step exports the initial weights, bitwise."""
    from sftmix_ds.config import load_model_config
    from sftmix_ds.models import prepare_model

    run = str(tmp_path / "run")
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", "train.nonfinite=skip",
                      "train.export_dtype=fp32", f"deepspeed.zero_stage={zero_stage}", f"output_dir={run}"],
                     env={"SFTMIX_FAULT": "nan_loss:0:1"})
    assert "step 1: non-finite loss on rank 0: {'ntp': nan}" in proc.stderr and "step skipped" in proc.stderr
    assert lines(os.path.join(run, "samples.jsonl"))[0]["skipped"] is True
    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    base = load_file(os.path.join(prepare_model(load_model_config("tiny"), cache), "model.safetensors"))
    trained = load_file(os.path.join(run, "model", "model.safetensors"))
    assert trained.keys() == base.keys()
    for k in base:
        assert torch.equal(trained[k], base[k].float()), k


def _step4_files(run):
    return os.path.join(run, "checkpoints", "step_4")


def _largest(folder, pattern):
    import glob

    return max(glob.glob(os.path.join(folder, "**", pattern), recursive=True), key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


# What goes wrong with the newest checkpoint (step_4) or the logs, and what the resume must say.
CORRUPTIONS = {
    "empty complete.json": (lambda run: open(os.path.join(_step4_files(run), "complete.json"), "w").close(),
                            "unreadable complete.json"),
    "torn complete.json": (lambda run: _truncate(os.path.join(_step4_files(run), "complete.json")),
                           "unreadable complete.json"),
    "truncated model shard": (lambda run: _truncate(_largest(_step4_files(run), "*model_states.pt")),
                              "bytes, "),
    "bit rot in the optimizer shard": (lambda run: _flip_a_byte(_largest(_step4_files(run), "*optim_states.pt")),
                                       "does not match its checksum"),
    "missing RNG file": (lambda run: os.remove(os.path.join(_step4_files(run), "rng_rank0.pt")),
                         "rng_rank0.pt is missing"),
}


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """An uninterrupted 6-step run, and the same run stopped at step 4 (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("resume")
    args = COMMON + ["method=ntp"]
    train_cli(args + [f"output_dir={root / 'clean'}"])
    train_cli(args + ["train.stop_after_steps=4", f"output_dir={root / 'stopped'}"])
    assert sorted(d for d in os.listdir(root / "stopped" / "checkpoints") if d.startswith("step_")) == ["step_2",
                                                                                                     "step_4"]
    return root


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_resume_passes_over_a_broken_checkpoint_and_takes_the_previous_one(name, stopped_at_4, tmp_path):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(stopped_at_4 / "stopped", run)
    corrupt, why = CORRUPTIONS[name]
    corrupt(run)
    os.makedirs(os.path.join(run, "checkpoints", "step_4.bak"))  # a stray folder beside them
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a torn last line
    proc = train_cli(COMMON + ["method=ntp", f"output_dir={run}"])
    assert "passing over" in proc.stderr and why in proc.stderr, proc.stderr[-3000:]
    assert "checkpoints/step_2 at step 2" in proc.stderr
    assert same_weights(str(stopped_at_4 / "clean"), run) and same_history(str(stopped_at_4 / "clean"), run)


def test_resume_with_other_settings_or_data_is_refused_unless_forced(stopped_at_4, tmp_path):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(stopped_at_4 / "stopped", run)
    proc = train_cli(COMMON + ["method=ntp", "train.lr=2e-3", f"output_dir={run}"], check=False)
    assert proc.returncode == 2 and "train.lr: 0.001 -> 0.002" in proc.stderr and "resume_force=true" in proc.stderr
    other = tmp_path / "other.jsonl"
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        other.write_text("".join(f.readlines()[:64]))
    proc = train_cli(COMMON + ["method=ntp", "data=jsonl", f"data.train_files=[{other}]", f"output_dir={run}"],
                     check=False)
    assert proc.returncode == 2 and "the training examples differ" in proc.stderr
    # Forced, it continues and says what differs; what a resume may change (log_every) is not listed.
    proc = train_cli(COMMON + ["method=ntp", "train.lr=2e-3", "train.log_every=2", "resume_force=true",
                               f"output_dir={run}"])
    assert "resume_force=true: continuing from" in proc.stderr and "train.lr: 0.001 -> 0.002" in proc.stderr
    assert "train.log_every" not in proc.stderr


def test_a_stale_extension_build_lock_ends_in_a_message_naming_it(tmp_path):
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", "deepspeed.build_lock_wait_minutes=0.02",
                      f"output_dir={tmp_path / 'run'}"], check=False, timeout=120,
                     env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert proc.returncode == 2 and f"error: {lock}: an extension build lock" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deepspeed_runs_the_configured_stage_with_nested_extra_keys(tmp_path):
    for stage in (2, 3):
        proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", f"deepspeed=zero{stage}",
                          "+deepspeed.extra.zero_optimization.overlap_comm=false", "train.export_final=false",
                          f"output_dir={tmp_path / str(stage)}"])
        assert f"DeepSpeed runs ZeRO stage {stage}; effective config" in proc.stderr
        assert '"overlap_comm": false' in proc.stderr and f'"stage": {stage}' in proc.stderr


RACE = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO)
from sftmix_ds.config import load_model_config
from sftmix_ds.data import load_examples
from sftmix_ds.models import load_tokenizer, prepare_model
cache, data = sys.argv[1], sys.argv[2]
model = load_model_config(sys.argv[3])
path = prepare_model(model, os.path.join(cache, "models"))
tokenizer, _ = load_tokenizer(path)
examples = load_examples([data], tokenizer, fmt="auto", max_length=256, overlong="truncate", system_prompt=None,
                         cache_dir=os.path.join(cache, "tokenized"))
print(json.dumps([path, [[e.id, e.input_ids, e.labels] for e in examples]]))
"""


def test_ranks_racing_for_the_token_cache_and_the_model_folder_get_one_build(tmp_path):
    """Two ranks of a node start at once on empty caches, the builder holding its lock 5 s longer
    (slow_build): each must wait for the one build and read the same model folder and examples."""
    import subprocess
    import sys

    data = os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_eval.jsonl")
    env = {**os.environ, "SFTMIX_FAULT": "slow_build:0:0", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), data, "tiny"], cwd=ROOT, text=True,
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    results, errors = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        errors.append(err)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1] and len(results[0][1]) == 32
    logs = "".join(errors)
    assert logs.count("building ") == 1 and logs.count("tokenizing 32 conversations") == 1
    assert len([f for f in os.listdir(tmp_path / "models") if not f.endswith(".lock")]) == 1
    assert len([f for f in os.listdir(tmp_path / "tokenized") if not f.endswith(".lock")]) == 1  # one store


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB (root only): a filesystem that fills up for real. mount(size) resizes it."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    mount = lambda *options: subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                                            capture_output=True)
    if mount("size=1m").returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield folder, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_at_the_final_export_is_a_clean_error_naming_what_is_intact(small_disk):
    """The run trains, its logs fit, its export does not: exit 2 naming the folder and what to do, the
    logs kept, no half-written model (safetensors raises its own error type there, not an OSError)."""
    disk, resize = small_disk
    resize("4m")  # the tiny model's export with its tokenizer takes about 10 MB
    run = disk / "run"
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=2", "train.eval_every=0", f"output_dir={run}"],
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"the final export: {run}/model: no space left on its filesystem" in proc.stderr
    assert "no checkpoint was saved (train.save_every, train.save_every_minutes): free space and run again" in \
        proc.stderr
    assert [r["step"] for r in lines(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "model").exists() and not list(run.glob("model*.tmp"))


def test_a_full_disk_at_the_evaluations_results_names_the_intact_model(tmp_path):
    """The run trains and exports, its evaluation's results cannot be written: exit 2 naming the model
    to evaluate again, every figure in the log, no half-written results."""
    run = tmp_path / "run"
    proc = train_cli(["model=tiny", "method=ntp", "train.max_steps=1", "eval=arith", "eval.tasks.0.limit=2",
                      "eval.general.0.limit=2", "eval.max_new_tokens=2", "eval.perplexity_files=[]",
                      f"output_dir={run}"], check=False, env={"SFTMIX_FAULT": "enospc_eval:0:0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"the evaluation's results: {run}/eval/eval.json: no space left on its filesystem" in proc.stderr
    assert f"the model at {run}/model is intact: free space and evaluate it again with launch/eval.py " \
           f"eval.model_path={run}/model" in proc.stderr
    assert "| arith accuracy |" in proc.stderr and "| capitals accuracy (general) |" in proc.stderr
    assert (run / "model" / "model.safetensors").exists() and not list((run / "eval").iterdir())


def test_a_full_disk_is_a_clean_error_and_loses_nothing(small_disk, tokenizer):
    """The token cache, a checkpoint save and the run after it, on a filesystem that fills up:
    clean errors naming the path, no half-written file, and the earlier checkpoint resumes."""
    from sftmix_ds.common import OutOfSpace
    from sftmix_ds.data import load_examples

    disk, resize = small_disk
    data = os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")
    resize("24k")  # the store of the 128 tokenized examples needs more (its token ids alone: about 30 KB)
    with pytest.raises(OutOfSpace, match=f"{disk}/cache/.*no space left on its filesystem"):
        load_examples([data], tokenizer, fmt="auto", max_length=256, overlong="truncate", system_prompt=None,
                      cache_dir=str(disk / "cache"))
    assert [f for f in os.listdir(disk / "cache") if not f.endswith(".lock")] == []  # no half-written cache

    resize("60m")  # one tiny checkpoint (37 MB) fits, a second does not
    run = disk / "run"
    args = ["model=tiny", "method=ntp", "train.max_steps=6", "train.save_every=2", "train.eval_every=0",
            f"data.cache_dir={disk / 'cache'}", f"output_dir={run}"]
    proc = train_cli(args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "saving checkpoint" in proc.stderr and "no space left on its filesystem" in proc.stderr
    assert [f for f in os.listdir(run / "checkpoints") if f.startswith("step_")] == ["step_2"]  # step_4 removed
    resize("200m")
    proc = train_cli(args)
    assert f"resumed from {run}/checkpoints/step_2 at step 2" in proc.stderr
    assert (run / "model" / "model.safetensors").exists()
