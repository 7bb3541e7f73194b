"""The module DeepSpeed wraps: the causal LM plus the method's loss, in one forward.

The loss reads the LM head's weight directly (it never builds full logits), so
it must run inside the engine's forward with the Parameter itself: under
ZeRO-3 the weight (and bias) is registered as an external parameter of this
module, so it is gathered for the forward and its gradient is reduced like any
other. The rest of the head (a logit scale, a soft cap) is read from the
model's config by `models.head_contract`, and `check_head` shows on a real
input that the loss's logits are the model's own.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import ConfigError
from ..data.batching import cu_seq_lens as cu_seq_lens_of
from ..losses import Head, head_logits
from ..models import head_contract
from . import varlen


class LossModule(nn.Module):
    def __init__(self, lm: nn.Module, loss_terms, strategy, padding_mask: bool = True):
        """loss_terms(hidden [B, T, d], head (losses.Head), batch) -> {name: summed loss}.
        padding_mask: pass the batches' padding mask to the model (train.padding_mask); false: none, which
        is exact for right-padded rows, as a real token never attends to the padding after it."""
        super().__init__()
        self.lm = lm
        self.loss_terms = loss_terms
        self.padding_mask = padding_mask
        self.scale, self.softcap = head_contract(lm)
        out = lm.get_output_embeddings()
        strategy.register_external_parameter(self, out.weight)
        if out.bias is not None:
            strategy.register_external_parameter(self, out.bias)
        self.sequence = strategy.sequence  # train.sequence_parallel > 1: every forward runs on a slice
        if self.sequence is not None:
            self.sequence.install(lm)
        self.varlen = getattr(lm.config, "_attn_implementation", None) == varlen.NAME

    def head(self) -> Head:
        out = self.lm.get_output_embeddings()
        return Head(out.weight, out.bias, self.scale, self.softcap)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, compare_logits=False,
                loss_terms=None, cu_seq_lens=None, **extra):
        """loss_terms: another function of the same signature for this call (scoring during training)."""
        if compare_logits:
            return self._logit_error(input_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}
        if position_ids is not None or not self.padding_mask:  # packed rows: position_ids mark the examples
            attention_mask = None
        if self.sequence is not None:
            if position_ids is not None and self._flash():  # one row of packed examples (hidden_states says why)
                input_ids, labels, position_ids = (t.reshape(1, -1) for t in (input_ids, labels, position_ids))
            # Right padding needs no mask: causal attention never lets a real token see the padding after it.
            input_ids, position_ids, batch["shard"] = self.sequence.split(input_ids, labels, position_ids)
            attention_mask = None
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cu_seq_lens)
        return (loss_terms or self.loss_terms)(hidden, self.head(), batch)

    def _flash(self) -> bool:
        from transformers.utils.generic import is_flash_attention_requested

        return is_flash_attention_requested(self.lm.config)

    def hidden_states(self, input_ids, attention_mask, position_ids, cu_seq_lens=None) -> torch.Tensor:
        """The decoder's last hidden states [B, T, d]. Flash-attention kernels find the examples of
        packed rows from position_ids only in a batch of one row (transformers' _is_packed_sequence;
        with several rows a plain causal kernel would let packed examples attend to each other), so
        several packed rows run as one and are split back. The varlen attention is given the examples'
        bounds (cu_seq_lens, from the host: packed rows) or None (plain causal rows)."""
        shape = input_ids.shape
        flatten = position_ids is not None and shape[0] > 1 and self._flash()
        if flatten:
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        if position_ids is not None and cu_seq_lens is None and self.varlen:  # packed elsewhere: found on the device
            cu_seq_lens = cu_seq_lens_of(position_ids)
        extra = self._varlen_bounds(cu_seq_lens if position_ids is not None else None)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False, **extra).last_hidden_state
        return hidden.reshape(*shape, -1) if flatten else hidden

    def _varlen_bounds(self, cu_seq_lens) -> dict:
        if not self.varlen:
            return {}
        return {varlen.KEY: cu_seq_lens}

    def _logit_error(self, input_ids) -> torch.Tensor:
        """max |our logits - the model's own| / max |the model's own|, dropout off; whole sequences
        on every rank, also under sequence parallelism."""
        was_training = self.lm.training
        self.lm.eval()
        try:
            with self.sequence.unsharded() if self.sequence is not None else contextlib.nullcontext():
                hidden = self.lm.get_decoder()(input_ids=input_ids, use_cache=False,
                                               **self._varlen_bounds(None)).last_hidden_state
                ours = head_logits(hidden[0], self.head())
                theirs = self.lm(input_ids=input_ids, use_cache=False, **self._varlen_bounds(None)).logits[0].float()
        finally:
            self.lm.train(was_training)
        return (ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6)

    def describe_head(self) -> str:
        out = self.lm.get_output_embeddings()
        return (f"lm_head {'with' if out.bias is not None else 'without'} bias, scale {self.scale} "
                f"(config.logit_scale, 1 / config.logits_scaling), soft cap {self.softcap} "
                "(config.final_logit_softcapping)")


def sample_ids(examples, device, length: int = 32) -> torch.Tensor:
    """A short real input for check_head: the first tokens of the first example, [1, length]."""
    return torch.tensor([examples[0].input_ids[:length]], device=device)


@torch.no_grad()
def check_head(engine, input_ids: torch.Tensor, model_name: str) -> None:
    """Refuse a model whose forward changes its logits in a way the head contract does not
    capture: the loss would train on logits the model never produces. Runs through the engine
    (under ZeRO-3 that gathers the parameters); every rank calls it."""
    error = float(engine(input_ids=input_ids, compare_logits=True))
    module = getattr(engine, "module", engine)  # a DeepSpeed engine, or the LossModule itself
    tolerance = 1e-4 if next(module.parameters()).dtype == torch.float32 else 3e-2
    if not error <= tolerance:
        raise ConfigError(f"model {model_name} ({type(module.lm).__name__}): its logits differ from the fused loss's "
                          f"(relative difference {error:.1e}); the loss applies {module.describe_head()}; this "
                          "architecture changes its logits in another way, which sftmix_ds does not support")


PREFIX = "lm."  # where the transformers model's parameters sit in this module's state dict
