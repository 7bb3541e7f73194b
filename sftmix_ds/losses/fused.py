"""Fused LM-head cross-entropy with the SFTMix mixup term, never holding full logits.

The head, as the model applies it: logits = cap(s (W h + b)), with an optional
bias b (Phi-2), a scale s (Cohere's logit_scale, 1 / Granite's logits_scaling)
and an optional soft cap cap(u) = c tanh(u / c) (Gemma-2's final_logit_softcapping).
For rows h_i (final hidden states) with labels y_i and pairs (a_k, b_k, lam_k):
    ntp_sum = sum_i CE(head(h_i), y_i)                       over rows with a valid label
    mix_sum = sum_k lam_k CE(head(h_mix_k), y_a_k) + (1 - lam_k) CE(head(h_mix_k), y_b_k)
    h_mix_k = lam_k h_a_k + (1 - lam_k) h_b_k
Since u = s (W h + b) is affine and lam + (1 - lam) = 1, u(h_mix_k) = lam_k u_a_k +
(1 - lam_k) u_b_k with the u already computed for ntp_sum: the mixup term adds no
LM-head matmul. The cap is applied after mixing, cap(lam u_a + (1 - lam) u_b), as
the model would apply it to the mixed hidden state.

Work is done in chunks of rows so [rows, V] logits exist one chunk at a time.
Paired rows are processed in the same chunk as their partner. The backward pass
recomputes each chunk's logits (as Cut Cross-Entropy does) and folds the mixup
gradient back into the paired rows: G_a += lam G_mix, G_b += (1 - lam) G_mix,
then dh = G W and dW += G^T h. Logits and gradients are accumulated in fp32.

Two backends compute each chunk's terms from its logits: torch (any device;
the backward recomputes everything) and Triton (CUDA, triton_kernels.py: the
forward keeps each row's log-sum-exp, so the backward is one pass that writes
G over the recomputed logits in place, in their own 16-bit dtype).
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..common import IGNORE


class Head(NamedTuple):
    """An LM head as the model applies it: logits = cap(scale * (h W^T + bias))."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None


CHUNK_ELEMENTS = 1 << 24  # logits per chunk in auto mode off CUDA: 64 MiB in fp32
# On CUDA each chunk's two GEMMs re-read the whole head weight (1 GB at V = 128K, d = 4096) and update
# its fp32 gradient, so few, large chunks: ~1,000 rows at V = 128K, ~500 at Gemma's 262K...
CUDA_CHUNK_ELEMENTS = 1 << 27
# ...as long as a chunk's logits and the torch backend's fp32 temporaries (about 4 per logit, 16 bytes)
# take at most an eighth of the free memory.
CUDA_BYTES_PER_LOGIT = 16
CUDA_FREE_SHARE = 8


def auto_chunk_rows(vocab_size: int, device: Optional[torch.device] = None) -> int:
    """Rows per chunk so one chunk's [rows, V] logits hold about CHUNK_ELEMENTS values (on CUDA:
    CUDA_CHUNK_ELEMENTS, capped by free memory)."""
    elements = CHUNK_ELEMENTS
    if device is not None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
        elements = min(CUDA_CHUNK_ELEMENTS, free_bytes // CUDA_FREE_SHARE // CUDA_BYTES_PER_LOGIT)
    return max(1, elements // vocab_size)


def add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b, accumulated and added in out's dtype: 16-bit a and b give no 16-bit product
    in between (cuBLAS computes in fp32 and writes fp32 straight into out)."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return out.addmm_(a, b)
    if out.is_cuda:
        return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    return out.addmm_(a.to(out.dtype), b.to(out.dtype))


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit inputs, else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(M: int, pair_a: torch.Tensor, pair_b: torch.Tensor, chunk_size: int,
            rest: Optional[torch.Tensor] = None) -> List[Tuple[torch.Tensor, int]]:
    """Chunks as (row indices, number of pairs): pair chunks hold [a_k..., b_k...], then unpaired rows
    (`rest`, when the caller knows them: finding them here makes the host wait for the device).

    Each row's NTP term is counted at its first occurrence only, so rows listed
    in several pairs (or pairs with a == b) are not counted twice.
    """
    device = pair_a.device
    pairs_per_chunk = max(1, chunk_size // 2)
    chunks = []
    for s in range(0, pair_a.numel(), pairs_per_chunk):
        chunks.append((torch.cat([pair_a[s:s + pairs_per_chunk], pair_b[s:s + pairs_per_chunk]]),
                       min(pairs_per_chunk, pair_a.numel() - s)))
    if rest is None and pair_a.numel() == 0:
        rest = torch.arange(M, device=device)
    elif rest is None:
        paired = torch.zeros(M, dtype=torch.bool, device=device)
        paired[pair_a] = True
        paired[pair_b] = True
        rest = torch.nonzero(~paired).flatten()
    for s in range(0, rest.numel(), chunk_size):
        chunks.append((rest[s:s + chunk_size], 0))
    return chunks


def _first_occurrence(chunks, M: int) -> List[torch.Tensor]:
    if not chunks:
        return []
    seq = torch.cat([rows for rows, _ in chunks])
    order = torch.sort(seq, stable=True).indices
    sorted_rows = seq[order]
    first_sorted = torch.ones_like(sorted_rows, dtype=torch.bool)
    first_sorted[1:] = sorted_rows[1:] != sorted_rows[:-1]
    first = torch.empty_like(first_sorted)
    first[order] = first_sorted
    return list(torch.split(first, [rows.numel() for rows, _ in chunks]))


def pre_cap_logits(h: torch.Tensor, head: Head, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """u = s (W h + b) (the part of the head that is affine in h), scaled in `dtype` (default:
    the matmul's)."""
    u = h @ head.weight.t() if head.bias is None else torch.addmm(head.bias, h, head.weight.t())
    u = u if dtype is None else u.to(dtype)
    return u if head.scale == 1.0 else u * head.scale


def soft_cap(u: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return u if cap is None else cap * torch.tanh(u / cap)


def head_logits(h: torch.Tensor, head: Head, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's logits for hidden states h, in `dtype`."""
    return soft_cap(pre_cap_logits(h, head, dtype), head.softcap)


def _chunk_terms(h: torch.Tensor, head: Head, y: torch.Tensor, count: torch.Tensor, n_pairs: int,
                 lam: torch.Tensor, want_grad: bool, g_ntp: float = 1.0, g_mix: float = 1.0):
    """Loss sums of one chunk and, if asked, G = d(g_ntp*ntp + g_mix*mix)/d(W h + b) (fp32)."""
    acc = _acc(h.dtype)
    u = pre_cap_logits(h, head, acc)
    z = soft_cap(u, head.softcap)
    valid = ((y != IGNORE) & count).to(acc)
    y_safe = y.clamp_min(0)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, y_safe[:, None]).squeeze(1)
    ntp = ((lse - z_y) * valid).sum()
    mix = z.new_zeros(())
    if n_pairs:
        ya, yb = y_safe[:n_pairs], y_safe[n_pairs:2 * n_pairs]
        wa, wb = _pair_weights(y, n_pairs, lam)
        z_mix = soft_cap(lam[:, None] * u[:n_pairs] + (1 - lam[:, None]) * u[n_pairs:2 * n_pairs], head.softcap)
        lse_mix = torch.logsumexp(z_mix, dim=-1)
        mix = (wa * (lse_mix - z_mix.gather(1, ya[:, None]).squeeze(1))
               + wb * (lse_mix - z_mix.gather(1, yb[:, None]).squeeze(1))).sum()
    if not want_grad:
        return ntp, mix, None
    G = torch.softmax(z, dim=-1).mul_((g_ntp * valid)[:, None])
    G.scatter_add_(1, y_safe[:, None], -(g_ntp * valid)[:, None])
    if head.softcap is not None:  # d cap(u) / du = 1 - (cap(u) / c)^2
        G.mul_(1 - (z / head.softcap).square())
    if n_pairs:
        G_mix = torch.softmax(z_mix, dim=-1).mul_((wa + wb)[:, None])
        G_mix.scatter_add_(1, ya[:, None], -wa[:, None])
        G_mix.scatter_add_(1, yb[:, None], -wb[:, None])
        G_mix.mul_(g_mix)
        if head.softcap is not None:
            G_mix.mul_(1 - (z_mix / head.softcap).square())
        G[:n_pairs].add_(lam[:, None] * G_mix)
        G[n_pairs:2 * n_pairs].add_((1 - lam[:, None]) * G_mix)
    return ntp, mix, G.mul_(head.scale) if head.scale != 1.0 else G


def _pair_weights(y: torch.Tensor, n_pairs: int, lam: torch.Tensor):
    """Weights of a pair's two CE terms on the mixed logits: lam and 1 - lam, 0 where a label is ignored."""
    return lam * (y[:n_pairs] != IGNORE), (1 - lam) * (y[n_pairs:2 * n_pairs] != IGNORE)


class _TritonChunks:
    """The same chunk terms from the Triton kernels: the forward keeps each chunk's
    log-sum-exps, so the backward makes one pass over the recomputed logits."""

    def __init__(self):
        from . import triton_kernels

        self.kernels = triton_kernels
        self.saved = []

    def terms(self, h, head, y, count, n_pairs, lam):
        u = pre_cap_logits(h, head)
        cap = head.softcap or 0.0
        lse, lse_mix = self.kernels.chunk_lse(u, n_pairs, lam, cap)
        self.saved.append((lse, lse_mix))
        y_safe = y.clamp_min(0)
        z_y = soft_cap(u.gather(1, y_safe[:, None]).squeeze(1).float(), head.softcap)
        ntp = ((lse - z_y) * ((y != IGNORE) & count).float()).sum()
        mix = lse.new_zeros(())
        if n_pairs:
            wa, wb = _pair_weights(y, n_pairs, lam)
            ua, ub = u[:n_pairs], u[n_pairs:2 * n_pairs]
            ya, yb = y_safe[:n_pairs, None], y_safe[n_pairs:2 * n_pairs, None]
            at = lambda rows, ids: rows.gather(1, ids).squeeze(1).float()
            mix_ya = soft_cap(lam * at(ua, ya) + (1 - lam) * at(ub, ya), head.softcap)
            mix_yb = soft_cap(lam * at(ua, yb) + (1 - lam) * at(ub, yb), head.softcap)
            mix = (wa * (lse_mix - mix_ya) + wb * (lse_mix - mix_yb)).sum()
        return ntp, mix

    def grad(self, index, h, head, y, count, n_pairs, lam, g_ntp, g_mix):
        lse, lse_mix = self.saved[index]
        wa, wb = _pair_weights(y, n_pairs, lam)
        G = self.kernels.chunk_grad_(pre_cap_logits(h, head), n_pairs, y.clamp_min(0),
                                     ((y != IGNORE) & count).float() * g_ntp, lse, lam, lse_mix, g_mix * wa,
                                     g_mix * wb, head.softcap or 0.0)
        return G.mul_(head.scale) if head.scale != 1.0 else G


class _TorchChunks:
    """Chunk terms in plain torch; the backward recomputes everything (as Cut Cross-Entropy does)."""

    def terms(self, h, head, y, count, n_pairs, lam):
        ntp, mix, _ = _chunk_terms(h, head, y, count, n_pairs, lam, want_grad=False)
        return ntp, mix

    def grad(self, index, h, head, y, count, n_pairs, lam, g_ntp, g_mix):
        return _chunk_terms(h, head, y, count, n_pairs, lam, want_grad=True, g_ntp=g_ntp, g_mix=g_mix)[2]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str, device: torch.device) -> str:
    """auto: triton for CUDA tensors when triton is installed, torch otherwise."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("loss backend triton: the triton package is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"loss backend triton: needs CUDA tensors (got {device.type}), "
                               "or TRITON_INTERPRET=1 to run the kernels in triton's interpreter")
    elif backend != "torch":
        raise ValueError(f"loss backend {backend!r}: must be auto, torch or triton")
    return backend


class _FusedSFTMixLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, pair_a, pair_b, lam, scale, softcap, chunk_size, backend, ntp_rows,
                unpaired):
        chunks = _chunks(hidden.shape[0], pair_a, pair_b, chunk_size, unpaired)
        counts = _first_occurrence(chunks, hidden.shape[0])
        if ntp_rows is not None:
            counts = [count & ntp_rows[rows] for (rows, _), count in zip(chunks, counts)]
        impl = _TritonChunks() if backend == "triton" else _TorchChunks()
        head = Head(weight, bias, scale, softcap)
        acc = _acc(hidden.dtype)
        ntp_sum = torch.zeros((), dtype=acc, device=hidden.device)
        mix_sum = torch.zeros((), dtype=acc, device=hidden.device)
        lam32 = lam.to(acc)
        p = 0
        for (rows, n_pairs), count in zip(chunks, counts):
            ntp, mix = impl.terms(hidden[rows], head, labels[rows], count, n_pairs, lam32[p:p + n_pairs])
            ntp_sum += ntp
            mix_sum += mix
            p += n_pairs
        ctx.save_for_backward(hidden, weight, bias, labels, lam32)
        ctx.chunks, ctx.counts, ctx.impl, ctx.scale, ctx.softcap = chunks, counts, impl, scale, softcap
        return ntp_sum, mix_sum

    @staticmethod
    def backward(ctx, g_ntp, g_mix):
        hidden, weight, bias, labels, lam32 = ctx.saved_tensors
        head = Head(weight, bias, ctx.scale, ctx.softcap)
        # g_ntp, g_mix stay 0-d tensors on the device: reading them here would stall the backward
        acc = _acc(hidden.dtype)
        # A frozen head (LoRA) needs no dW: that matmul, its [V, d] buffer and its reduction are skipped.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        p = 0
        for index, ((rows, n_pairs), count) in enumerate(zip(ctx.chunks, ctx.counts)):
            h = hidden[rows]
            G = ctx.impl.grad(index, h, head, labels[rows], count, n_pairs, lam32[p:p + n_pairs], g_ntp, g_mix)
            p += n_pairs
            if need_h:
                grad_h.index_add_(0, rows, (G.to(weight.dtype) @ weight).to(acc))
            if need_w:
                add_product_(grad_w, G.t(), h.to(G.dtype))
            if need_b:
                grad_b.add_(G.sum(0, dtype=acc))
        cast = lambda g, like: None if g is None else g.to(like.dtype)
        return (cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias), None, None, None, None, None, None,
                None, None, None, None)


def fused_sftmix_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pair_a: torch.Tensor,
                      pair_b: torch.Tensor, lam: torch.Tensor, chunk_size: int = 0, backend: str = "auto",
                      bias: Optional[torch.Tensor] = None, scale: float = 1.0, softcap: Optional[float] = None,
                      ntp_rows: Optional[torch.Tensor] = None, unpaired: Optional[torch.Tensor] = None):
    """(ntp_sum, mix_sum) as fp32 scalars (fp64 for fp64 inputs); see the module docstring.
    Gradients to hidden, weight and bias are exact.

    hidden [M, d], weight [V, d], labels [M] (may hold -100), pair_a/pair_b [P]
    row indices into hidden, lam [P]. P = 0 gives plain next-token CE.
    chunk_size: rows per chunk; 0 picks auto_chunk_rows(V).
    backend: torch | triton | auto (triton on CUDA when installed).
    bias [V], scale, softcap: the rest of the model's head (see the module docstring).
    ntp_rows [M] bool: the rows whose NTP term counts (default all); the others only take part in
    pairs (under sequence parallelism, partner rows whose own rank counts their NTP term).
    unpaired [M - rows in pairs]: the rows in no pair, ascending, where the caller knows them (default:
    found here, which on a GPU makes the host wait for the device).
    """
    if pair_a.shape != pair_b.shape or pair_a.shape != lam.shape:
        raise ValueError(f"pair_a {tuple(pair_a.shape)}, pair_b {tuple(pair_b.shape)} and lam {tuple(lam.shape)} "
                         "must have the same shape")
    chunk_size = chunk_size or auto_chunk_rows(weight.shape[0], hidden.device)
    return _FusedSFTMixLoss.apply(hidden, weight, bias, labels, pair_a.long(), pair_b.long(), lam, float(scale),
                                  None if softcap is None else float(softcap), chunk_size,
                                  pick_backend(backend, hidden.device), ntp_rows, unpaired)


def reference_sftmix_loss(hidden, weight, labels, pair_a, pair_b, lam, bias=None, scale=1.0, softcap=None):
    """The naive version with full logits and mixed hidden states, the head applied as a model
    applies it, for tests."""
    acc = _acc(hidden.dtype)
    head = lambda h: soft_cap(((h @ weight.t() if bias is None else h @ weight.t() + bias) * scale).to(acc), softcap)
    ntp = F.cross_entropy(head(hidden), labels, ignore_index=IGNORE, reduction="sum")
    lam = lam.to(acc)
    h_mix = lam[:, None].to(hidden.dtype) * hidden[pair_a] + (1 - lam[:, None]).to(hidden.dtype) * hidden[pair_b]
    z_mix = head(h_mix)
    ce_a = F.cross_entropy(z_mix, labels[pair_a], ignore_index=IGNORE, reduction="none")
    ce_b = F.cross_entropy(z_mix, labels[pair_b], ignore_index=IGNORE, reduction="none")
    mix = (lam * ce_a + (1 - lam) * ce_b).sum()
    return ntp, mix
