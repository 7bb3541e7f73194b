"""The resume policy on its own (sftmix_ds/resume.py): no process, no engine, milliseconds."""
import json

import pytest

from sftmix_ds.config import ConfigError
from sftmix_ds.data.tokenize import Example
from sftmix_ds.identity import resumable_change
from sftmix_ds.resume import fit_layout, identity_changes, run_identity, same_run_problem

META = {"world_size": 2, "zero_stage": 3, "global_batch": 8, "micro_batch_size": 2, "grad_accum": 2}


def fit(meta=META, **run):
    settings = dict(world_size=2, zero_stage=3, micro_batch_size=2, grad_accum=2, allow_new_global_batch=False)
    return fit_layout("ckpt/step_4", meta, **{**settings, **run})


def test_the_same_layout_loads_directly():
    assert fit() == (False, 2)
    assert fit(grad_accum=4) == (False, 4)  # same rank count: the identity check judges the global batch


def test_another_rank_count_goes_universal_and_keeps_the_global_batch():
    assert fit(world_size=1) == (True, 4)  # 2 x 2 x 2 = 8 = 2 x 4 x 1: grad_accum derived
    assert fit(world_size=4) == (True, 1)
    assert fit(world_size=4, micro_batch_size=1, grad_accum=2) == (True, 2)  # the user's settings keep it
    assert fit(world_size=4, micro_batch_size=4, grad_accum=1, allow_new_global_batch=True) == (True, 1)


def test_a_global_batch_that_cannot_be_kept_is_refused_naming_the_settings():
    with pytest.raises(ConfigError, match=r"global batch is 8 .* keep it with train.micro_batch_size=1 "
                                          r"train.grad_accum=8 or train.micro_batch_size=2 train.grad_accum=4"):
        fit(world_size=1, micro_batch_size=3)
    with pytest.raises(ConfigError, match=r"no micro-batch x accumulation gives 8 on 3 ranks"):
        fit(world_size=3)


def test_another_sequence_parallel_size_keeps_the_global_batch_without_a_universal_checkpoint():
    assert fit(sequence_parallel=2) == (False, 4)  # 2 x 2 x (2 / 2) = 4: grad_accum 2 -> 4 keeps 8
    assert fit({**META, "global_batch": 4}) == (False, 1)  # written at sequence_parallel=2, resumed at 1
    assert fit(world_size=4, sequence_parallel=2) == (True, 2)  # 4 ranks in 2 groups: universal, 2 x 2 x 2
    with pytest.raises(ConfigError, match=r"x 1 data-parallel groups \(train.sequence_parallel=2\) = 6; keep it with "
                                          r"train.micro_batch_size=1 train.grad_accum=8"):
        fit(world_size=2, sequence_parallel=2, micro_batch_size=3, meta={**META, "world_size": 4})


def test_another_zero_stage_or_an_old_checkpoint_on_other_ranks_is_refused():
    with pytest.raises(ConfigError, match="written under ZeRO-3 and deepspeed.zero_stage=2"):
        fit(zero_stage=2)
    old = {k: v for k, v in META.items() if k != "global_batch"}
    with pytest.raises(ConfigError, match="before checkpoints recorded their global batch; resume it on 2 ranks"):
        fit(old, world_size=1)
    assert fit(old) == (False, 2)


SETTINGS = {"output_dir": "a", "train": {"lr": 1e-4, "compile": False, "grad_accum": 2, "save_every": 4},
            "model": {"name": "tiny", "attn_implementation": "sdpa"}}
EXAMPLES = [Example(f"e{i}", [1, 2, 3 + i], [-100, 2, 3 + i]) for i in range(4)]


def identity(settings=SETTINGS, examples=EXAMPLES, method=None, global_batch=8):
    return run_identity(json.loads(json.dumps(settings)), examples, method or {}, global_batch)


def changed(**train):
    return {**SETTINGS, "train": {**SETTINGS["train"], **train}}


def test_speed_switches_and_where_things_go_may_change_the_math_may_not():
    base = identity()
    assert resumable_change("train.compile") and resumable_change("model.attn_implementation")
    assert resumable_change("train.eval_every") and not resumable_change("train.lr")
    assert resumable_change("deepspeed.zero_stage")  # auto resolves it; a checkpoint loads under its own
    assert identity_changes(base, identity(changed(compile=True, grad_accum=4, save_every=1))) == []
    assert identity_changes(base, identity({**SETTINGS, "output_dir": "b"})) == []
    assert identity_changes(base, identity(changed(lr=1e-3))) == ["train.lr: 0.0001 -> 0.001"]
    assert identity_changes(base, identity(global_batch=4)) == ["global_batch: 8 -> 4"]
    assert identity_changes(base, identity(examples=EXAMPLES[:3])) == [
        "the training examples differ (other data, tokenizer, max_length or method state)"]
    assert identity_changes(base, identity(method={"split": "other"}))[0].startswith("the training examples differ")


def test_a_checkpoints_identity_is_computed_as_before():
    """The identity recorded in checkpoints: the examples' digest (the one a token store records) then
    the method state, and every setting but the resumable ones, computed here independently."""
    import hashlib

    import struct

    examples = hashlib.sha256()  # per example: id, tokens and the runs of trained labels, lengths first
    for e in EXAMPLES:
        runs, start = [], None
        for i, label in enumerate(e.labels + [-100]):
            if label != -100 and start is None:
                start = i
            elif label == -100 and start is not None:
                runs += [start, i]
                start = None
        examples.update(struct.pack("<qqq", len(e.id), len(e.input_ids), len(runs) // 2) + e.id.encode())
        examples.update(b"".join(struct.pack("<q", v) for v in e.input_ids + runs))
    h = hashlib.sha256(examples.hexdigest().encode())
    h.update(json.dumps({}, sort_keys=True).encode())
    assert identity() == {"data": h.hexdigest()[:16],
                          "settings": {"train.lr": 1e-4, "model.name": "tiny", "global_batch": 8}}


def test_same_run_problem_names_the_changes_and_lets_a_new_global_batch_through_when_allowed():
    meta = {"identity": identity()}
    assert same_run_problem("f", meta, identity(), False) is None
    assert same_run_problem("f", meta, identity(changed(lr=1e-3)), False) == "train.lr: 0.0001 -> 0.001"
    assert same_run_problem("f", meta, identity(global_batch=4), False) == "global_batch: 8 -> 4"
    assert same_run_problem("f", meta, identity(global_batch=4), True) is None
    assert same_run_problem("f", {}, identity(changed(lr=1e-3)), False) is None  # written before identities


def test_a_finished_run_counts_as_this_run_only_with_the_same_settings_and_data(tmp_path):
    """resume=auto on a finished OUTPUT_DIR does nothing only when the run there is this one:
    other settings or other data content are refused, naming them; a moved copy of the same data
    and a resumable setting are the same run."""
    import shutil

    from hydra import compose, initialize_config_dir

    from sftmix_ds.config import CONF_DIR, register_configs
    from sftmix_ds.resume import RUN_FILE, check_finished_run, run_record

    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "prompt": "1+1?", "completion": "2"}\n')
    register_configs()

    def cfg(*overrides, train_file=data):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=["model=tiny", "method=ntp", "data=jsonl",
                                                           f"data.train_files=[{train_file}]",
                                                           f"output_dir={tmp_path / 'run'}", *overrides])

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(run_record(cfg())))
    check_finished_run(cfg())
    check_finished_run(cfg("train.log_every=7", "train.compile=true"))
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(data, moved)
    check_finished_run(cfg(train_file=moved))
    with pytest.raises(ConfigError, match=r"holds a finished run with other data or settings \(train.lr: "):
        check_finished_run(cfg("train.lr=0.001"))
    with pytest.raises(ConfigError, match="model.arch.hidden_size: 64 -> 2048"):
        check_finished_run(cfg("model=llama1b_random"))
    moved.write_text('{"id": "a", "prompt": "1+2?", "completion": "3"}\n')
    with pytest.raises(ConfigError, match="the training examples differ"):
        check_finished_run(cfg(train_file=moved))
    # A model folder (model.source=hf) is known by its files: weights replaced under the same path are
    # another run's model, however the config reads.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights of the first model")
    hf = ("model.source=hf", f"model.path={model}", "model.name=mine")
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(run_record(cfg(*hf))))
    check_finished_run(cfg(*hf))
    (model / "model.safetensors").write_bytes(b"weights of another, fine-tuned model")
    with pytest.raises(ConfigError, match="the model folder's files differ"):
        check_finished_run(cfg(*hf))
