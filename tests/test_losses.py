import pytest
import torch

from sftmix_ds.losses import fused_sftmix_loss, reference_sftmix_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled kernels on a GPU, else the interpreter


def on_device(case):
    return [t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in case]


def make_case(dtype, M=37, d=16, V=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (M,), generator=g)
    labels[::5] = -100
    # duplicate rows, a row paired with itself, lam exactly 0 and 1, a pair with an ignored label
    pair_a = torch.tensor([0, 1, 2, 3, 3, 7, 5])
    pair_b = torch.tensor([10, 11, 12, 13, 3, 5, 8])
    lam = torch.rand(7, generator=g).to(dtype)
    lam[0], lam[1] = 0.0, 1.0
    return hidden, weight, labels, pair_a, pair_b, lam


def loss_and_grads(fn, hidden, weight, labels, pair_a, pair_b, lam, mu=0.3, **kw):
    ntp, mix = fn(hidden, weight, labels, pair_a, pair_b, lam, **kw)
    bias = kw.get("bias")
    hidden.grad = weight.grad = None
    if bias is not None:
        bias.grad = None
    (ntp + mu * mix).backward()
    out = (ntp.detach(), mix.detach(), hidden.grad.clone(), weight.grad.clone())
    return out + ((bias.grad.clone(),) if bias is not None else ())


# The heads families put after hidden @ W.T: a bias (Phi-2), a scale (Cohere's logit_scale,
# 1 / Granite's logits_scaling), a soft cap (Gemma-2's final_logit_softcapping), and all at once.
HEADS = {"bias": dict(bias=True), "scale": dict(scale=0.0625), "inverse scale": dict(scale=1 / 8.0),
         "softcap": dict(softcap=3.0), "all": dict(bias=True, scale=2.5, softcap=4.0)}


def head_kwargs(name, dtype, device="cpu", V=61):
    kw = dict(HEADS[name])
    if kw.pop("bias", False):
        kw["bias"] = (torch.randn(V, generator=torch.Generator().manual_seed(5)) * 0.7).to(dtype).to(device)
        kw["bias"].requires_grad_()
    return kw


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 4096])
def test_fused_equals_reference_float64(chunk_size):
    case = make_case(torch.float64)
    ref = loss_and_grads(reference_sftmix_loss, *case)
    got = loss_and_grads(fused_sftmix_loss, *case, chunk_size=chunk_size)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_fused_equals_reference_for_every_head_float64(head, chunk_size):
    """Values and gradients (hidden, weight, bias) against mixing hidden states, then the model's head."""
    case = make_case(torch.float64)
    ref = loss_and_grads(reference_sftmix_loss, *case, **head_kwargs(head, torch.float64))
    got = loss_and_grads(fused_sftmix_loss, *case, chunk_size=chunk_size, **head_kwargs(head, torch.float64))
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_frozen_head_gets_no_gradient_and_the_rest_is_unchanged(backend):
    """A head that does not require grad (LoRA): no dW (nor db) is computed; the loss and dh equal
    the reference's, and autograd never sees a weight gradient."""
    if backend == "triton":
        pytest.importorskip("triton")  # on CPU in triton's interpreter (conftest)
    device = DEVICE if backend == "triton" else "cpu"
    hidden, weight, labels, pair_a, pair_b, lam = [t.to(device) for t in make_case(torch.float32)]
    hidden = hidden.detach().requires_grad_()
    bias = (torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(5)) * 0.7).to(device)
    frozen_w, frozen_b = weight.detach(), bias  # neither requires grad
    ntp, mix = fused_sftmix_loss(hidden, frozen_w, labels, pair_a, pair_b, lam, chunk_size=4, backend=backend,
                                 bias=frozen_b, scale=2.5, softcap=4.0)
    (ntp + 0.3 * mix).backward()
    assert frozen_w.grad is None and frozen_b.grad is None
    h = hidden.detach().clone().requires_grad_()
    ref_ntp, ref_mix = reference_sftmix_loss(h, frozen_w, labels, pair_a, pair_b, lam, bias=frozen_b, scale=2.5,
                                             softcap=4.0)
    (ref_ntp + 0.3 * ref_mix).backward()
    torch.testing.assert_close(ntp, ref_ntp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mix, ref_mix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-4, atol=1e-5)


def test_the_soft_cap_is_applied_after_mixing():
    """cap(lam u_a + (1 - lam) u_b), not lam cap(u_a) + (1 - lam) cap(u_b): the two differ."""
    hidden, weight, labels, pair_a, pair_b, lam = make_case(torch.float64)
    _, mix = fused_sftmix_loss(hidden, weight * 20, labels, pair_a, pair_b, lam, softcap=2.0)
    cap = lambda u: 2.0 * torch.tanh(u / 2.0)
    z = cap(hidden @ (weight * 20).t())
    z_mixed_after = lam[:, None] * z[pair_a] + (1 - lam[:, None]) * z[pair_b]
    wrong = (lam * torch.nn.functional.cross_entropy(z_mixed_after, labels[pair_a], ignore_index=-100, reduction="none")
             + (1 - lam) * torch.nn.functional.cross_entropy(z_mixed_after, labels[pair_b], ignore_index=-100,
                                                             reduction="none")).sum()
    assert abs(mix.item() - wrong.item()) > 1e-3


def test_no_pairs_is_plain_cross_entropy():
    hidden, weight, labels, *_ = make_case(torch.float64)
    empty = torch.zeros(0, dtype=torch.long)
    ntp, mix = fused_sftmix_loss(hidden, weight, labels, empty, empty, empty.double(), chunk_size=4)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ntp, expected)
    assert mix.item() == 0.0


def test_mix_gradient_flows_into_both_rows_of_a_pair():
    hidden, weight, labels, *_ = make_case(torch.float64)
    a, b, lam = torch.tensor([0]), torch.tensor([1]), torch.tensor([0.3], dtype=torch.float64)
    _, mix = fused_sftmix_loss(hidden, weight, labels, a, b, lam, chunk_size=8)
    mix.backward()
    touched = hidden.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == [0, 1]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_close_to_reference_low_precision(dtype, tol):
    case64 = make_case(torch.float64)
    ref = loss_and_grads(reference_sftmix_loss, *case64)
    case = make_case(dtype)
    got = loss_and_grads(fused_sftmix_loss, *case, chunk_size=8)
    assert got[0].dtype == torch.float32  # accumulated in fp32 even for bf16 inputs
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


# The Triton backend: on CPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1).
triton_kernels = pytest.importorskip("sftmix_ds.losses.triton_kernels")
@pytest.mark.parametrize("block", [16, 4096])  # 16: several blocks over V=61 with a ragged last one
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_triton_backend_equals_reference(monkeypatch, block, chunk_size):
    monkeypatch.setattr(triton_kernels, "BLOCK_V", block)
    ref = loss_and_grads(reference_sftmix_loss, *make_case(torch.float64))
    got = loss_and_grads(fused_sftmix_loss, *on_device(make_case(torch.float32)), chunk_size=chunk_size,
                         backend="triton")
    for r, g in zip(ref, got):
        g = g.cpu()
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("head", list(HEADS))
def test_triton_backend_equals_reference_for_every_head(monkeypatch, head):
    monkeypatch.setattr(triton_kernels, "BLOCK_V", 16)
    ref = loss_and_grads(reference_sftmix_loss, *make_case(torch.float64), **head_kwargs(head, torch.float64))
    got = loss_and_grads(fused_sftmix_loss, *on_device(make_case(torch.float32)), chunk_size=5, backend="triton",
                         **head_kwargs(head, torch.float32, DEVICE))
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-5, atol=1e-5 * max(1.0, r.abs().max().item()))


def test_triton_backend_bf16_matches_torch_backend():
    """Same logits (bf16 matmul), so the same losses; gradients differ by bf16 rounding of G only."""
    case = on_device(make_case(torch.bfloat16, V=300))
    torch_out = loss_and_grads(fused_sftmix_loss, *case, chunk_size=8, backend="torch")
    triton_out = loss_and_grads(fused_sftmix_loss, *case, chunk_size=8, backend="triton")
    for t, g in zip(torch_out[:2], triton_out[:2]):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-4)
    for t, g in zip(torch_out[2:], triton_out[2:]):
        torch.testing.assert_close(g.float(), t.float(), rtol=2e-2, atol=2e-2 * t.float().abs().max().item())


def test_backend_choice(monkeypatch):
    from sftmix_ds.losses.fused import pick_backend

    assert pick_backend("auto", torch.device("cpu")) == "torch"
    assert pick_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        pick_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be auto, torch or triton"):
        pick_backend("cuda", torch.device("cpu"))
