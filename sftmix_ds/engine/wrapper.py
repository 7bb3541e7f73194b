"""The module DeepSpeed wraps: the causal LM plus the method's loss, in one forward.

The loss reads the LM head's weight directly (it never builds full logits), so
it must run inside the engine's forward with the Parameter itself: under
ZeRO-3 the weight is registered as an external parameter of this module, so
it is gathered for the forward and its gradient is reduced like any other.
"""
from __future__ import annotations

from torch import nn


class LossModule(nn.Module):
    def __init__(self, lm: nn.Module, loss_terms, strategy):
        """loss_terms(hidden [B, T, d], weight [V, d], batch) -> {name: summed loss}."""
        super().__init__()
        self.lm = lm
        self.loss_terms = loss_terms
        strategy.register_external_parameter(self, lm.get_output_embeddings().weight)

    def forward(self, input_ids, attention_mask, labels, position_ids=None, **extra):
        if position_ids is not None:  # packed rows: with attention_mask=None, position_ids mark the examples
            attention_mask = None
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}
        return self.loss_terms(hidden, self.lm.get_output_embeddings().weight, batch)


PREFIX = "lm."  # where the transformers model's parameters sit in this module's state dict
