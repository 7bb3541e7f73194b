"""One stage's DeepSpeed engine: model loading, engine, step, memory, export (the process group
and host collectives live in collectives.py, checkpoints in checkpoint.py).

Nothing outside engine/ imports deepspeed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Optional

import torch

from ..common import ConfigError, UserError, out_of_space, torch_dtype
from ..config import resolve_zero_stage
from ..models import attention_implementation, decoder_blocks
from .collectives import Collectives
from .long_context import ActivationOffload, tile_feed_forwards

log = logging.getLogger(__name__)


class DeepSpeedStrategy:
    def __init__(self, ds_cfg, train_cfg, comm: Optional[Collectives] = None):
        """comm: this process's Collectives (made here for a job of one stage)."""
        self.comm = comm or Collectives(ds_cfg, train_cfg.precision)
        self.cfg, self.train_cfg = ds_cfg, train_cfg
        self.sequence = self.comm.sequence  # the sequence-parallel group (None: whole sequences on every rank)
        self.zero_stage, why = resolve_zero_stage(ds_cfg, self.comm.world_size)
        if ds_cfg.zero_stage == "auto":
            log.info("ZeRO stage %d: %s", self.zero_stage, why)
        self.ds_config = deepspeed_config(ds_cfg, train_cfg, self.comm.world_size, self.comm.precision,
                                          self.comm.on_gpu, self.zero_stage)
        self._hf_ds_config = None
        self.engine = None

    def load_model(self, path: str, attn_implementation: str = "auto", adapters: bool = False):
        """A transformers model, built partitioned under ZeRO-3 (never whole on one rank). adapters: LoRA
        adapters will be added (their frozen base weights rule out gathering per block)."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        if self.zero_stage == 3:
            self._size_zero3_buckets(path)
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # must stay alive while from_pretrained runs
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.comm.dtype,
                                                     attn_implementation=attention_implementation(path,
                                                                                                  attn_implementation))
        per_block = self.zero_stage == 3 and self.cfg.gather_per_block
        if per_block and adapters:  # DeepSpeed's leaf modules: its zero_grad fails on frozen weights
            log.info("deepspeed.gather_per_block: off with LoRA adapters (DeepSpeed's leaf modules do not support "
                     "frozen weights); ZeRO-3 gathers layer by layer")
            per_block = False
        if per_block:
            self._gather_per_block(model)
        if self.train_cfg.mlp_tiles > 1:
            # ZeRO-3 gathering module by module: every rank must call the feed-forward's layers equally often
            every_tile = self.zero_stage == 3 and not per_block
            tile_feed_forwards(decoder_blocks(model), self.train_cfg.mlp_tiles, every_tile)
            log.info("train.mlp_tiles: each feed-forward in %d tiles of tokens%s", self.train_cfg.mlp_tiles,
                     " (empty ones too: ZeRO-3 gathers layer by layer, so every rank makes the same calls)"
                     if every_tile else "")
        if self.train_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.train_cfg.compile:
            if self.zero_stage == 3 and not per_block:
                raise ConfigError("train.compile under ZeRO-3 needs deepspeed.gather_per_block=true (and no "
                                  "peft=lora): DeepSpeed's hooks on every layer inside a compiled block make it "
                                  "recompile at every step; with LoRA use ZeRO-2 (deepspeed=zero2), or "
                                  "train.compile=false")
            for block in decoder_blocks(model):
                # The block's own forward: hooks on the block (ZeRO-3's gathering) stay outside the graph.
                block.forward = torch.compile(block.forward, dynamic=True)
        model.config.use_cache = False
        return model

    def _size_zero3_buckets(self, path: str) -> None:
        """ZeRO-3's communication buckets sized to the model, as the HF Trainer's "auto" does;
        DeepSpeed's defaults (5e8 elements, 2 GB in fp32 each) are meant for large models and
        dominate a small model's memory. Values given in deepspeed.extra win."""
        from transformers import AutoConfig

        hidden = getattr(AutoConfig.from_pretrained(path), "hidden_size", None)
        if hidden:
            zero = self.ds_config["zero_optimization"]
            zero.setdefault("reduce_bucket_size", hidden * hidden)
            zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)

    def _gather_per_block(self, model) -> None:
        """The decoder blocks' class as ZeRO-3 leaf modules (deepspeed.gather_per_block), beside DeepSpeed's
        own list (MoE blocks); a list given in deepspeed.extra wins."""
        from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

        try:
            block = type(decoder_blocks(model)[0])
        except UserError as e:  # an unusual layout: every module keeps its own hooks
            log.info("deepspeed.gather_per_block: %s; gathering module by module", e)
            return
        leaf = self.ds_config["zero_optimization"].setdefault("leaf_module", {})
        leaf.setdefault("classes", [*DEFAULT_LEAF_MODULE_CLASSES, f"{block.__module__}.{block.__qualname__}"])

    def register_external_parameter(self, module, param) -> None:
        """Let `module`'s forward use a parameter owned by another module (ZeRO-3 gathers it)."""
        if self.zero_stage == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(module, param)

    def prepare(self, module, total_steps: int):
        import deepspeed

        t = self.train_cfg
        decay, no_decay = [], []
        for p in module.parameters():
            if p.requires_grad:
                ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 parameters are flattened
                (decay if ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        warmup = int(t.warmup_ratio * total_steps)

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, warmup,
                                                                                     t.min_lr_ratio))

        module.train()  # from_pretrained gives a model in eval mode: no dropout, no gradient checkpointing
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=groups, config=self.ds_config,
                                               lr_scheduler=schedule)
        log.info("DeepSpeed runs ZeRO stage %d; effective config: %s", self.engine.zero_optimization_stage(),
                 json.dumps(self.ds_config, sort_keys=True))
        return self.engine

    def prepare_inference(self, module):
        """An engine for forward passes only: ZeRO-3 keeps weights partitioned; below
        stage 3 the whole model sits on each device."""
        import deepspeed

        config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "gradient_clipping")}
        if self.zero_stage != 3:
            config["zero_optimization"] = {"stage": 0}
        self.engine, *_ = deepspeed.initialize(model=module, config=config)
        return self.engine

    def saved_activations(self):
        """The context of a step's forwards and backwards: train.offload_activations moves what they save for
        backward to host memory."""
        if not self.train_cfg.offload_activations:
            return contextlib.nullcontext()
        return ActivationOffload(self.comm.device)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """`loss` is already normalised by global token counts; DeepSpeed averages gradients
        over ranks and would divide by grad_accum, so undo both here."""
        self.engine.backward(loss * self.comm.world_size, scale_wrt_gas=False)
        self.engine.step()

    def grad_norm(self):
        """The last step's global gradient norm as DeepSpeed keeps it (a tensor on the device, a number, or
        None where it is not computed): read on the host with the step's other values."""
        return self.engine.get_global_grad_norm()

    def skips_nonfinite_updates(self) -> bool:
        """Whether DeepSpeed leaves the weights as they were after a step whose gradient norm is NaN/inf
        (ZeRO 1-3 check it unless deepspeed.extra turns the norm or, in bf16, the check off)."""
        zero, bf16 = self.ds_config["zero_optimization"], self.ds_config.get("bf16", {})
        checked = not bf16.get("enabled") or bf16.get("check_grad_overflow", True)
        return self.zero_stage >= 1 and zero.get("compute_grad_norm", True) and checked

    def update_applied(self) -> bool:
        return self.engine.was_step_applied()

    def peak_memory_gb(self) -> float:
        """Peak accelerator memory allocated (GPU), else this process's peak resident memory."""
        if self.comm.on_gpu:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def peak_reserved_gb(self) -> Optional[float]:
        """Peak memory the CUDA caching allocator held (what other processes could not have): GPU only."""
        return torch.cuda.max_memory_reserved() / 2**30 if self.comm.on_gpu else None

    def update_skipped(self) -> bool:
        """Whether the last step's update was skipped by fp16 loss scaling (an overflow: DeepSpeed lowers
        the scale and reports an infinite gradient norm; the weights are untouched)."""
        return self.engine.fp16_enabled() and not self.update_applied()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def release(self) -> None:
        """Drop the engine (and with it model, optimizer and ZeRO state) before the next stage,
        logging the stage's peak memory (on CUDA the peak counter then starts again)."""
        log.info("stage peak memory: %.2f GB (%s)", self.peak_memory_gb(),
                 f"this stage's allocated, {self.peak_reserved_gb():.2f} GB reserved" if self.comm.on_gpu
                 else "the process's so far: resident memory cannot be reset")
        if self.comm.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        if self.sequence is not None:
            self.sequence.uninstall()
        if self.engine is not None:
            self.engine.destroy()
            _drop_zero3_globals()
        self.engine, self._hf_ds_config = None, None
        import gc

        gc.collect()

    def layout(self) -> dict:
        """What a checkpoint's files depend on: the rank count and the ZeRO stage."""
        return {"world_size": self.comm.world_size, "zero_stage": self.zero_stage}

    def use_universal_checkpoints(self) -> None:
        """Load checkpoints through their universal conversion (another rank count than they were
        written by). Before prepare()."""
        self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

    def export(self, out_dir: Optional[str], model, tokenizer, dtype: str, prefix: str = "",
               adapter_dir: Optional[str] = None) -> None:
        """Consolidated 16-bit (or fp32) safetensors + config + tokenizer, loadable by from_pretrained.

        `model` is the transformers model inside the engine's module, whose
        parameters appear under `prefix` in the engine's state dict. A LoRA model
        (sftmix_ds.adapters) is exported merged to out_dir (None: not at all), and
        its adapter folder to adapter_dir when given.
        """
        from safetensors import SafetensorError

        from ..adapters import is_peft, merged_state, save_adapter

        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective
        else:
            state = self.engine.module.state_dict() if self.comm.rank == 0 else None
        error = None
        if self.comm.rank == 0:
            try:
                export_dtype = torch_dtype(dtype)
                # clone: ZeRO-1/2 parameters are views into one flat buffer, which safetensors refuses
                state = {k[len(prefix):]: v.detach().to("cpu").clone() for k, v in state.items()
                         if k.startswith(prefix)}
                if is_peft(model):
                    if adapter_dir:
                        save_adapter(model, state, adapter_dir, export_dtype)
                    state, model = merged_state(model, state), model.get_base_model()
                if out_dir is not None:
                    _write_export(out_dir, {k: v.to(export_dtype) for k, v in state.items()}, model, tokenizer,
                                  export_dtype)
            except (OSError, RuntimeError, SafetensorError) as e:  # safetensors' own type for a failed write
                for folder in (out_dir, adapter_dir):
                    if folder:
                        shutil.rmtree(f"{folder}.tmp", ignore_errors=True)
                error = out_of_space(out_dir or adapter_dir, e) or e
        if self.comm.any_rank(error is not None):  # every rank stops, none waits on the others
            if error is not None:
                raise error
            raise UserError(f"export to {out_dir} failed on rank 0 (its log says why)")


def _write_export(out_dir: str, state: dict, model, tokenizer, export_dtype) -> None:
    """out_dir written whole from the gathered state (rank 0), or left as it was."""
    from huggingface_hub import save_torch_state_dict

    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"export: parameters with no elements (ZeRO-3 partitions leaked): {empty[:5]}")
    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_torch_state_dict(state, tmp, max_shard_size="5GB")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.dtype = export_dtype
    config.use_cache = True
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _drop_zero3_globals() -> None:
    """ZeRO-3 keeps references that engine.destroy() leaves in place, each of which keeps the
    whole model (and so its parameters and optimizer state) alive into the next stage: the
    outermost module on a module-level stack, and a class-wide lru_cache keyed by modules."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK.clear()
    method = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(method, "__closure__", None) or ():  # under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def deepspeed_config(ds, t, world_size: int, precision: str, on_gpu: bool, zero_stage: int) -> dict:
    """The DeepSpeed config of the typed options (zero_stage: deepspeed.zero_stage resolved), with
    deepspeed.extra merged in key by key (nested keys join their section, not replace it)."""
    zero = {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps, "weight_decay": t.weight_decay,
            **optimizer_implementation(on_gpu, ds.offload_optimizer)}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    from omegaconf import OmegaConf

    extra = OmegaConf.to_container(ds.extra, resolve=True) if OmegaConf.is_config(ds.extra) else dict(ds.extra)
    return _merge(config, extra)


def optimizer_implementation(on_gpu: bool, offload: bool) -> dict:
    """torch's AdamW through DeepSpeed's pass-through (torch_adam), fused on CUDA: DeepSpeed's own
    FusedAdam is compiled with nvcc at the first step on every fresh machine (minutes, or a failure
    where nvcc, ninja or a known CUDA version is missing); torch's fused kernel ships built.
    With the optimizer offloaded DeepSpeed runs its CPU Adam instead."""
    if offload:
        return {"torch_adam": False}
    return {"torch_adam": True, **({"fused": True} if on_gpu else {})}


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    import math

    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


