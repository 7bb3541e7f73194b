"""Triton kernels for one chunk of the fused SFTMix loss (see fused.py for the math).

The chunk's pre-cap logits u = s (h W^T + b) are computed by a matmul outside
(cuBLAS does that best); the model's logits are z = cap(u), with the soft cap
applied in the kernels (CAPPED) when the model has one. These kernels make the
passes over the [rows, V] logits that the torch backend spends several
full-size temporaries on:

- forward: one read of z gives the log-sum-exp of every row and, for the pairs,
  of the mixed logits lam z_a + (1 - lam) z_b (which are never stored);
- backward: one read of z and one in-place write of the logit gradient G,
  from the saved log-sum-exps, with the mixup gradient already folded into
  the paired rows.

Chunk layout (as fused._chunks builds it): rows [0, P) are pair partners a,
rows [P, 2P) their partners b, rows [2P, n) unpaired. Kernels read z in its
own dtype and compute in fp32. Under TRITON_INTERPRET=1 they run on CPU tensors,
which is how CI tests their values; the interpreter runs plain Python and cannot
see what Triton's compiler refuses, so CI also compiles every launch variant for
sm_80 and sm_90 (benchmarks/triton_compile.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _cap(u, cap, CAPPED: tl.constexpr):
    """The soft cap c tanh(u / c) (tanh x = 2 sigmoid(2x) - 1), or u itself."""
    if CAPPED:
        return cap * (2.0 * tl.sigmoid(2.0 * u / cap) - 1.0)
    return u


@triton.jit
def _through_cap(g, z, cap, CAPPED: tl.constexpr):
    """g * d cap(u) / du at z = cap(u), where the slope is 1 - (z / c)^2; g itself without a cap.
    (Both branches return g's type: Triton's compiler refuses a branch that returns a bare constant.)"""
    if CAPPED:
        return g * (1.0 - (z / cap) * (z / cap))
    return g


@triton.jit(do_not_specialize=["n_pairs"])  # a chunk's pair count changes often: one variant
def _lse_kernel(Z, stride, LAM, LSE, LSE_MIX, n_pairs, V, cap, BLOCK: tl.constexpr, PAIRED: tl.constexpr,
                CAPPED: tl.constexpr):
    """Unpaired: program i -> LSE[2P + i]. Paired: program k -> LSE[k], LSE[P + k], LSE_MIX[k].
    Z holds the pre-cap logits u; the log-sum-exps are of cap(u) and cap(lam u_a + (1 - lam) u_b)."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if PAIRED:
        row_a = pid
        row_b = pid + n_pairs
        lam = tl.load(LAM + pid).to(tl.float32)
        m_a = -float("inf")
        s_a = 0.0
        m_b = -float("inf")
        s_b = 0.0
        m_m = -float("inf")
        s_m = 0.0
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            ua = tl.load(Z + row_a * stride + start + cols, mask=mask, other=0.0).to(tl.float32)
            ub = tl.load(Z + row_b * stride + start + cols, mask=mask, other=0.0).to(tl.float32)
            zm = tl.where(mask, _cap(lam * ua + (1.0 - lam) * ub, cap, CAPPED), -float("inf"))
            za = tl.where(mask, _cap(ua, cap, CAPPED), -float("inf"))
            zb = tl.where(mask, _cap(ub, cap, CAPPED), -float("inf"))
            new_a = tl.maximum(m_a, tl.max(za, 0))
            s_a = s_a * tl.exp(m_a - new_a) + tl.sum(tl.exp(za - new_a), 0)
            m_a = new_a
            new_b = tl.maximum(m_b, tl.max(zb, 0))
            s_b = s_b * tl.exp(m_b - new_b) + tl.sum(tl.exp(zb - new_b), 0)
            m_b = new_b
            new_m = tl.maximum(m_m, tl.max(zm, 0))
            s_m = s_m * tl.exp(m_m - new_m) + tl.sum(tl.exp(zm - new_m), 0)
            m_m = new_m
        tl.store(LSE + row_a, m_a + tl.log(s_a))
        tl.store(LSE + row_b, m_b + tl.log(s_b))
        tl.store(LSE_MIX + pid, m_m + tl.log(s_m))
    else:
        row = pid + 2 * n_pairs
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            u = tl.load(Z + row * stride + start + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.where(mask, _cap(u, cap, CAPPED), -float("inf"))
            new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - new) + tl.sum(tl.exp(z - new), 0)
            m = new
        tl.store(LSE + row, m + tl.log(s))


@triton.jit(do_not_specialize=["n_pairs"])  # a chunk's pair count changes often: one variant
def _grad_kernel(Z, stride, Y, SCALE, LSE, LAM, LSE_MIX, WMA, WMB, n_pairs, V, cap, BLOCK: tl.constexpr,
                 PAIRED: tl.constexpr, CAPPED: tl.constexpr):
    """Overwrite the pre-cap logits u with G = d loss / d u (z = cap(u); without a cap z = u).

    Row r: G_r = SCALE_r (softmax(z_r) - onehot(y_r)). Pair k adds the mixup gradient
    G_mix = (WMA_k + WMB_k) softmax(z_mix) - WMA_k onehot(y_a) - WMB_k onehot(y_b)
    to its rows: lam_k G_mix to a, (1 - lam_k) G_mix to b.
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if PAIRED:
        row_a = pid
        row_b = pid + n_pairs
        lam = tl.load(LAM + pid).to(tl.float32)
        y_a = tl.load(Y + row_a)
        y_b = tl.load(Y + row_b)
        scale_a = tl.load(SCALE + row_a)
        scale_b = tl.load(SCALE + row_b)
        lse_a = tl.load(LSE + row_a)
        lse_b = tl.load(LSE + row_b)
        lse_m = tl.load(LSE_MIX + pid)
        wma = tl.load(WMA + pid)
        wmb = tl.load(WMB + pid)
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            ua = tl.load(Z + row_a * stride + idx, mask=mask, other=0.0).to(tl.float32)
            ub = tl.load(Z + row_b * stride + idx, mask=mask, other=0.0).to(tl.float32)
            za = _cap(ua, cap, CAPPED)
            zb = _cap(ub, cap, CAPPED)
            zm = _cap(lam * ua + (1.0 - lam) * ub, cap, CAPPED)
            hit_a = tl.where(idx == y_a, 1.0, 0.0)
            hit_b = tl.where(idx == y_b, 1.0, 0.0)
            g_mix = _through_cap((wma + wmb) * tl.exp(zm - lse_m) - wma * hit_a - wmb * hit_b, zm, cap, CAPPED)
            g_a = _through_cap(scale_a * (tl.exp(za - lse_a) - hit_a), za, cap, CAPPED) + lam * g_mix
            g_b = _through_cap(scale_b * (tl.exp(zb - lse_b) - hit_b), zb, cap, CAPPED) + (1.0 - lam) * g_mix
            tl.store(Z + row_a * stride + idx, g_a.to(Z.dtype.element_ty), mask=mask)
            tl.store(Z + row_b * stride + idx, g_b.to(Z.dtype.element_ty), mask=mask)
    else:
        row = pid + 2 * n_pairs
        y = tl.load(Y + row)
        scale = tl.load(SCALE + row)
        lse = tl.load(LSE + row)
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            z = _cap(tl.load(Z + row * stride + idx, mask=mask, other=0.0).to(tl.float32), cap, CAPPED)
            g = _through_cap(scale * (tl.exp(z - lse) - tl.where(idx == y, 1.0, 0.0)), z, cap, CAPPED)
            tl.store(Z + row * stride + idx, g.to(Z.dtype.element_ty), mask=mask)


def launches(kernel, z: torch.Tensor, n_pairs: int, cap: float, *args) -> list:
    """(grid, arguments, constexprs and launch options) of each launch one chunk needs: the paired
    rows, then the unpaired ones. benchmarks/triton_compile.py compiles exactly these."""
    options = dict(BLOCK=min(BLOCK_V, triton.next_power_of_2(z.shape[1])), CAPPED=cap > 0, num_warps=NUM_WARPS)
    unpaired = z.shape[0] - 2 * n_pairs
    plan = []
    for programs, paired in ((n_pairs, True), (unpaired, False)):
        if programs:
            arguments = (z, z.stride(0), *args, n_pairs, z.shape[1], float(cap))
            plan.append(((programs,), arguments, dict(options, PAIRED=paired)))
    return plan


def _launch(kernel, z: torch.Tensor, n_pairs: int, cap: float, *args) -> None:
    for grid, arguments, options in launches(kernel, z, n_pairs, cap, *args):
        kernel[grid](*arguments, **options)


def chunk_lse(u: torch.Tensor, n_pairs: int, lam: torch.Tensor, cap: float = 0.0):
    """(lse of every row [n], lse of each pair's mixed logits [P]), fp32; cap > 0: of the soft-capped logits."""
    lse = torch.empty(u.shape[0], dtype=torch.float32, device=u.device)
    lse_mix = torch.empty(n_pairs, dtype=torch.float32, device=u.device)
    _launch(_lse_kernel, u, n_pairs, cap, lam.float().contiguous(), lse, lse_mix)
    return lse, lse_mix


def chunk_grad_(u: torch.Tensor, n_pairs: int, y: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                lam: torch.Tensor, lse_mix: torch.Tensor, w_mix_a: torch.Tensor, w_mix_b: torch.Tensor,
                cap: float = 0.0) -> torch.Tensor:
    """u (pre-cap logits) overwritten with the gradient of the chunk's loss; y must hold valid ids (no -100)."""
    _launch(_grad_kernel, u, n_pairs, cap, y.contiguous(), scale.float().contiguous(), lse, lam.float().contiguous(),
            lse_mix, w_mix_a.float().contiguous(), w_mix_b.float().contiguous())
    return u
