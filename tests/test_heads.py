"""Model families whose heads do more than hidden @ W.T: the fused loss, the scoring pass and the
SFTMix term must use the logits the model itself produces (built offline, random init, float64)."""
import pytest
import torch
import torch.nn.functional as F

from sftmix_ds.config import ConfigError
from sftmix_ds.engine.wrapper import LossModule, check_head
from sftmix_ds.inference import example_nll
from sftmix_ds.losses import fused_sftmix_loss, reference_sftmix_loss
from sftmix_ds.methods.base import RunOptions
from sftmix_ds.methods.ntp import NTP

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def families():
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM)

    return {"gemma2 (final_logit_softcapping)": (Gemma2ForCausalLM, Gemma2Config(**SMALL, head_dim=8,
                                                                                  final_logit_softcapping=2.0)),
            "cohere (logit_scale)": (CohereForCausalLM, CohereConfig(**SMALL, logit_scale=0.5)),
            "granite (logits_scaling)": (GraniteForCausalLM, GraniteConfig(**SMALL, logits_scaling=4.0)),
            "phi (lm_head bias)": (PhiForCausalLM, PhiConfig(**SMALL)),
            "llama (plain)": (LlamaForCausalLM, LlamaConfig(**SMALL))}


class NoZeRO:
    """What LossModule asks of its strategy; without ZeRO-3 or sequence parallelism, nothing to do."""

    sequence = None

    def register_external_parameter(self, module, param):
        pass


def build(name):
    cls, config = families()[name]
    torch.manual_seed(0)
    model = cls(config).double().eval()
    out = model.get_output_embeddings()
    with torch.no_grad():  # large logits, so a soft cap and a scale matter
        out.weight.mul_(40.0)
        if out.bias is not None:
            out.bias.normal_(0, 3.0)
    return model


def batch(V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("name", list(families()))
def test_fused_ntp_loss_and_scoring_equal_cross_entropy_on_the_models_own_logits(name):
    model = build(name)
    b = batch()
    logits = model(input_ids=b["input_ids"]).logits
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                ignore_index=-100, reduction="none").view(2, -1)
    module = LossModule(model, NTP(options=RunOptions(chunk_size=5)).loss_terms, NoZeRO())
    check_head(module, b["input_ids"][:1], name)  # the contract is read correctly: accepted
    torch.testing.assert_close(module(**b)["ntp"], per_token.sum(), rtol=1e-10, atol=1e-10)
    scoring = LossModule(model, lambda h, head, bb: example_nll(h, head, bb, chunk_size=3), NoZeRO())(**b)
    torch.testing.assert_close(scoring["nll_sum"].double(), per_token.sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(families()))
def test_sftmix_term_equals_mixing_hidden_states_then_the_models_head(name):
    model = build(name)
    module = LossModule(model, None, NoZeRO())
    head = module.head()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 32, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (9,), generator=g)
    pair_a, pair_b = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    lam = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)

    def model_head(h):  # the model's own head on any hidden state: lm_head, then what its forward does after
        z = model.lm_head(h)
        c = model.config
        if getattr(c, "logit_scale", None) is not None:
            z = z * c.logit_scale
        if getattr(c, "logits_scaling", None) is not None:
            z = z / c.logits_scaling
        if getattr(c, "final_logit_softcapping", None) is not None:
            z = torch.tanh(z / c.final_logit_softcapping) * c.final_logit_softcapping
        return z

    def naive():
        h_mix = lam[:, None] * hidden[pair_a] + (1 - lam[:, None]) * hidden[pair_b]
        z_mix = model_head(h_mix)
        mix = (lam * F.cross_entropy(z_mix, labels[pair_a], reduction="none")
               + (1 - lam) * F.cross_entropy(z_mix, labels[pair_b], reduction="none")).sum()
        return F.cross_entropy(model_head(hidden), labels, reduction="sum"), mix

    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    results = []
    for fn in (naive, lambda: fused_sftmix_loss(hidden, head.weight, labels, pair_a, pair_b, lam, chunk_size=4,
                                                bias=head.bias, scale=head.scale, softcap=head.softcap)):
        ntp, mix = fn()
        grads = torch.autograd.grad(ntp + 0.3 * mix, params)
        results.append((ntp.detach(), mix.detach(), *grads))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    ref = reference_sftmix_loss(hidden, head.weight, labels, pair_a, pair_b, lam, bias=head.bias, scale=head.scale,
                                softcap=head.softcap)
    torch.testing.assert_close(torch.stack(ref), torch.stack(results[0][:2]))


def test_a_head_the_contract_does_not_capture_is_refused():
    model = build("llama (plain)")
    forward = model.forward

    def doubled(*args, **kwargs):  # a family that changes its logits in a way we do not read
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    module = LossModule(model, None, NoZeRO())
    with pytest.raises(ConfigError, match=r"model odd \(LlamaForCausalLM\): its logits differ from the fused loss's"):
        check_head(module, batch()["input_ids"][:1], "odd")
