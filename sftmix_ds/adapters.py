"""LoRA adapters (the `peft` config group), through the `peft` library.

The adapters wrap the decoder's linear layers; everything else, the LM head
included, is frozen, so the fused loss computes no head gradient. Under
ZeRO-3 the base weights are partitioned at load and the adapters are
partitioned by DeepSpeed with the rest. An export gathers the whole state
once and writes from it: the adapter folder (PeftModel.from_pretrained
loads it onto the base model) and the merged plain transformers folder,
W + scaling * B A for each wrapped layer, that evaluation, scoring and
generation read like any other model.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

import torch
from torch import nn

from .config import ConfigError
from .models import decoder_blocks

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter


def _is_linear(module) -> bool:
    """A layer peft's LoRA wraps: nn.Linear, or GPT-2's Conv1D (a linear layer stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def decoder_linear_names(model) -> List[str]:
    """The distinct names of the linear layers inside the decoder blocks (q_proj, ..., down_proj)."""
    names = set()
    for layer in decoder_blocks(model):
        names.update(name.rsplit(".", 1)[-1] for name, module in layer.named_modules() if _is_linear(module))
    return sorted(names)


def unadapted_weights(model) -> List[str]:
    """Class names of the decoder-block modules holding weight matrices that are not linear layers,
    so no LoRA target can reach them: the fused expert weights of MoE models (Qwen3-MoE, Mixtral)."""
    found = set()
    for module in decoder_blocks(model)[0].modules():
        if not _is_linear(module) and any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            found.add(type(module).__name__)
    return sorted(found)


def lora_targets(model, peft_cfg) -> List[str]:
    """peft.target_modules (default: every linear layer of the decoder blocks), each checked to
    name one of them."""
    available = decoder_linear_names(model)
    targets = list(peft_cfg.target_modules) if peft_cfg.target_modules else available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ConfigError(f"peft.target_modules: {unknown} match no linear layer of {type(model).__name__}'s decoder "
                          f"blocks; they have {available}")
    return targets


def check_lora_targets(model_path: str, peft_cfg) -> None:
    """lora_targets on the model's architecture built on the meta device (no weights, no memory),
    so a bad target fails before any process group starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    lora_targets(model, peft_cfg)
    frozen = unadapted_weights(model)
    if frozen:
        log.warning("peft=lora: %s in %s's decoder blocks hold weights that are not linear layers (an MoE block's "
                    "fused experts or its router); LoRA does not adapt them and they stay frozen", ", ".join(frozen),
                    type(model).__name__)


def apply_lora(model, peft_cfg):
    """The model with LoRA adapters on the target layers; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    transposed = any(isinstance(m, Conv1D) for m in decoder_blocks(model).modules())
    config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                        target_modules=lora_targets(model, peft_cfg), bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=transposed)
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_adapter(model, state: Dict[str, torch.Tensor], out_dir: str, dtype: torch.dtype) -> None:
    """The adapter folder (adapter_config.json, adapter_model.safetensors, tensors in `dtype`) from
    the gathered full state (the PeftModel's own key names), written whole or not at all."""
    import shutil

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    adapter = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER)
    save_file({k: v.to(dtype).contiguous() for k, v in adapter.items()},
              os.path.join(tmp, "adapter_model.safetensors"))
    model.peft_config[ADAPTER].save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def merged_state(model, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The plain model's state dict from a PeftModel's gathered one: each wrapped layer's weight
    W + scaling * B @ A (computed in fp32), adapter tensors dropped, names as the base model's."""
    from peft.tuners.lora import LoraLayer

    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            a = state.pop(f"{name}.lora_A.{ADAPTER}.weight").float()
            b = state.pop(f"{name}.lora_B.{ADAPTER}.weight").float()
            key = f"{name}.base_layer.weight"
            delta = b @ a
            if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W transposed
                delta = delta.T
            state[key] = state[key].float() + module.scaling[ADAPTER] * delta
    prefix = "base_model.model."
    leftover = [k for k in state if "lora_" in k]
    if leftover:
        raise RuntimeError(f"export: adapter tensors not merged (an unsupported LoRA variant?): {leftover[:3]}")
    return {k[len(prefix):].replace(".base_layer.", "."): v for k, v in state.items()}


def adapter_summary(model) -> str:
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    config = model.peft_config[ADAPTER]
    return (f"LoRA r={config.r} alpha={config.lora_alpha} dropout={config.lora_dropout} on "
            f"{json.dumps(sorted(config.target_modules))}: {trainable:,} of {total:,} parameters train")
