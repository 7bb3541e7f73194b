"""Model families other than Llama: attention each architecture supports, GPT-2's blocks and Conv1D
layers under LoRA, MoE routers and fused experts. Tiny random models, SmolLM2's tokenizer."""
import logging
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sftmix_ds.adapters import apply_lora, check_lora_targets, merged_state, unadapted_weights
from sftmix_ds.config import ConfigError, PeftConfig, validate
from sftmix_ds.models import SMOLLM2_TOKENIZER, attention_implementation, decoder_blocks, refuse_router_loss

from .helpers import train_cli
from .test_config import cfg_with

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "llama": lambda v: transformers.LlamaConfig(vocab_size=v, **SMALL),
    "gemma2": lambda v: transformers.Gemma2Config(vocab_size=v, head_dim=8, **SMALL),
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "qwen3moe": lambda v: transformers.Qwen3MoeConfig(vocab_size=v, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, **SMALL),
}


def make_model(folder, family, **config_changes):
    """A random-init model of `family` with SmolLM2's tokenizer, saved as a transformers folder."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    config = CONFIGS[family](len(tokenizer))
    config.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, **config_changes})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_model(root / family, family) for family in CONFIGS}


def test_auto_attention_is_what_the_architecture_supports(models):
    assert attention_implementation(models["llama"], "auto") == "sdpa"
    assert attention_implementation(models["gpt2"], "auto") == "sdpa"
    assert attention_implementation(models["gemma2"], "auto") == "eager"  # no sdpa path for Gemma-2
    assert attention_implementation(models["gemma2"], "flex_attention") == "flex_attention"
    with pytest.raises(ConfigError, match=r"model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it"):
        attention_implementation(models["gemma2"], "sdpa")
    with pytest.raises(ConfigError, match="model.attn_implementation=flex_attention: GPT2LMHeadModel"):
        attention_implementation(models["gpt2"], "flex_attention")
    assert attention_implementation(models["llama"], "varlen") == "sftmix_varlen"
    with pytest.raises(ConfigError, match="model.attn_implementation=varlen: Gemma2ForCausalLM does not dispatch"):
        attention_implementation(models["gemma2"], "varlen")


def test_an_unsupported_attention_is_refused_by_validate_and_auto_passes(models):
    base = ["model.source=hf", f"model.path={models['gemma2']}", "method=ntp"]
    validate(cfg_with(*base))
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa"):
        validate(cfg_with(*base, "model.attn_implementation=sdpa"))


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        validate(cfg_with("model.source=hf", f"model.path={tmp_path}", "method=ntp"))


def test_decoder_blocks_of_llama_and_gpt2(models):
    llama = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
    gpt2 = transformers.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    assert decoder_blocks(llama) is llama.model.layers
    assert decoder_blocks(gpt2) is gpt2.transformer.h


def test_gpt2_lora_adapts_its_conv1d_layers_and_merges_like_peft(models):
    model = transformers.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    peft_model = apply_lora(model, PeftConfig(kind="lora", r=4, alpha=8.0, dropout=0.0))
    assert sorted(peft_model.peft_config["default"].target_modules) == ["c_attn", "c_fc", "c_proj"]
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: make the adapters change the weights
    ours = merged_state(peft_model, peft_model.state_dict())
    theirs = peft_model.merge_and_unload().state_dict()  # peft's own merge, transposes included
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    changed = [k for k in theirs if "c_attn.weight" in k]
    assert changed and all(not torch.equal(ours[k], load_file(os.path.join(models["gpt2"], "model.safetensors"))[k])
                           for k in changed)


def test_moe_router_loss_is_refused_and_fused_experts_are_named(models, tmp_path, caplog):
    refuse_router_loss(models["qwen3moe"])  # output_router_logits=false: the model's own loss has no term either
    with_router = make_model(tmp_path / "router", "qwen3moe", output_router_logits=True)
    with pytest.raises(ConfigError, match="output_router_logits=true.*router_aux_loss_coef=0.001"):
        validate(cfg_with("model.source=hf", f"model.path={with_router}", "method=ntp"))
    moe = transformers.AutoModelForCausalLM.from_pretrained(models["qwen3moe"])
    assert "Qwen3MoeExperts" in unadapted_weights(moe)
    assert unadapted_weights(transformers.AutoModelForCausalLM.from_pretrained(models["llama"])) == []
    with caplog.at_level(logging.WARNING):
        check_lora_targets(models["qwen3moe"], PeftConfig(kind="lora"))
    assert "Qwen3MoeExperts" in caplog.text and "stay frozen" in caplog.text


@pytest.mark.e2e
def test_gemma2_trains_with_default_attention_and_gpt2_with_lora(models, tmp_path):
    common = ["method=ntp", "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=0",
              "data.max_length=128"]
    gemma = tmp_path / "gemma2"
    proc = train_cli([*common, "model.source=hf", f"model.path={models['gemma2']}", "model.name=gemma2",
                      f"output_dir={gemma}"])
    # auto picked eager (Gemma-2's soft-capped attention has no sdpa path): the log and config.yaml say so
    assert "attention: eager (model.attn_implementation=auto for gemma2)" in proc.stderr
    assert "attn_implementation: eager" in (gemma / "config.yaml").read_text()
    gpt2 = tmp_path / "gpt2"
    train_cli([*common, "model.source=hf", f"model.path={models['gpt2']}", "model.name=gpt2", "peft=lora",
               "train.lr=1e-2", f"output_dir={gpt2}"])
    # The merged export gives the adapted model's logits: base + adapter through peft equals it.
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        before = load(models["gpt2"])(ids).logits
        expected = PeftModel.from_pretrained(load(models["gpt2"]), gpt2 / "adapter").eval()(ids).logits
        got = load(gpt2 / "model")(ids).logits
    assert not torch.allclose(expected, before, atol=1e-4)  # the adapters learned something
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)  # the export is bf16
