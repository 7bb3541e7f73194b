import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from sftmix_ds.cli import strip_local_rank
from sftmix_ds.config import CONF_DIR, ConfigError, register_configs, validate

from .conftest import train_cli


def cfg_with(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = cfg_with()
    validate(cfg)
    assert cfg.method.name == "sftmix" and cfg.deepspeed.zero_stage == 3 and cfg.model.source == "smollm2"
    assert cfg.data.train_files[0].endswith("sftmix_ds/builtin_data/arith_train.jsonl")


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
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["train.py", "--local_rank=3", "model=tiny"]) == ["train.py", "model=tiny"]
    assert strip_local_rank(["train.py", "--local_rank", "1", "a=b"]) == ["train.py", "a=b"]


def test_cli_rejects_bad_config_and_bad_data_before_training(tmp_path):
    proc = train_cli(["model=tiny", "method=ntp", "train.lrr=1", f"output_dir={tmp_path}/a"], check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    proc = train_cli(["model=tiny", "method=ntp", "data=jsonl", f"data.train_files=[{bad}]", f"output_dir={tmp_path}/b"],
                     check=False)
    assert proc.returncode == 2
    assert f"error: {bad}:2: missing field 'output'" in proc.stderr
    assert "Traceback" not in proc.stderr and "train:" not in proc.stderr  # stopped before training
