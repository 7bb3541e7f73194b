import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from sftmix_ds.cli import strip_local_rank
from sftmix_ds.config import CONF_DIR, ConfigError, register_configs, validate

from .helpers import ROOT, train_cli


def cfg_with(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = cfg_with()
    validate(cfg)
    assert cfg.method.name == "sftmix" and cfg.deepspeed.zero_stage == "auto" and cfg.model.source == "smollm2"
    assert cfg.data.train_files[0].endswith("sftmix_ds/builtin_data/arith_train.jsonl")


def test_zero_stage_auto_is_zero2_on_one_rank_zero3_on_several_and_the_checkpoints_when_resuming():
    from sftmix_ds.config import resolve_zero_stage

    auto = cfg_with().deepspeed
    assert resolve_zero_stage(auto, 1)[0] == 2 and resolve_zero_stage(auto, 8)[0] == 3
    assert resolve_zero_stage(auto, 1, written=3)[0] == 3 and resolve_zero_stage(auto, 8, written=2)[0] == 2
    assert resolve_zero_stage(cfg_with("deepspeed=zero3_offload").deepspeed, 1)[0] == 3  # offload_params needs ZeRO-3
    offload_auto = cfg_with("deepspeed.offload_params=true").deepspeed
    validate(cfg_with("deepspeed.offload_params=true"))
    assert resolve_zero_stage(offload_auto, 1) == (3, "deepspeed.zero_stage=auto with deepspeed.offload_params")
    assert resolve_zero_stage(cfg_with("deepspeed=zero3").deepspeed, 1, written=2)[0] == 3  # a set stage is kept
    with pytest.raises(ConfigError, match="deepspeed.zero_stage='two': must be one of auto, 0, 1, 2, 3"):
        validate(cfg_with("deepspeed.zero_stage=two"))


@pytest.mark.parametrize("key", ["data.weights", "data.num_proc", "train.micro_batch_size", "train.grad_accum",
                                 "train.pad_to_multiple_of"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "1e15", "1000000000000000"])
def test_numbers_that_size_allocations_are_bounded_before_anything_allocates(key, value):
    override = f"{key}=[{value}]" if key == "data.weights" else f"{key}={value}"
    if value == "0" and key in ("data.num_proc", "train.pad_to_multiple_of"):  # 0: automatic
        validate(cfg_with(override))
        return
    with pytest.raises((ConfigError, ConfigCompositionException), match=key.split(".")[1]):
        validate(cfg_with(override))


def test_a_slurm_sweep_point_runs_one_task_per_gpu_set_in_one_place():
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for extra, tasks in (([], 1), (["hydra.launcher.gpus_per_node=8"], 8)):
            launcher = compose(config_name="train", overrides=["hydra/launcher=slurm", *extra],
                               return_hydra_config=True).hydra.launcher
            assert (launcher.tasks_per_node, launcher.gpus_per_node) == (tasks, 8 if extra else 0)


def test_a_slurm_sweep_points_time_limit_signal_must_come_after_it_starts():
    """The shipped launcher requeues a point at its time limit (max_num_timeout > 0) with its signal 300 s
    ahead; a delay as long as the limit would signal every point as it starts, and is refused."""
    from sftmix_ds.cli import check_signal_delay

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        config = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        launcher = config.hydra.launcher
        assert (launcher.signal_delay_s, launcher.max_num_timeout) == (300, 20)
        check_signal_delay(launcher)
        launcher.timeout_min = 5
        with pytest.raises(ConfigError, match=r"hydra.launcher.signal_delay_s=300: .*timeout_min=5"):
            check_signal_delay(launcher)


RECIPES = sorted(f[:-len(".yaml")] for f in os.listdir(os.path.join(CONF_DIR, "recipe")))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_validates_with_a_tiny_stand_in_and_keeps_its_papers_settings(recipe):
    """Each recipe with the tiny model standing in for its 7-8B one and the shipped data standing in for
    the user's: it validates, and its header states what it was sized for and what to override."""
    data = os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")
    cfg = cfg_with(f"recipe={recipe}", "model=tiny", f"data.train_files=[{data}]")
    validate(cfg)
    t = cfg.train
    with open(os.path.join(CONF_DIR, "recipe", f"{recipe}.yaml")) as f:
        header = f.read()
    assert "Sized for" in header and "Yours to set: data.train_files" in header and "arXiv" in header
    gpus = 8 if cfg.peft.kind == "none" else 1  # full fine-tuning on a node of 8, LoRA on one GPU
    assert t.micro_batch_size * t.grad_accum * gpus == 32 and t.gradient_checkpointing and t.save_every_minutes
    if cfg.method.name == "sftmix":  # the SFTMix paper's settings
        assert (cfg.method.mu, cfg.method.alpha, t.weight_decay, t.warmup_ratio, t.epochs) == (0.2, 0.5, 0.1, 0.1, 3)
        assert t.micro_batch_size % 2 == 0 and (t.lr == 2e-6 or cfg.peft.kind == "lora")
    else:
        assert cfg.method.name == "s3ft" and cfg.peft.kind == "lora" and cfg.peft.r == 8  # the S3FT paper's
    assert cfg_with(f"recipe={recipe}", "train.lr=1e-5").train.lr == 1e-5  # the command line still wins


@pytest.mark.parametrize("group,option", [("model", "tiny"), ("model", "llama3_8b"), ("deepspeed", "zero2"),
                                          ("deepspeed", "zero3_offload"), ("logger", "wandb"), ("data", "jsonl")])
def test_every_group_option_composes(group, option):
    assert cfg_with(f"{group}={option}")[group] is not None


def test_unknown_key_is_rejected_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        cfg_with("train.lrr=1e-4")
    assert "lrr" in str(e.value.__cause__ or e.value)


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        cfg_with("train.micro_batch_size=four")
    assert "micro_batch_size" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override,key", [("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
                                          ("train.precision=fp8", "train.precision"),
                                          ("train.micro_batch_size=0", "train.micro_batch_size"),
                                          ("data.overlong=cut", "data.overlong"),
                                          ("model=llama3_8b", "model.path")])
def test_semantic_checks_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg_with(override))


def test_local_rank_argument_is_stripped(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "")  # recorded, so the LOCAL_RANK set below is undone after the test
    monkeypatch.delenv("LOCAL_RANK")  # (a leaked LOCAL_RANK=3 makes in-process lm-eval return nothing)
    assert strip_local_rank(["train.py", "--local_rank=3", "model=tiny"]) == ["train.py", "model=tiny"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_local_rank(["train.py", "--local_rank", "1", "a=b"]) == ["train.py", "a=b"]


@pytest.mark.e2e
def test_cli_rejects_bad_config_and_bad_data_before_training(tmp_path):
    proc = train_cli(["model=tiny", "method=ntp", "train.lrr=1", f"output_dir={tmp_path}/a"], check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    proc = train_cli(["model=tiny", "method=ntp", "data=jsonl", f"data.train_files=[{bad}]",
                      f"output_dir={tmp_path}/b"],
                     check=False)
    assert proc.returncode == 2
    assert f"error: {bad}:2: missing field 'output'" in proc.stderr
    assert "Traceback" not in proc.stderr and "train:" not in proc.stderr  # stopped before training


GROUPS = sorted(g for g in os.listdir(CONF_DIR)  # recipes have a test of their own
                if os.path.isdir(os.path.join(CONF_DIR, g)) and g not in ("hydra", "recipe"))
OPTIONS = [(g, f[:-len(".yaml")]) for g in GROUPS for f in sorted(os.listdir(os.path.join(CONF_DIR, g)))]


@pytest.mark.parametrize("group,option", OPTIONS)
@pytest.mark.parametrize("method", ["ntp", "sftmix", "s3ft"])
def test_every_option_of_every_group_validates_with_every_method(group, option, method):
    overrides = [f"method={method}", f"{group}={option}"]
    if (group, option) == ("data", "jsonl"):
        overrides.append(f"data.train_files=[{os.path.join(ROOT, 'sftmix_ds', 'builtin_data', 'arith_train.jsonl')}]")
    cfg = cfg_with(*overrides)
    if cfg.model.source == "hf" and not os.path.isdir(cfg.model.path):
        with pytest.raises(ConfigError, match=r"model\.path"):  # a real checkpoint the user must point to
            validate(cfg)
    else:
        validate(cfg)


@pytest.mark.parametrize("config_name", ["train", "score", "eval", "s3ft_build"])
def test_every_entry_point_config_validates(config_name):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        validate(compose(config_name=config_name))


def test_a_misspelled_eval_judge_fails_before_training():
    with pytest.raises(ConfigError, match=r"eval\.tasks\[0\]\.judge='numerc' \(set 'arith'\): unknown judge"):
        validate(cfg_with("eval=arith", "eval.tasks.0.judge=numerc"))
    with pytest.raises(ConfigError, match=r"eval\.general\[0\]\.judge='no_such_module\.judge'.*cannot be imported"):
        validate(cfg_with("eval=arith", "eval.general.0.judge=no_such_module.judge"))
    with pytest.raises(ConfigError, match=r"data\.judge='fuzzy'"):
        validate(cfg_with("method=s3ft", "data.judge=fuzzy"))
    validate(cfg_with("method=s3ft", "data.judge=llm"))  # the llm judge exists for S3FT targets


def test_each_method_module_registers_its_own_schema():
    from sftmix_ds.config import method_schemas

    yamls = os.listdir(os.path.join(CONF_DIR, "method"))
    assert {s.name for s in method_schemas()} == {f[:-len(".yaml")] for f in yamls}


@pytest.mark.parametrize("overrides,message", [
    (["train.min_lr_ratio=-5"], r"train\.min_lr_ratio=-5\.0: must be in \[0, 1\]"),
    (["train.min_lr_ratio=1.5"], r"train\.min_lr_ratio=1\.5"),
    (["train.betas=[0.9,1.0]"], r"train\.betas\[1\]=1\.0: must be in \[0, 1\)"),
    (["train.betas=[-0.1,0.9]"], r"train\.betas\[0\]"),
    (["deepspeed.timeout_minutes=0"], r"deepspeed\.timeout_minutes=0: must be > 0"),
    (["deepspeed.timeout_minutes=-3"], r"deepspeed\.timeout_minutes"),
    (["deepspeed.peer_timeout_s=2"], r"deepspeed\.peer_timeout_s=2"),
    (["deepspeed.peer_timeout_s=-1"], r"deepspeed\.peer_timeout_s"),
    (["train.log_every=0"], r"train\.log_every=0: must be > 0"),
    (["train.lr=nan"], r"train\.lr=nan: must be a finite number"),
    (["train.lr=inf"], r"train\.lr=inf: must be a finite number"),
    (["train.adam_eps=0"], r"train\.adam_eps=0"),
    (["train.warmup_ratio=1.0"], r"train\.warmup_ratio=1\.0: must be in \[0, 1\)"),
    (["train.max_steps=0"], r"train\.max_steps=0: must be > 0"),
    (["train.max_steps=-7"], r"train\.max_steps=-7"),
    (["train.max_nonfinite_steps=-1"], r"train\.max_nonfinite_steps"),
    (["train.precision=fp16"], r"train\.precision=fp16: needs a CUDA GPU"),
    (["model.attn_implementation=flash_attention_2", "train.precision=fp32"],
     r"flash_attention_2: flash attention runs in bf16 or fp16 only, and train\.precision=fp32"),
    (["model.attn_implementation=varlen", "train.sequence_parallel=2"],
     r"attn_implementation=varlen: not with train\.sequence_parallel > 1"),
    (["deepspeed.build_lock_wait_minutes=-1"], r"deepspeed\.build_lock_wait_minutes"),
    (["eval=arith", "eval.batch_size=0"], r"eval\.batch_size=0"),
    (["+data.eval_sets.unseen=[]"], r"data\.eval_sets\.unseen: a set needs .* at least one file"),
    (["eval=arith", "eval.tasks.0.limit=-1"], r"eval\.tasks\[0\]\.limit=-1"),
    (["method=s3ft", "method.top_p=0"], r"method\.top_p=0\.0: must be in \(0, 1\]"),
    (["method=s3ft", "method.temperature=0"], r"method\.temperature=0"),
    (["method=sftmix", "method.alpha=0"], r"method\.alpha=0"),
    (["method=sftmix", "method.checkpoints=100000", "method.confidence_source=online", "train.epochs=2"],
     r"method\.checkpoints=100000: at most 64\. Each scoring point costs a pass over the training set"),
    (["method=sftmix", "method.mu=-0.1"], r"method\.mu=-0\.1"),
    (["+deepspeed.extra.zero_optimization.stage=0"],
     r"deepspeed\.extra\.zero_optimization\.stage: set by deepspeed\.zero_stage"),
    (["+deepspeed.extra.train_batch_size=64"], r"deepspeed\.extra\.train_batch_size: set by train\.micro_batch_size"),
    (["+deepspeed.extra.optimizer.params.lr=1"], r"deepspeed\.extra\.optimizer: set by train\.lr"),
    (["+deepspeed.extra.bf16.enabled=true"], r"deepspeed\.extra\.bf16: set by train\.precision"),
    (["resume=/tmp"], r"resume='/tmp': must be auto, none, or a complete checkpoint folder"),
])
def test_out_of_range_and_conflicting_values_are_refused_naming_the_key(overrides, message):
    if "fp16" in overrides[0]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is valid on this CUDA machine")
    with pytest.raises(ConfigError, match=message):
        validate(cfg_with(*overrides))


def test_the_optimizer_needs_no_build_on_gpu_and_the_device_follows_the_binding():
    """torch's AdamW (fused on CUDA) through DeepSpeed's pass-through, never its nvcc-built FusedAdam;
    DeepSpeed's CPU Adam where the optimizer is offloaded. One visible GPU (Slurm binding one per
    task) is device 0 whatever the local rank."""
    from sftmix_ds.engine.collectives import device_index
    from sftmix_ds.engine.strategy import deepspeed_config

    cfg = cfg_with()
    params = lambda cfg, on_gpu: deepspeed_config(cfg.deepspeed, cfg.train, 1, "bf16", on_gpu, 3)["optimizer"]["params"]
    assert params(cfg, True)["torch_adam"] is True and params(cfg, True)["fused"] is True
    assert params(cfg, False)["torch_adam"] is True and "fused" not in params(cfg, False)
    assert params(cfg_with("deepspeed=zero3_offload"), True)["torch_adam"] is False
    assert [device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert [device_index(r, 1) for r in (0, 3, 7)] == [0, 0, 0]
    with pytest.raises(RuntimeError, match="local rank 4 but this process sees 2 GPUs"):
        device_index(4, 2)


def test_nested_deepspeed_extra_keys_merge_into_their_section():
    from sftmix_ds.engine.strategy import deepspeed_config

    cfg = cfg_with("deepspeed=zero2", "+deepspeed.extra.zero_optimization.overlap_comm=false",
                   "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000",
                   "+deepspeed.extra.flops_profiler.enabled=false")
    validate(cfg)
    ds = deepspeed_config(cfg.deepspeed, cfg.train, 2, "fp32", on_gpu=False, zero_stage=2)
    assert ds["zero_optimization"] == {"stage": 2, "stage3_gather_16bit_weights_on_model_save": True,
                                       "overlap_comm": False, "reduce_bucket_size": 1000}
    assert ds["flops_profiler"] == {"enabled": False} and ds["train_batch_size"] == 2 * cfg.train.micro_batch_size


@pytest.mark.e2e
def test_bad_output_dirs_are_refused_naming_the_folder(tmp_path):
    from sftmix_ds.config import check_output_dir

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for path, message in (("", "output_dir: empty"), (str(a_file), "is a file, not a folder"),
                          (str(a_file / "run"), "which is a file"), ("/proc/1/run", "is not writable")):
        with pytest.raises(ConfigError, match=message):
            check_output_dir(path)
    check_output_dir(str(tmp_path / "new" / "run"))  # not there yet: made later
    assert not (tmp_path / "new").exists()
    for override, message in (("train.seed=-1", r"train.seed=-1: must be in \[0, 4294967295\]"),
                              ("train.seed=4294967296", "train.seed=4294967296: must be in"),
                              (f"data.cache_dir={a_file}", f"data.cache_dir='{a_file}': is a file"),
                              ("data.cache_dir=/proc/cache", "data.cache_dir='/proc/cache': '/proc' is not writable"),
                              ("model_cache_dir=/proc/models", "model_cache_dir='/proc/models': '/proc' is not")):
        with pytest.raises(ConfigError, match=message):
            validate(cfg_with("model=tiny", "method=ntp", override))
    proc = train_cli(["model=tiny", "method=ntp", f"output_dir={a_file / 'run'}"], check=False)
    assert proc.returncode == 2 and "which is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_default_folder_names_tell_models_and_data_apart(tmp_path):
    assert cfg_with().output_dir == "outputs/sftmix-smollm2_135m-arith"  # the embedded default keeps its name
    assert cfg_with("model=tiny", "method=ntp").output_dir == "outputs/ntp-tiny-arith"
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"  # two exports, both called model
    names = {cfg_with("model.source=hf", f"model.path={p}").output_dir for p in (a, b)}
    assert len(names) == 2 and all("a_model-" in n or "b_model-" in n for n in names)
    one, two = tmp_path / "x" / "train.jsonl", tmp_path / "y" / "train.jsonl"
    data = {cfg_with("data=jsonl", f"data.train_files=[{p}]").output_dir for p in (one, two)}
    assert len(data) == 2 and all(n.startswith("outputs/sftmix-smollm2_135m-custom-train-") for n in data)


@pytest.mark.e2e
def test_an_unset_required_value_is_named_not_a_traceback(tmp_path):
    proc = train_cli(["data=jsonl", "model=tiny"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: data.train_files: required and not set" in proc.stderr
