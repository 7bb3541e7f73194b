"""SFTMix stage 1: perplexity scoring, the median split, the confidence file, and the stage end to end."""
import glob
import json
import math
import os
import random

import pytest
import torch

from sftmix_ds.confidence import (CONFIDENT, UNCONFIDENT, ConfidenceFileError, confidence_records,
                                  read_confidence_file, write_confidence_file)
from sftmix_ds.inference import example_nll, scoring_plan
from sftmix_ds.losses import Head
from sftmix_ds.data import collate, encode
from sftmix_ds.data.tokenize import Example

from sftmix_ds.tracking import MEASURED

from .helpers import ROOT, launch_cli, read_metrics

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green, or maybe red."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
]


def test_perplexity_equals_naive_full_logits(smollm2_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    examples = [Example(str(i), *encode(tokenizer, m, "t")) for i, m in enumerate(CONVERSATIONS)]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = example_nll(hidden, Head(model.lm_head.weight), batch, chunk_size=7)
        for i, ex in enumerate(examples):  # naive: one example at a time, full logits, plain cross-entropy
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:]), ignore_index=-100)
            assert got["count"][i].item() == ex.n_response - (ex.labels[0] != -100)
            assert math.exp(got["nll_sum"][i].item() / got["count"][i].item()) == pytest.approx(
                math.exp(nll.item()), rel=1e-4)


@pytest.mark.parametrize("n,bs,world,max_tokens", [(13, 4, 2, 0), (5, 2, 3, 0), (1, 8, 2, 0), (16, 4, 4, 0),
                                                    (40, 64, 2, 120), (40, 3, 3, 100), (9, 64, 2, 10)])
def test_scoring_plan_covers_every_example_once(n, bs, world, max_tokens):
    examples = [Example(f"e{i}", [0] * random.Random(i).randint(1, 50), [0]) for i in range(n)]
    plans = [scoring_plan(examples, bs, world, r, max_tokens) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # same number of forward passes on every rank
    flat = [i for p in plans for b in p for i in b]
    assert sorted(flat) == list(range(n))
    lengths = [len(examples[i].input_ids) for b in plans[0] for i in b]
    assert lengths == sorted(lengths, reverse=True)
    batches = [b for p in plans for b in p if b]
    for b in batches:
        width = max(len(examples[i].input_ids) for i in b)
        assert len(b) <= bs and (len(b) == 1 or not max_tokens or len(b) * width <= max_tokens)
    # Greedy: a batch ends only when its next example would break a limit.
    everything = sorted(batches, key=lambda b: (-len(examples[b[0]].input_ids), examples[b[0]].id))
    for b, after in zip(everything, everything[1:]):
        width = len(examples[b[0]].input_ids)
        assert len(b) == bs or (max_tokens and (len(b) + 1) * width > max_tokens)


def test_median_split_invariants_and_determinism():
    rng = random.Random(0)
    ids = [f"x{i}" for i in range(101)]
    ppl = [{i: rng.choice([1.5, 2.0, 3.0, rng.uniform(1, 9)]) for i in ids} for _ in range(3)]  # many ties
    records = confidence_records(ppl)
    assert records == confidence_records([dict(reversed(list(p.items()))) for p in ppl])  # order-independent
    conf = [r for r in records if r["split"] == CONFIDENT]
    unconf = [r for r in records if r["split"] == UNCONFIDENT]
    assert abs(len(conf) - len(unconf)) <= 1 and len(conf) + len(unconf) == 101
    assert min(r["confidence"] for r in conf) >= max(r["confidence"] for r in unconf)
    for r in records:
        assert r["confidence"] == pytest.approx(-sum(p[r["id"]] for p in ppl) / 3)
        assert r["perplexities"] == [p[r["id"]] for p in ppl]


def test_bad_confidence_files_are_rejected(tmp_path):
    records = confidence_records([{"a": 1.0, "b": 2.0, "c": 3.0}])
    path = str(tmp_path / "c.jsonl")
    write_confidence_file(path, records, "fp")
    assert len(read_confidence_file(path, ["a", "b", "c"])) == 3
    with pytest.raises(ConfidenceFileError, match="1 dataset ids missing.*1 ids not in the dataset"):
        read_confidence_file(path, ["a", "b", "d"])
    bad = records[:2] + [{**records[2], "confidence": float("nan")}]
    write_confidence_file(path, bad, "fp")
    with pytest.raises(ConfidenceFileError, match=r"c.jsonl:4: confidence must be a finite number"):
        read_confidence_file(path)
    (tmp_path / "t.jsonl").write_text('{"id": "a", "confidence": -1, "split": "confident"}\n{"id": ')
    with pytest.raises(ConfidenceFileError, match=r"t.jsonl:2: invalid JSON"):
        read_confidence_file(str(tmp_path / "t.jsonl"))
    (tmp_path / "l.jsonl").write_text('{"id": ["a"], "confidence": -1, "split": "confident"}\n')
    with pytest.raises(ConfidenceFileError, match=r"l.jsonl:1: 'id' must be a string, got list"):
        read_confidence_file(str(tmp_path / "l.jsonl"))


@pytest.mark.e2e
def test_more_checkpoints_than_reference_steps_is_refused(tmp_path):
    proc = launch_cli("score.py", ["model=tiny", "method.checkpoints=40", f"output_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert "method.checkpoints=40: the one-epoch reference run has only 16 optimizer steps" in proc.stderr


def _confidence(run_dir):
    (path,) = glob.glob(os.path.join(run_dir, "confidence", "*", "confidence.jsonl"))
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, list(f)[1:])}


def score_cli(overrides, nproc=0, env=None):
    return launch_cli("score.py", overrides, nproc, env=env)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A full stage 1 (reference run with C=2 checkpoints) of the tiny model on 13 examples."""
    root = tmp_path_factory.mktemp("stage1")
    data = root / "d.jsonl"
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:13]))
    common = ["model=tiny", "data=jsonl", f"data.train_files=[{data}]", "train.micro_batch_size=2",
              "train.lr=1e-3", "method.checkpoints=2", "method.score_batch_size=4"]
    run = str(root / "ref")
    first = score_cli(common + [f"output_dir={run}"])
    return {"root": root, "common": common, "run": run, "first": first}


@pytest.mark.e2e
def test_stage1_outputs(stage1):
    (stage_dir,) = glob.glob(os.path.join(stage1["run"], "confidence", "*"))
    exports = {os.path.basename(p) for p in glob.glob(os.path.join(stage_dir, "reference", "model_step_*"))}
    assert exports == {"model_step_4", "model_step_7"}  # 13 examples / global batch 2 = 7 steps; C=2, last at end
    records = _confidence(stage1["run"])
    assert len(records) == 13 and all(len(r["perplexities"]) == 2 for r in records.values())
    assert os.path.getsize(os.path.join(stage_dir, "confidence.png")) > 1000
    with open(os.path.join(stage_dir, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["confident"], summary["unconfident"]) == (6, 7)


@pytest.mark.e2e
def test_stage1_rerun_reuses_everything(stage1):
    again = score_cli(stage1["common"] + [f"output_dir={stage1['run']}"])
    assert "stage 1: reusing" in again.stderr and "reference run" not in again.stderr


@pytest.mark.e2e
def test_two_ranks_zero3_score_like_one_process(stage1):
    (stage_dir,) = glob.glob(os.path.join(stage1["run"], "confidence", "*"))
    ckpts = sorted(glob.glob(os.path.join(stage_dir, "reference", "model_step_*")))
    given = [f"method.score_checkpoints=[{','.join(ckpts)}]"]
    one, two = str(stage1["root"] / "one"), str(stage1["root"] / "two")
    score_cli(stage1["common"] + given + [f"output_dir={one}"])
    whole = str(stage1["root"] / "whole")  # below ZeRO-3 the model sits whole on each rank
    score_cli(stage1["common"] + given + [f"output_dir={two}", "deepspeed=zero3"], nproc=2)
    score_cli(stage1["common"] + given + [f"output_dir={whole}", "deepspeed=zero2"], nproc=2)
    a = _confidence(one)
    assert len(a) == 13
    for b in (_confidence(two), _confidence(whole)):
        assert a.keys() == b.keys()  # every id exactly once
        for i in a:
            assert b[i]["perplexities"] == pytest.approx(a[i]["perplexities"], rel=1e-5)
            assert b[i]["split"] == a[i]["split"]
    # The given checkpoints are the reference run's, so the scores match stage 1's own.
    ref = _confidence(stage1["run"])
    for i in a:
        assert a[i]["perplexities"] == pytest.approx(ref[i]["perplexities"], rel=1e-6)


def test_every_setting_a_resumed_run_may_change_leaves_the_stage_1_fingerprint_unchanged():
    """One list (sftmix_ds.identity.RESUMABLE_CHANGES) for resume and stage 1: every train or model key on it
    can change (bookkeeping, speed switches, the non-finite policy) and SFTMix's stage 1 is reused; so is
    another layout with the same global batch (a resubmission on other nodes); a setting of the math
    (the learning rate, the global batch) is another stage 1."""
    from dataclasses import fields

    from hydra import compose, initialize_config_dir

    from sftmix_ds.config import CONF_DIR, ModelConfig, TrainLoopConfig, register_configs
    from sftmix_ds.confidence.stage import fingerprint
    from sftmix_ds.identity import resumable_change

    register_configs()
    examples = [Example(f"e{i}", [1, 2, 3 + i], [-100, 2, 3 + i]) for i in range(5)]

    def fp(*overrides, world_size=2):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["method=sftmix", "model=tiny", *overrides])
        return fingerprint(cfg, cfg.model, examples, world_size)

    other_value = {bool: lambda v: str(not v).lower(), int: lambda v: str(v + 3), float: lambda v: str(v + 0.5)}
    strings = {"loss_backend": "torch", "nonfinite": "skip", "export_dtype": "fp16", "attn_implementation": "eager"}
    layout = ("micro_batch_size", "grad_accum", "sequence_parallel")  # compared through the global batch
    default, changed = fp(), []
    for section, schema in (("train", TrainLoopConfig), ("model", ModelConfig)):
        for f in fields(schema):
            key = f"{section}.{f.name}"
            if not resumable_change(key) or f.name in layout:
                continue
            value = strings.get(f.name) or other_value[type(f.default)](f.default)
            changed.append(key)
            assert fp(f"{key}={value}") == default, key
    assert {"train.nonfinite", "train.max_nonfinite_steps", "train.save_every", "train.compile",
            "model.attn_implementation"} <= set(changed)
    assert fp("train.micro_batch_size=4", "train.grad_accum=2", world_size=1) == fp("train.micro_batch_size=4")
    assert fp("train.micro_batch_size=2") != default  # a global batch of 4, not 16
    assert fp("train.lr=1e-3") != default and fp("train.epochs=3") == default  # the reference run is one epoch


def test_reference_run_config_uses_the_reference_model():
    from hydra import compose, initialize_config_dir

    from sftmix_ds.config import CONF_DIR, register_configs, validate
    from sftmix_ds.confidence.stage import reference_model_config, reference_run_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["method=sftmix", "method.reference_model=tiny",
                                                      "method.checkpoints=3", "train.epochs=3"])
    validate(cfg)
    ref = reference_run_config(cfg, reference_model_config(cfg), "/tmp/ref")
    assert cfg.model.name == "smollm2_135m" and ref.model.name == "tiny" and ref.model.arch.hidden_size == 64
    assert ref.method.name == "ntp" and ref.train.epochs == 1 and ref.train.export_count == 3
    assert ref.data.eval_files == [] and ref.output_dir == "/tmp/ref"
    bad = cfg.copy()
    bad.method.reference_model = "nope"
    with pytest.raises(Exception, match="method.reference_model='nope'"):
        validate(bad)


def test_random_split_is_balanced_deterministic_and_seeded():
    from sftmix_ds.confidence.split import random_split_records

    ids = [f"ex{i}" for i in range(101)]
    split = lambda seed, order=ids: {r["id"]: r["split"] for r in random_split_records(order, seed)}
    first = split(7)
    assert sum(s == CONFIDENT for s in first.values()) == 50 and len(first) == 101  # floor(N/2) confident
    assert split(7, list(reversed(ids))) == first  # the same ids in another order: the same split
    assert split(8) != first
    others = [split(seed) for seed in range(20)]
    share = sum(o["ex0"] == CONFIDENT for o in others) / len(others)
    assert 0.2 < share < 0.8  # an id is not always on the same side across seeds


@pytest.mark.e2e
def test_random_confidence_source_trains_and_writes_the_stage_files(tmp_path):
    from sftmix_ds.config import CONF_DIR, ConfigError, register_configs, validate
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for overrides, message in ((["method.confidence_source=file"], "set method.confidence_file"),
                                   (["method.confidence_source=random", "method.confidence_file=/etc/hostname"],
                                    "both set"), (["method.confidence_source=guess"], "must be one of"),
                                   (["method.confidence_source=online"], "train.epochs=1 leaves no epoch"),
                                   (["method.confidence_source=online", "train.epochs=2",
                                     "method.reference_model=tiny"], "drop method.reference_model"),
                                   (["method.confidence_source=online", "train.epochs=2",
                                     "method.warmup_epochs=0"], "method.warmup_epochs")):
            with pytest.raises(ConfigError, match=message):
                validate(compose(config_name="train", overrides=["model=tiny", *overrides]))
    for overrides, message in ((["method.checkpoints=17"], "method.checkpoints=17: the 1 warm-up epoch(s) have "
                                                           "only 16 optimizer steps"),
                               (["train.max_steps=12"], "train.max_steps=12 ends before the online split is made "
                                                        "at step 16")):
        proc = launch_cli("train.py", ["model=tiny", "method.confidence_source=online", "train.epochs=2", *overrides,
                                       f"output_dir={tmp_path}/bad"], check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    proc = launch_cli("train.py", ["model=tiny", "method.confidence_source=random", "train.max_steps=1",
                                   "train.eval_every=0", "train.export_final=false", f"output_dir={tmp_path}"])
    assert "reference run" not in proc.stderr
    (stage_dir,) = glob.glob(os.path.join(tmp_path, "confidence", "random-*"))
    records = _confidence(str(tmp_path))
    assert len(records) == 128 and sum(r["split"] == CONFIDENT for r in records.values()) == 64
    assert os.path.exists(os.path.join(stage_dir, "confidence.png"))
    with open(os.path.join(stage_dir, "summary.json")) as f:
        assert json.load(f)["source"] == "random"


@pytest.mark.e2e
def test_the_random_source_on_two_ranks_waits_for_rank_0s_split(tmp_path):
    """The random split is published by rank 0 before any process group exists, where a barrier
    does nothing: the other rank waits for the file, here with rank 0's write delayed by 5 s."""
    launch_cli("train.py", ["model=tiny", "method.confidence_source=random", "train.max_steps=1",
                            "train.micro_batch_size=2", "train.eval_every=0", "train.export_final=false",
                            f"output_dir={tmp_path}"], nproc=2, env={"SFTMIX_FAULT": "slow_publish:0:0"})
    records = _confidence(str(tmp_path))
    assert len(records) == 128 and sum(r["split"] == CONFIDENT for r in records.values()) == 64


# --- confidence_source=online: the run's own warm-up epochs, scored in place ---------------------------

ONLINE = ["model=tiny", "data=jsonl", "train.epochs=2", "train.lr=1e-3", "train.adam_eps=1e-4",
          "train.warmup_ratio=0", "train.export_dtype=fp32", "train.eval_every=0"]
SFTMIX_ONLINE = ["method=sftmix", "method.confidence_source=online", "method.checkpoints=2",
                 "method.score_batch_size=4", "method.mu=0.5"]
ONE_PROCESS = ["train.micro_batch_size=4", "deepspeed=zero3"]
TWO_RANKS = ["train.micro_batch_size=2", "deepspeed=zero3"]  # the same global batch of 4


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """32 examples, global batch 4: 8 NTP steps (scored at steps 4 and 8), then 8 SFTMix steps."""
    root = tmp_path_factory.mktemp("online")
    data = root / "d.jsonl"
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:32]))
    common = ONLINE + [f"data.train_files=[{data}]"]
    runs = {name: str(root / name) for name in ("one", "two", "ntp")}
    launch_cli("train.py", common + ONE_PROCESS + SFTMIX_ONLINE + ["train.export_count=2", f"output_dir={runs['one']}"])
    launch_cli("train.py", common + TWO_RANKS + SFTMIX_ONLINE + [f"output_dir={runs['two']}"], nproc=2)
    launch_cli("train.py", common + ONE_PROCESS + ["method=ntp", "train.export_count=4", f"output_dir={runs['ntp']}"])
    return {"root": root, "common": common, **runs}


def _online_split(run_dir):
    [path] = glob.glob(os.path.join(run_dir, "confidence", "online-*", "confidence.jsonl"))
    records = read_confidence_file(path)
    return {r["id"]: r for r in records}


@pytest.mark.e2e
def test_online_warm_up_epoch_is_an_ntp_epoch_and_its_split_is_stage1s_of_those_states(online):
    one, ntp = read_metrics(online["one"]), read_metrics(online["ntp"])
    assert len(one) == len(ntp) == 16
    strip = lambda r: {k: v for k, v in r.items() if k not in MEASURED and not k.startswith(("confidence/", "pairs",
                                                                                             "lam_", "loss/mix",
                                                                                             "tokens/mix"))}
    assert [strip(r) for r in one[:8]] == [strip(r) for r in ntp[:8]]  # exactly: the warm-up epoch is NTP
    assert all(r["pairs"] == 0 and r["tokens/mix"] == 0 for r in one[:8])
    assert all(r["pairs"] == 2 and r["tokens/mix"] > 0 for r in one[8:])  # then every micro-batch is pairs
    assert one[7]["confidence/n"] == 32 and "confidence/n" not in one[6]
    # Scoring between steps changed nothing: after epoch 1 (step 8) the weights are the NTP run's, bitwise.
    w, ref_w = (_weights(os.path.join(online[name], "model_step_8")) for name in ("one", "ntp"))
    assert w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w)
    # Stage 1's scoring of the NTP run's states at the scoring points gives the same split.
    split = _online_split(online["one"])
    assert len(split) == 32 and sum(r["split"] == CONFIDENT for r in split.values()) == 16
    given = ",".join(os.path.join(online["ntp"], f"model_step_{s}") for s in (4, 8))
    stage1 = str(online["root"] / "stage1")
    score_cli(online["common"] + ONE_PROCESS + ["method.checkpoints=2", "method.score_batch_size=4",
                                                f"method.score_checkpoints=[{given}]", f"output_dir={stage1}"])
    ref = _confidence(stage1)
    assert ref.keys() == split.keys()
    for i in ref:
        assert split[i]["perplexities"] == pytest.approx(ref[i]["perplexities"], rel=1e-5)
        assert split[i]["split"] == ref[i]["split"]


@pytest.mark.e2e
def test_online_two_ranks_zero3_equal_one_process(online):
    a, b = _online_split(online["one"]), _online_split(online["two"])
    assert a.keys() == b.keys()
    for i in a:
        assert b[i]["perplexities"] == pytest.approx(a[i]["perplexities"], rel=1e-5)
        assert b[i]["split"] == a[i]["split"]
    for r, g in zip(read_metrics(online["one"]), read_metrics(online["two"]), strict=True):
        for key in ("loss/ntp", "loss/mix", "lam_mean", "tokens/mix"):
            assert g[key] == pytest.approx(r[key], rel=1e-5), key
    w, ref_w = (_weights(os.path.join(online[name], "model")) for name in ("two", "one"))
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.e2e
def test_online_split_is_in_the_checkpoint_kill_9_in_epoch_2_resumes_bitwise(online):
    """Stopped in the warm-up between the scoring points (step 6: one of two scored), resumed and
    killed in epoch 2 (step 11, after the checkpoint at step 9), resumed again: the same run."""
    run = str(online["root"] / "resumed")
    args = online["common"] + TWO_RANKS + SFTMIX_ONLINE + ["train.save_every=3", f"output_dir={run}"]
    launch_cli("train.py", args + ["train.stop_after_steps=6"], nproc=2)
    proc = launch_cli("train.py", args, nproc=2, check=False, timeout=300, env={"SFTMIX_FAULT": "after_step:1:11"})
    assert proc.returncode != 0 and "resumed from" in proc.stderr and "step_6" in proc.stderr
    proc = launch_cli("train.py", args, nproc=2)
    assert "resumed from" in proc.stderr and "step_9" in proc.stderr
    clean = online["two"]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in MEASURED} for r in rs]
    assert strip(read_metrics(run)) == strip(read_metrics(clean))
    with open(os.path.join(run, "samples.jsonl")) as f, open(os.path.join(clean, "samples.jsonl")) as g:
        assert f.read() == g.read()  # the same examples at every step
    assert _online_split(run) == _online_split(clean)
    w, ref_w = (_weights(os.path.join(d, "model")) for d in (run, clean))
    assert w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w)


@pytest.mark.e2e
def test_two_jobs_racing_for_one_stage_1_build_it_once(stage1, tmp_path):
    """Two sweep points sharing method.stage_dir start together: one runs the reference run and scores,
    the other waits for its split and reuses it; the split is the one a lone run makes."""
    import subprocess

    from .helpers import PY

    shared = tmp_path / "shared"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([PY, os.path.join(ROOT, "launch", "score.py"), *stage1["common"],
                               f"method.stage_dir={shared}", f"output_dir={tmp_path}/point{i}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("stage 1: reference run" in log for log in logs) == 1
    assert sum("built by another job meanwhile" in log for log in logs) == 1
    (folder,) = glob.glob(str(shared / "*"))
    with open(os.path.join(folder, "confidence.jsonl")) as f:
        assert {r["id"]: r for r in map(json.loads, list(f)[1:])} == _confidence(stage1["run"])


@pytest.mark.e2e
def test_a_time_limit_in_the_reference_run_stops_stage_1_and_the_requeued_job_continues_it(stage1, tmp_path):
    """SIGUSR1 during the reference run: it checkpoints and the process exits 0 with no split (nothing is
    scored from an unfinished run); run again, the reference run resumes and the split is stage 1's."""
    run = str(tmp_path / "run")
    stopped = score_cli(stage1["common"] + [f"output_dir={run}"], env={"SFTMIX_FAULT": "usr1:0:2"})
    assert "stopping at step 3 after a checkpoint, for SIGUSR1" in stopped.stderr
    assert "continues from step 3 (resume=auto)" in stopped.stderr and "score model_step" not in stopped.stderr
    assert not glob.glob(os.path.join(run, "confidence", "*", "confidence.jsonl"))
    again = score_cli(stage1["common"] + [f"output_dir={run}"])
    assert "resumed from" in again.stderr and "step_3 at step 3" in again.stderr
    got, ref = _confidence(run), _confidence(stage1["run"])
    assert got.keys() == ref.keys()
    for i in ref:
        assert got[i]["split"] == ref[i]["split"]
        assert got[i]["perplexities"] == pytest.approx(ref[i]["perplexities"], rel=1e-6)


def test_a_stage_claim_whose_process_is_gone_is_taken_over(tmp_path, monkeypatch):
    """A claim left by a dead process on this machine is taken over at once; a live foreign claim is
    waited for, until its result appears."""
    import socket
    import subprocess
    import threading

    from sftmix_ds.confidence import stage

    monkeypatch.setattr(stage, "POLL_S", 0.05)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    folder, done = str(tmp_path / "fp"), str(tmp_path / "fp" / "confidence.jsonl")
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(folder + ".owner", "w") as f:
        f.write(f"@10.0.0.9:999\n{socket.gethostname()} {dead.pid}")
    with stage.owned(folder, done, rank=0) as mine:
        assert mine and stage._read_owner(folder + ".owner")[0] == stage.job_identity()
    assert not os.path.exists(folder + ".owner")  # released
    with open(folder + ".owner", "w") as f:
        f.write(f"@10.0.0.9:999\n{socket.gethostname()} {os.getppid()}")  # alive: waited for
    finish = threading.Timer(0.5, lambda: (os.makedirs(folder), open(done, "w").close()))
    finish.start()
    with stage.owned(folder, done, rank=0) as mine:
        assert mine is False and os.path.exists(done)
    finish.join()


def test_online_splits_of_runs_that_differ_in_their_math_are_published_apart(tmp_path):
    """A sweep's points share method.stage_dir: each publishes its own online split, and a resumed run
    (settings it may change, such as the output folder) finds its own again."""
    from hydra import compose, initialize_config_dir

    from sftmix_ds.config import CONF_DIR, register_configs
    from sftmix_ds.confidence.online import OnlineSplit
    from sftmix_ds.methods.base import RunOptions

    register_configs()

    def folder(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            options = RunOptions.of(compose(config_name="train", overrides=["method.confidence_source=online",
                                                                            *overrides]))
        split = OnlineSplit(str(tmp_path), options.seed, options.run_digest)
        split.plan(["a", "b"], [1, 2])
        return split.folder()

    base = folder()
    assert os.path.dirname(base) == str(tmp_path) and os.path.basename(base).startswith("online-")
    assert folder("output_dir=/elsewhere", "train.log_every=7") == base
    assert len({base, folder("train.lr=1e-3"), folder("method.mu=0.5"), folder("train.seed=1")}) == 4


def test_checkpoints_of_the_same_folder_name_keep_their_scores_apart(tmp_path):
    from sftmix_ds.confidence.stage import scores_cache

    stage = str(tmp_path / "stage")
    one, two = scores_cache(stage, "/runs/a/model"), scores_cache(stage, "/runs/b/model/")
    assert one != two and os.path.basename(one).startswith("scores_model_")
    assert scores_cache(stage, "/runs/a/./model") == one
    # The reference run's exports live in the stage folder: their names do not change when it moves.
    moved = str(tmp_path / "moved")
    inside = os.path.basename(scores_cache(stage, os.path.join(stage, "reference", "model_step_4")))
    assert inside == os.path.basename(scores_cache(moved, os.path.join(moved, "reference", "model_step_4")))
