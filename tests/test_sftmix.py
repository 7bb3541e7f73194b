"""SFTMix stage 2: pair batching, response-token alignment, the method's loss, and real training runs."""
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from sftmix_ds.confidence import confidence_records, write_confidence_file
from sftmix_ds.data import encode
from sftmix_ds.data.batching import PairBatches
from sftmix_ds.data.tokenize import Example
from sftmix_ds.losses import Head
from sftmix_ds.data.batching import response_rows
from sftmix_ds.methods.base import RunOptions
from sftmix_ds.methods.sftmix import SFTMix, SFTMixConfig
from sftmix_ds.tracking import MEASURED

from .helpers import ROOT, read_metrics, train_cli

CONF = list(range(0, 11))
UNCONF = list(range(11, 21))  # one fewer: one leftover per epoch


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("mb,accum,world", [(2, 1, 1), (4, 2, 2), (2, 3, 2), (6, 1, 3)])
def test_pair_batches_balanced_and_each_example_once_per_epoch(mb, accum, world, grouped):
    k = mb // 2
    lengths = [(7 * i) % 23 for i in range(21)] if grouped else None
    for epoch in range(2):
        seen = []
        for rank in range(world):
            b = PairBatches(CONF, UNCONF, mb, accum, world, rank, seed=5, lengths=lengths)
            assert b.leftovers == 1
            for step in range(b.steps_per_epoch):
                micro = b.micro_batches(epoch, step)
                assert len(micro) == accum
                for m in micro:
                    assert len(m) == mb
                    for a, u in zip(m[:k], m[k:]):  # pair j = (confident j, unconfident j)
                        if a is not None and u is not None:
                            assert a in CONF and u in UNCONF
                        else:
                            assert u is None  # a leftover (no partner) or padding
                    seen += [i for i in m if i is not None]
        assert sorted(seen) == CONF + UNCONF


def test_pair_batches_deterministic_reshuffled_and_resumable():
    plan = lambda seed, epoch: [PairBatches(CONF, UNCONF, 4, 1, 2, r, seed).micro_batches(epoch, s)
                                for s in range(3) for r in range(2)]
    assert plan(1, 0) == plan(1, 0)  # by seed; and a fresh instance (a resumed run) continues the same sequence
    assert plan(1, 0) != plan(2, 0)
    assert plan(1, 0) != plan(1, 1)  # re-paired each epoch
    b = PairBatches(CONF, UNCONF, 4, 1, 2, 0, seed=1)
    resumed = PairBatches(CONF, UNCONF, 4, 1, 2, 0, seed=1)
    assert [b.micro_batches(0, s) for s in range(3)][2] == resumed.micro_batches(0, 2)


def test_odd_micro_batch_rejected():
    with pytest.raises(ValueError, match="must be even"):
        PairBatches(CONF, UNCONF, 3, 1, 1, 0, seed=1)


def pair_examples(tokenizer):
    convs = [("What is 2+2?", "4"), ("Tell me a fact.", "Water boils at 100 degrees Celsius at sea level."),
             ("Hi", "Hello! How can I help you today?"), ("Count to three", "1, 2, 3")]
    return [Example(f"e{i}", *encode(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                      "t")) for i, (q, a) in enumerate(convs)]


def test_alignment_pairs_nth_response_token_with_nth(tokenizer):
    exs = pair_examples(tokenizer)
    method = SFTMix(options=RunOptions(chunk_size=4))
    batch = method.collate(exs, tokenizer.pad_token_id, key=(0, 0))
    # Tag every position with (example, position) and flatten as the loss does.
    B, T = batch["input_ids"].shape
    tags = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(T), indexing="ij"), -1).double()
    rows, targets, _ = response_rows(tags, batch)
    for j in range(2):
        resp = lambda e: [t for t in range(len(exs[e].labels) - 1) if exs[e].labels[t + 1] != -100]
        ra, rb = resp(j), resp(2 + j)
        n = min(len(ra), len(rb))
        expected = [((j, ra[i]), (2 + j, rb[i])) for i in range(n)]
        mask = torch.isin(batch["pair_a"], torch.tensor([r for r in range(len(rows)) if rows[r, 0] == j]))
        got = [(tuple(rows[a].long().tolist()), tuple(rows[b].long().tolist()))
               for a, b in zip(batch["pair_a"][mask], batch["pair_b"][mask])]
        assert got == expected
        # only response tokens are mixed: the target of every mixed row is a response token
        assert all(exs[j].labels[p + 1] != -100 for (_, p), _ in got)


def test_sftmix_loss_equals_naive_mixup_on_a_model(smollm2_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).double()
    exs = pair_examples(tokenizer)
    method = SFTMix(SFTMixConfig(alpha=0.5), RunOptions(chunk_size=5, seed=3))
    batch = method.collate(exs, tokenizer.pad_token_id, key=(0, 0))
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    W = model.lm_head.weight
    terms = method.loss_terms(hidden, Head(W), batch)
    # naive: full logits; mix the hidden states of aligned response tokens explicitly
    labels = batch["labels"]
    ntp = torch.nn.functional.cross_entropy((hidden[:, :-1] @ W.t()).reshape(-1, W.shape[0]),
                                            labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    mix, n_mixed = 0.0, 0
    for j in range(2):
        lam = method.draw_lam([(exs[j].id, exs[2 + j].id)], (0, 0))[0].double()
        pa = (labels[j, 1:] != -100).nonzero().flatten()
        pb = (labels[2 + j, 1:] != -100).nonzero().flatten()
        n = min(len(pa), len(pb))
        h = lam * hidden[j, pa[:n]] + (1 - lam) * hidden[2 + j, pb[:n]]
        logits = h @ W.t()
        ce = lambda targets: torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        mix = mix + (lam * ce(labels[j, pa[:n] + 1]) + (1 - lam) * ce(labels[2 + j, pb[:n] + 1]))
        n_mixed += n
    torch.testing.assert_close(terms["ntp"], ntp)
    torch.testing.assert_close(terms["mix"], mix)
    assert method.token_counts(batch) == {"ntp": int((labels[:, 1:] != -100).sum()), "mix": n_mixed}
    # gradients too, through the whole model
    g_fused = torch.autograd.grad(terms["ntp"] + 0.2 * terms["mix"], W, retain_graph=True)[0]
    g_naive = torch.autograd.grad(ntp + 0.2 * mix, W)[0]
    torch.testing.assert_close(g_fused, g_naive)


def test_lam_per_batch_and_per_pair():
    m = SFTMix(SFTMixConfig(lam_per="batch"))
    lam = m.draw_lam([("a", "b"), ("c", "d")], (0, 3))
    assert lam[0] == lam[1] and torch.equal(lam, m.draw_lam([("x", "y"), ("z", "w")], (0, 3)))
    p = SFTMix(SFTMixConfig(lam_per="pair", alpha=0.5))
    many = p.draw_lam([(str(i), str(i + 1)) for i in range(2000)], (0, 0))
    # U-shaped Beta(.5, .5): mean one half, much of the mass near 0 and 1
    assert 0.45 < many.mean().item() < 0.55 and ((many < 0.1) | (many > 0.9)).float().mean() > 0.3
    assert torch.equal(many[:5], p.draw_lam([(str(i), str(i + 1)) for i in range(5)], (0, 0)))


# --- real runs: ZeRO-3 on 2 ranks against ZeRO-2 and one process, and resume -------------------------------


# adam_eps: Adam's first update is about lr * sign(g), and for near-zero gradients that sign is
# reduction-order noise that differs between layouts; a larger eps makes the update proportional to g.
BASE = ["model=tiny", "method=sftmix", "train.max_steps=2", "train.lr=1e-3", "train.adam_eps=1e-4",
        "train.warmup_ratio=0",
        "train.export_dtype=fp32", "train.eval_every=0", "method.mu=0.5"]
LAYOUTS = {"m8a1r1z3": (8, 1, 0, 3), "m2a2r2z3": (2, 2, 2, 3), "m4a1r2z2": (4, 1, 2, 2),
           "m4a1r2z3_packed": (4, 1, 2, 3)}
PACKED = ["train.packing=true", "data.max_length=256"]  # rows of 256 tokens: each micro-batch's 4 examples share rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, confidence_file):
    root = tmp_path_factory.mktemp("sftmix_runs")
    out = {}
    for name, (mb, accum, nproc, zero) in LAYOUTS.items():
        out[name] = str(root / name)
        train_cli(BASE + [f"method.confidence_file={confidence_file}", f"train.micro_batch_size={mb}",
                          f"train.grad_accum={accum}", f"deepspeed=zero{zero}", f"output_dir={out[name]}"]
                  + (PACKED if name.endswith("packed") else []), nproc=nproc)
    return out


@pytest.mark.e2e
def test_sftmix_same_step_under_zero3_zero2_and_one_process(runs):
    ref = read_metrics(runs["m8a1r1z3"])
    assert all(r["pairs"] == 4 and r["tokens/mix"] > 0 and r["loss/mix"] > 0 for r in ref)
    ref_w = load_file(os.path.join(runs["m8a1r1z3"], "model", "model.safetensors"))
    for name, run_dir in runs.items():
        for r, g in zip(ref, read_metrics(run_dir), strict=True):
            for key in ("loss/ntp", "loss/mix", "lam_mean", "tokens/mix"):
                assert g[key] == pytest.approx(r[key], rel=1e-5), (name, key)
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), name
        w = load_file(os.path.join(run_dir, "model", "model.safetensors"))
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.e2e
def test_sftmix_resume_mid_epoch_continues_the_same_sequence(runs, confidence_file, tmp_path):
    run_dir = str(tmp_path / "resumed")
    overrides = BASE + [f"method.confidence_file={confidence_file}", "train.micro_batch_size=2",
                        "train.grad_accum=2", "deepspeed=zero3", f"output_dir={run_dir}"]
    train_cli(overrides + ["train.stop_after_steps=1"], nproc=2)
    train_cli(overrides, nproc=2)
    ref = runs["m2a2r2z3"]
    pairs = zip(read_metrics(ref), read_metrics(run_dir), strict=True)
    assert read_metrics(run_dir) == [{**m, **{k: r[k] for k in MEASURED if k in r}} for m, r in pairs]
    w, ref_w = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (run_dir, ref))
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)


@pytest.mark.e2e
def test_confidence_file_for_other_data_is_rejected(tmp_path):
    path = str(tmp_path / "c.jsonl")
    write_confidence_file(path, confidence_records([{"not-an-id": 1.0, "other": 2.0}]), "x")
    proc = train_cli(["model=tiny", "method=sftmix", f"method.confidence_file={path}", f"output_dir={tmp_path}/o"],
                     check=False)
    assert proc.returncode == 2 and "does not match the dataset: 128 dataset ids missing" in proc.stderr
    proc = train_cli(["model=tiny", "method=sftmix", "train.micro_batch_size=3", f"output_dir={tmp_path}/p"],
                     check=False)
    assert proc.returncode == 2 and "train.micro_batch_size=3: must be even" in proc.stderr


def test_length_grouping_cuts_padding_for_sftmix_as_for_ntp(tokenizer):
    """Padding tokens per step on the embedded data, with and without train.group_by_length."""
    from sftmix_ds.data import Batches, load_split
    from omegaconf import OmegaConf

    from sftmix_ds.config import DataConfig

    data = OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "max_length": 1024, "cache_dir": os.path.join(os.path.expanduser("~"), ".cache", "sftmix_ds", "tokenized")})
    examples = load_split(data, tokenizer, [os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")])
    lengths = [len(e.input_ids) for e in examples]
    half = len(examples) // 2
    rng = random.Random(0)
    confident = sorted(rng.sample(range(len(examples)), half))
    unconfident = [i for i in range(len(examples)) if i not in set(confident)]

    def padding(batches):
        total = 0
        for step in range(batches.steps_per_epoch):
            for mb in batches.micro_batches(0, step):
                real = [lengths[i] for i in mb if i is not None]
                total += max(real) * len(real) - sum(real) if real else 0
        return total / batches.steps_per_epoch

    make_ntp = lambda grouped: Batches(len(examples), 8, 1, 1, 0, seed=3, lengths=lengths if grouped else None)
    make_mix = lambda grouped: PairBatches(confident, unconfident, 8, 1, 1, 0, seed=3,
                                           lengths=lengths if grouped else None)
    ntp_ratio = padding(make_ntp(True)) / padding(make_ntp(False))
    mix_ratio = padding(make_mix(True)) / padding(make_mix(False))
    assert ntp_ratio < 0.2 and mix_ratio < 0.2, (ntp_ratio, mix_ratio)  # measured: 0.11 and 0.14 (1.05 before the fix)
    b = make_mix(True)  # still every example once, pairs inside one micro-batch
    seen = [i for s in range(b.steps_per_epoch) for mb in b.micro_batches(0, s) for i in mb if i is not None]
    assert sorted(seen) == list(range(len(examples)))


def test_mu_zero_skips_the_mixup_computation(monkeypatch):
    """method.mu=0 keeps the paired batches, trains NTP only and never computes the mixed logits."""
    import sftmix_ds.methods.ntp as ntp_module
    from sftmix_ds.losses import fused_sftmix_loss

    g = torch.Generator().manual_seed(0)
    examples = [Example(f"e{i}", torch.randint(0, 50, (9,), generator=g).tolist(), [-100] * 3 +
                        torch.randint(0, 50, (6,), generator=g).tolist()) for i in range(4)]
    pairs_seen = []

    def recording(hidden, weight, labels, pair_a, *args, **kw):
        pairs_seen.append(pair_a.numel())
        return fused_sftmix_loss(hidden, weight, labels, pair_a, *args, **kw)

    monkeypatch.setattr(ntp_module, "fused_sftmix_loss", recording)
    hidden = torch.randn(4, 9, 8, generator=g, dtype=torch.float64)
    head = Head(torch.randn(50, 8, generator=g, dtype=torch.float64))
    terms = {}
    for mu in (0.0, 0.2):
        method = SFTMix(SFTMixConfig(mu=mu))
        batch = method.collate(examples, 0, key=(0, 0))
        terms[mu] = method.loss_terms(hidden, head, batch)
    assert pairs_seen == [0]  # mu=0 went through the plain NTP loss; mu=0.2 did not call it
    assert terms[0.0]["mix"].item() == 0.0 and terms[0.2]["mix"].item() > 0
    torch.testing.assert_close(terms[0.0]["ntp"], terms[0.2]["ntp"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sftmix_step_equals_the_padded_step(attn):
    """Packing keeps each pair in its micro-batch and its response-token alignment; with position
    ids restarting and no attention across examples, both loss terms and every gradient equal
    the padded batch's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn))
    g = torch.Generator().manual_seed(3)
    examples = []
    for i, (n_prompt, n_response) in enumerate([(3, 6), (5, 2), (2, 9), (4, 4), (6, 3), (2, 7)]):
        ids = torch.randint(3, 100, (n_prompt + n_response,), generator=g).tolist()
        examples.append(Example(f"e{i}", ids, [-100] * n_prompt + ids[n_prompt:]))
    examples = examples[:3] + [None] + examples[3:] + [None]  # k = 4: 3 confident + an empty slot, 3 unconfident + one
    results = []
    for method in (SFTMix(), SFTMix(options=RunOptions(pack_width=24))):
        batch = method.collate(examples, pad_id=0, key=(0, 1))
        assert ("position_ids" in batch) == bool(method.options.pack_width)
        mask = None if "position_ids" in batch else batch["attention_mask"]
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        model.zero_grad()
        terms = method.loss_terms(hidden, Head(model.get_output_embeddings().weight), batch)
        (terms["ntp"] + 0.2 * terms["mix"]).backward()
        results.append((terms["ntp"].detach(), terms["mix"].detach(), batch["pair_a"].numel(), batch["lam"],
                        [p.grad.clone() for p in model.parameters()]))
    padded, packed = results
    assert packed[0] > 0 and packed[1] > 0 and packed[2] == padded[2] and packed[2] > 0
    assert batch["input_ids"].shape[0] < len([e for e in examples if e])  # examples share rows
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[3], padded[3])
    for a, b in zip(packed[4], padded[4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
