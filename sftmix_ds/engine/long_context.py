"""Long sequences on one device: the feed-forward computed in tiles of tokens (train.mlp_tiles),
activations saved for backward moved to host memory (train.offload_activations), and a check before
the first step that a micro-batch's activations fit in the memory left.

Both switches are exact. A tile's feed-forward is a function of its own tokens only, so the tiles
concatenated are the whole feed-forward; in backward each tile is recomputed and differentiated
alone, so at most one tile's intermediates ([tile tokens x intermediate size], several of them) live
at a time instead of the whole sequence's. Offloading moves what autograd saves (under gradient
checkpointing: each block's input hidden states, the biggest term at long lengths, L x T x d) to host
memory as it is saved and brings it back when backward needs it.

DeepSpeed 0.19.8 has both pieces (TiledMLP in ulysses_sp.py, CheckpointHiddenStatesOffload in
offload_activations.py); they are not used here, for three reasons:
- TiledMLP splits with torch.chunk, which gives fewer tiles than asked when a batch has fewer tokens:
  its ds_grad_is_ready is then never set for the last tile, and under ZeRO-3 ranks with different
  lengths would call different numbers of parameter gathers;
- CheckpointHiddenStatesOffload keeps every restored tensor until its context exits, so at the end of
  backward all the blocks' inputs are back on the device: the peak is not lowered;
- it offloads nothing on CPU, so its path cannot be tested where the suite runs.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ..common import ConfigError, UserError

FEED_FORWARD_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")


class TiledFeedForward(torch.autograd.Function):
    """feed_forward(x) over `tiles` slices of x's tokens; backward recomputes one tile at a time.
    params: the trainable parameters the feed-forward uses (ZeRO counts a gradient only after the last
    tile's, through ds_grad_is_ready). rng: the random state before the forward, so a recomputed tile
    draws the dropout masks the forward drew."""

    @staticmethod
    def forward(ctx, x, feed_forward, tiles, params, every_tile):
        ctx.feed_forward, ctx.tiles, ctx.params, ctx.every_tile = feed_forward, tiles, params, every_tile
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return tiled(feed_forward, x, tiles, every_tile)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        rows = x.detach().reshape(-1, x.shape[-1])
        grad = grad.reshape(rows.shape[0], -1)
        x_grad = torch.zeros_like(rows)
        pieces = [p for p in zip(_split(rows, ctx.tiles), _split(grad, ctx.tiles), _split(x_grad, ctx.tiles))
                  if ctx.every_tile or len(p[0])]
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            _set_rng_state(ctx.rng, x.device)
            for i, (tile, tile_grad, tile_x_grad) in enumerate(pieces):
                for p in ctx.params:
                    p.ds_grad_is_ready = i == len(pieces) - 1
                tile = tile.detach().requires_grad_(x.requires_grad)
                with torch.enable_grad():
                    out = _apply(ctx.feed_forward, tile)
                torch.autograd.backward(out, tile_grad)
                if tile.grad is not None:
                    tile_x_grad.copy_(tile.grad)
        return x_grad.view_as(x), None, None, None, None


def _split(rows: torch.Tensor, tiles: int):
    return rows.tensor_split(tiles)  # exactly `tiles` pieces, the last ones empty when rows are fewer


def tiled(feed_forward, x: torch.Tensor, tiles: int, every_tile: bool) -> torch.Tensor:
    """feed_forward over the tiles of x's tokens, concatenated (no autograd bookkeeping of its own).
    every_tile: call it on empty tiles too (ZeRO-3 gathering module by module: every rank must make the
    same calls, whatever its length)."""
    rows = x.reshape(-1, x.shape[-1])
    outs = [_apply(feed_forward, tile) for tile in _split(rows, tiles) if every_tile or len(tile)]
    out = torch.cat(outs) if outs else _apply(feed_forward, rows)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _apply(feed_forward, rows: torch.Tensor) -> torch.Tensor:
    """The feed-forward of [rows, d] tokens, given as one sequence [1, rows, d] (MoE blocks want 3 dims)."""
    out = feed_forward(rows[None])
    if not isinstance(out, torch.Tensor):  # e.g. an MoE layer that also returns its router's logits
        raise ConfigError(f"train.mlp_tiles: the feed-forward returns {type(out).__name__}, not one tensor; "
                          "tiling supports feed-forwards that map hidden states to hidden states")
    return out[0]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def feed_forward_of(block) -> torch.nn.Module:
    for name in FEED_FORWARD_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UserError(f"train.mlp_tiles: {type(block).__name__} has no feed-forward module named one of "
                    f"{', '.join(FEED_FORWARD_NAMES)}; set train.mlp_tiles=0 for this model")


def tile_feed_forwards(blocks, tiles: int, every_tile: bool) -> None:
    """Make each decoder block's feed-forward run in `tiles` tiles of tokens (train.mlp_tiles)."""
    for block in blocks:
        module = feed_forward_of(block)
        module.forward = functools.partial(_tiled_forward, module, module.forward, tiles, every_tile)


def _tiled_forward(module, forward, tiles: int, every_tile: bool, x: torch.Tensor, *args, **kwargs):
    if args or kwargs:  # an unusual signature: the model's own
        return forward(x, *args, **kwargs)
    params = [p for p in module.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or params):
        return TiledFeedForward.apply(x, forward, tiles, params, every_tile)
    return tiled(forward, x, tiles, every_tile)  # forward only (evaluation, scoring): no recomputation


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """While active, every tensor autograd saves (parameters and tensors under min_bytes aside) is copied
    to host memory, and back to its device when backward uses it. On a GPU the copy out runs on a side
    stream into pinned memory; the device memory is released when that copy is done. On CPU the copy
    is a plain one (nothing is gained; the path is the GPU's, so it is tested here)."""

    def __init__(self, device: torch.device, min_bytes: int = 1024):
        self.min_bytes = min_bytes
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < self.min_bytes
                or (t.numel() > 1 and 0 in t.stride()) or t.device.type == "meta"):
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        if self.stream is None:
            return torch.empty_like(t, device="cpu").copy_(t), t.device, None
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(t, device="cpu", pin_memory=True).copy_(t, non_blocking=True)
            done = self.stream.record_event()
        t.record_stream(self.stream)  # its device memory is reused only once the copy is done
        return host, t.device, done

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, device, done = packed
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True, copy=True)  # on CPU too: a new tensor, as on a GPU


def activation_bytes_per_token(text_config, t, dtype_bytes: int) -> int:
    """A lower bound on the bytes one token's activations hold at the peak of a step, from the model's
    shape: per block the attention's inputs and outputs (about 6 hidden vectors and the keys and values)
    and, unless tiled, the feed-forward's intermediates (3 of intermediate size); under gradient
    checkpointing every block's input (none on the device when offloaded) plus one block recomputed."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = (getattr(text_config, "num_key_value_heads", None) or heads) * (getattr(text_config, "head_dim", None)
                                                                         or d // heads)
    inner = getattr(text_config, "intermediate_size", None) or 4 * d
    block = 6 * d + 2 * kv + (d if t.mlp_tiles > 1 else 3 * inner)
    layers = text_config.num_hidden_layers
    if not t.gradient_checkpointing:
        return dtype_bytes * layers * block
    return dtype_bytes * ((0 if t.offload_activations else layers * d) + block)


def free_memory_bytes(device: torch.device) -> int:
    """What this rank may still allocate: the device's free memory on a GPU, else the machine's available
    memory shared by the ranks on it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    # torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE
    return available // int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def check_fits(text_config, t, tokens: int, dtype_bytes: int, free: int, where: str) -> Optional[str]:
    """Refuse, before the first step, a micro-batch whose activations cannot fit (`tokens` per rank
    per micro-batch; `free`: bytes left after the engine was built). Returns the estimate, for the log."""
    per_token = activation_bytes_per_token(text_config, t, dtype_bytes)
    need = per_token * tokens
    estimate = (f"{tokens} tokens per micro-batch x {per_token / 1024:.1f} KiB of activations per token = at least "
                f"{need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free on {where}")
    if need > free:
        hints = [k for k, on in (("train.gradient_checkpointing=true", t.gradient_checkpointing),
                                 ("train.mlp_tiles=N (N about tokens / hidden size)", t.mlp_tiles > 1),
                                 ("train.offload_activations=true", t.offload_activations)) if not on]
        raise ConfigError(f"data.max_length / train.micro_batch_size: the longest micro-batch cannot fit: {estimate}. "
                          f"Shorten data.max_length, lower train.micro_batch_size, split sequences over ranks "
                          f"(train.sequence_parallel){', or set ' + ', '.join(hints) if hints else ''}")
    return estimate
