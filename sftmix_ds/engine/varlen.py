"""Attention over packed rows with a variable-length kernel: each example attends to itself only, and
no [T, T] mask is built.

Registered with transformers' attention interface as "sftmix_varlen" (`model.attn_implementation=varlen`).
LossModule passes the examples' boundaries, `sftmix_cu_seq_lens` (cumulative starts over the flattened
rows, int32, computed on the host by `data.batching.pack`), through the model's forward to every attention call.
On CUDA the kernel is torch's flash varlen attention (torch.nn.attention.varlen, torch 2.10 on); elsewhere
each example is one causal sdpa call (the same math, used by the CPU tests). A forward without packed
rows (the key given as None) is plain causal attention, which is exact for right-padded rows.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..common import ConfigError

NAME = "sftmix_varlen"
KEY = "sftmix_cu_seq_lens"


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _causal_kwargs() -> dict:
    """torch 2.10 takes is_causal; later versions a window, (-1, 0) being causal."""
    from torch.nn.attention.varlen import varlen_attn

    causal_window = "window_size" in inspect.signature(varlen_attn).parameters
    return {"window_size": (-1, 0)} if causal_window else {"is_causal": True}


CAUSAL = {}  # _causal_kwargs(), read once in register() (not inside a compiled forward)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: query [B, H, T, D], key and value [B, Hkv, T, D]
    -> ([B, T, H, D], None)."""
    if KEY not in kwargs:
        raise ConfigError(f"model.attn_implementation=varlen: {type(module).__name__} did not pass the examples' "
                          "boundaries through to its attention (an architecture that drops its forward's extra "
                          "arguments); use sdpa")
    if dropout:
        raise ConfigError(f"model.attn_implementation=varlen: attention dropout {dropout} is not supported; use sdpa")
    if kwargs.get("softcap") is not None:
        raise ConfigError("model.attn_implementation=varlen: this model soft-caps its attention scores; use eager")
    cu = kwargs[KEY]
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, is_causal=True)
    window = kwargs.get("sliding_window")
    if window and query.shape[2] > window:  # an example may be longer than the window: not modelled here
        raise ConfigError(f"model.attn_implementation=varlen: this model attends within a sliding window of {window} "
                          f"tokens and the packed rows are {query.shape[2]} wide; use sdpa")
    batch, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    q, k, v = (t.transpose(1, 2).reshape(batch * width, t.shape[1], dim) for t in (query, key, value))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        # The rows' width bounds every example's length (none crosses a row): no read of cu on the host.
        out = varlen_attn(q, k, v, cu, cu, width, width, scale=scaling, **CAUSAL)
    else:
        out = _one_call_per_example(q, k, v, cu, scaling)
    return out.reshape(batch, width, heads, dim), None


@torch.compiler.disable  # a loop over data-dependent bounds: left out of a compiled block (train.compile)
def _one_call_per_example(q, k, v, cu, scaling) -> torch.Tensor:
    """The kernel's math without it: [N, H, D] tensors, one causal sdpa call per example."""
    bounds = cu.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                     scale=scaling).transpose(0, 1)
                      for s, e in zip(bounds, bounds[1:])])


def register() -> str:
    """The attention's name for transformers (registered once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    if available():
        CAUSAL.update(_causal_kwargs())
    return NAME
