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
