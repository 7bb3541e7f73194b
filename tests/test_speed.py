"""Speed switches change how the same math is computed, not the result: the loss and its gradients
with each switch on equal the switch-off ones (float64 models, ragged right-padded batches, real
collate, every head family of test_heads)."""
import pytest
import torch

from sftmix_ds.data import Example
from sftmix_ds.data.batching import collate, response_rows
from sftmix_ds.engine.wrapper import LossModule
from sftmix_ds.methods.base import RunOptions
from sftmix_ds.methods.ntp import NTP
from sftmix_ds.methods.sftmix import SFTMix

from .test_heads import NoZeRO, build, families


def examples(n=4, seed=3):
    """Chat-like examples of different lengths: a prompt without loss, then a response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 15, (), generator=g))
        ids = torch.randint(3, 97, (length,), generator=g).tolist()
        prompt = int(torch.randint(2, length - 2, (), generator=g))
        out.append(Example(f"e{i}", ids, [-100] * prompt + ids[prompt:]))
    return out


def sftmix(**options):
    method = SFTMix(options=RunOptions(chunk_size=5, **options))
    method.split = {}  # collate and the loss need no split
    return method


def loss_and_grads(model, method, batch, padding_mask):
    model.zero_grad()
    module = LossModule(model, method.loss_terms, NoZeRO(), padding_mask=padding_mask)
    terms = module(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    loss = sum(method.weights[n] * terms[n] for n in method.weights)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(families()))
@pytest.mark.parametrize("method_name", ["ntp", "sftmix", "ntp packed"])
def test_no_padding_mask_and_rounded_widths_give_the_same_loss_and_gradients(name, method_name):
    model = build(name)
    make = {"ntp": lambda **o: NTP(options=RunOptions(chunk_size=5, **o)), "sftmix": sftmix,
            "ntp packed": lambda **o: NTP(options=RunOptions(chunk_size=5, pack_width=20, **o))}[method_name]
    batch = make().collate(examples(), pad_id=0)
    assert batch["attention_mask"].float().mean() < 1  # ragged: the mask has padding to hide
    ref_loss, ref_grads = loss_and_grads(model, make(), batch, padding_mask=True)
    wide = make(pad_multiple=16).collate(examples(), pad_id=0)
    assert wide["input_ids"].shape[1] % 16 == 0 and wide["input_ids"].shape[1] > batch["input_ids"].shape[1]
    for b, padding_mask in ((batch, False), (wide, True), (wide, False)):
        loss, grads = loss_and_grads(model, make(), b, padding_mask)
        # Within fp32 rounding: Gemma-2's eager attention takes its softmax in fp32, over the padded width.
        torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            assert (grads[k] - ref_grads[k]).abs().max() <= 1e-6 * ref_grads[k].abs().max(), k


@pytest.mark.parametrize("name", [n for n in families() if not n.startswith("gemma2")])
@pytest.mark.parametrize("method_name", ["ntp", "sftmix"])
def test_varlen_attention_over_packed_rows_gives_the_padded_loss_and_gradients(name, method_name):
    """model.attn_implementation=varlen: packed examples attend to themselves through their bounds
    (here the kernel's CPU form, one causal call per example), no mask built: the same loss and
    gradients as the examples padded one per row with their mask; unpacked rows run plain causal."""
    from sftmix_ds.engine import varlen

    model = build(name)
    new = {"ntp": lambda **o: NTP(options=RunOptions(chunk_size=5, **o)), "sftmix": sftmix}[method_name]
    padded = new().collate(examples(n=6), pad_id=0)
    ref_loss, ref_grads = loss_and_grads(model, new(), padded, padding_mask=True)
    packed = new(pack_width=24).collate(examples(n=6), pad_id=0)
    assert packed["input_ids"].shape[0] < 6 and len(packed["cu_seq_lens"]) > packed["input_ids"].shape[0] + 1
    model.set_attn_implementation(varlen.register())
    for batch in (packed, padded):
        loss, grads = loss_and_grads(model, new(pack_width=24), batch, padding_mask=False)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)  # the fused loss runs in fp32
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            assert (grads[k] - ref_grads[k]).abs().max() <= 1e-6 * ref_grads[k].abs().max(), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flash varlen kernel needs CUDA")
def test_the_cuda_varlen_kernel_equals_one_causal_sdpa_per_example():
    """The kernel model.attn_implementation=varlen runs on a GPU, forward and backward, against its CPU
    form (grouped heads: 4 query heads on 2 key/value heads; two rows of 32, five examples)."""
    from sftmix_ds.engine import varlen

    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 17, 32, 40, 64], dtype=torch.int32)
    q, k, v = (torch.randn(2, h, 32, 64, generator=g) for h in (4, 2, 2))
    results = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        inputs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out, _ = varlen.varlen_attention(None, *inputs, None, scaling=0.125, **{varlen.KEY: cu.to(device)})
        out.float().square().sum().backward()
        results.append([out.float().cpu()] + [t.grad.float().cpu() for t in inputs])
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, atol=5e-2, rtol=5e-2)


def test_varlen_attention_refuses_soft_capped_attention():
    from sftmix_ds.common import ConfigError
    from sftmix_ds.engine import varlen

    model = build("gemma2 (final_logit_softcapping)")
    model.set_attn_implementation(varlen.register())
    batch = NTP(options=RunOptions(chunk_size=5, pack_width=24)).collate(examples(n=6), pad_id=0)
    with pytest.raises(ConfigError, match="soft-caps its attention scores"):
        loss_and_grads(model, NTP(options=RunOptions(chunk_size=5)), batch, padding_mask=False)


def test_response_rows_from_the_host_index_equal_the_boolean_mask_selection():
    batch = collate(examples(6), pad_id=0, multiple=8)
    hidden = torch.randn(*batch["input_ids"].shape, 5)
    by_mask = response_rows(hidden, {k: v for k, v in batch.items() if k != "response_index"})
    by_index = response_rows(hidden, batch)
    for a, b in zip(by_index, by_mask, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert by_index[0].shape[0] == int((batch["labels"][:, 1:] != -100).sum())


def test_sftmix_unpaired_rows_from_the_host_equal_those_the_loss_finds():
    method = sftmix()
    batch = method.collate(examples(4), pad_id=0)
    assert batch["pair_a"].numel() and batch["unpaired"].numel()  # both kinds of rows are there
    model = build("llama (plain)")
    with_host, grads = loss_and_grads(model, method, batch, padding_mask=True)
    found, found_grads = loss_and_grads(model, method, {k: v for k, v in batch.items() if k != "unpaired"}, True)
    torch.testing.assert_close(with_host, found, rtol=0, atol=0)
    for k in grads:
        torch.testing.assert_close(grads[k], found_grads[k], rtol=0, atol=0)


class OneRank:
    """The Collectives of a job of one process, as scoring uses them."""
    data_parallel_size, data_parallel_rank, sequence_parallel, device = 1, 0, 1, torch.device("cpu")

    def all_gather_object(self, obj):
        return [obj]


@pytest.mark.parametrize("batch_size,max_tokens,n_batches", [(64, 0, 1), (64, 40, 4), (3, 16384, 3), (2, 1, 9)])
def test_scoring_batches_of_any_size_give_the_same_per_example_nll(batch_size, max_tokens, n_batches):
    """method.score_batch_size / score_batch_tokens: other batches, the same sums and counts as one example
    at a time."""
    from sftmix_ds.inference import example_nll, score_nll, scoring_plan

    module = LossModule(build("llama (plain)"), example_nll, NoZeRO(), padding_mask=False)
    exs = examples(n=9)
    assert len(scoring_plan(exs, batch_size, 1, 0, max_tokens)) == n_batches  # a budget below one example: one each
    ref = score_nll(module, OneRank(), exs, 1, pad_id=0)
    got = score_nll(module, OneRank(), exs, batch_size, pad_id=0, max_tokens=max_tokens)
    assert got.keys() == ref.keys()
    for i, (s, c) in ref.items():
        assert got[i][1] == c and got[i][0] == pytest.approx(s, rel=1e-12)
