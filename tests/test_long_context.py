"""Long sequences on one device (engine/long_context.py): the tiled feed-forward and the activation
offload against the plain model (a real random Llama, gradients compared per parameter), the
refusals, the fit check; real runs with every switch on against the plain run."""
import os

import pytest
import torch

from sftmix_ds.config import ConfigError
from sftmix_ds.engine.long_context import (ActivationOffload, activation_bytes_per_token, check_fits,
                                           tile_feed_forwards)
from sftmix_ds.models import decoder_blocks

from .helpers import lines, read_metrics, same_history, same_weights, train_cli


def llama(layers=3, dropout=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=88, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attention_dropout=dropout)
    return LlamaForCausalLM(config).double()


def loss_and_grads(model, input_ids, labels, context=None):
    import contextlib

    model.zero_grad()
    with context or contextlib.nullcontext():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batch(rows=2, width=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (rows, width), generator=g)
    return ids, ids.clone()


@pytest.mark.parametrize("tiles", [2, 7, 200])  # 200 > the 80 tokens: empty tiles
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_feed_forward_gives_the_plain_loss_and_gradients(tiles, checkpointing):
    ids, labels = batch()
    model = llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want_loss, want = loss_and_grads(model, ids, labels)
    tile_feed_forwards(decoder_blocks(model), tiles, every_tile=tiles == 200)
    got_loss, got = loss_and_grads(model, ids, labels)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=name)
    with torch.no_grad():  # forward only (evaluation, scoring): the same logits
        model.eval()
        tiled = model(input_ids=ids).logits
    tile_free = llama()
    tile_free.eval()
    torch.testing.assert_close(tiled, tile_free(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


def test_a_tiled_mixture_of_experts_gives_the_plain_gradients():
    """Routing is per token, so an MoE block tiles exactly too (Mixtral's block wants [batch, tokens, d])."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2))
    ids, labels = batch()
    want_loss, want = loss_and_grads(model, ids, labels)
    tile_feed_forwards(decoder_blocks(model), 5, every_tile=True)
    assert all(block.mlp.forward.func.__name__ == "_tiled_forward" for block in decoder_blocks(model))
    got_loss, got = loss_and_grads(model, ids, labels)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for name in want:  # float32: the experts' grouped matmul has no float64 kernel
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_recomputed_tile_draws_the_forwards_dropout_masks():
    """Dropout inside the feed-forward: each tile's recomputation in backward uses the masks its forward
    drew, so the gradients are those of the very function the forward computed (here: the tiles run
    one by one with autograd, from the same random state)."""
    from torch import nn

    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(6, 12).double(), nn.Linear(12, 6).double()

        def forward(self, x):
            return self.down(nn.functional.dropout(torch.relu(self.up(x)), 0.5, training=True))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Dropped()

    torch.manual_seed(3)
    block, x = Block(), torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    want_out = torch.cat([block.mlp(t) for t in x.reshape(18, 6).tensor_split(4)]).reshape(2, 9, 6)
    want_out.square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in block.mlp.parameters()]
    x.grad = None
    block.zero_grad()
    tile_feed_forwards([block], 4, every_tile=False)
    torch.set_rng_state(state)
    out = block.mlp(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, want_out)
    for g, w in zip([x.grad] + [p.grad for p in block.mlp.parameters()], want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("tiles", [0, 5])
def test_offloaded_activations_give_the_plain_gradients_and_leave_the_device(tiles):
    ids, labels = batch()
    model = llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tiles:
        tile_feed_forwards(decoder_blocks(model), tiles, every_tile=False)
    want_loss, want = loss_and_grads(model, ids, labels)
    offload = ActivationOffload(torch.device("cpu"))
    got_loss, got = loss_and_grads(model, ids, labels, offload)
    assert torch.equal(got_loss, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # at least every block's input [2, 40, 32] in float64 went out and came back
    assert offload.offloaded_bytes >= 3 * 2 * 40 * 32 * 8


@pytest.mark.e2e
def test_combinations_that_cannot_work_are_refused_naming_the_key(tmp_path):
    proc = train_cli(["model=tiny", "train.offload_activations=true", f"output_dir={tmp_path}/a"], check=False)
    assert proc.returncode != 0 and "train.offload_activations=true: needs train.gradient_checkpointing=true" \
        in proc.stderr
    proc = train_cli(["model=tiny", "train.compile=true", "train.mlp_tiles=4", f"output_dir={tmp_path}/b"],
                     check=False)
    assert proc.returncode != 0 and "train.compile=true with train.mlp_tiles>1" in proc.stderr
    assert os.listdir(tmp_path / "b") == ["train.log"]  # refused before anything but the log


def test_a_micro_batch_that_cannot_fit_is_refused_with_the_numbers():
    from types import SimpleNamespace

    from transformers import LlamaConfig

    # Llama-3.1-8B's shape, bf16, one 141 GB device (about 130 GiB left after the engine)
    text = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8)
    plain = SimpleNamespace(gradient_checkpointing=True, mlp_tiles=0, offload_activations=False)
    every = SimpleNamespace(gradient_checkpointing=True, mlp_tiles=128, offload_activations=True)
    d, kv, inner = 4096, 1024, 14336
    assert activation_bytes_per_token(text, plain, 2) == 2 * (32 * d + 6 * d + 2 * kv + 3 * inner)
    assert activation_bytes_per_token(text, every, 2) == 2 * (6 * d + 2 * kv + d)
    free = 130 * 2**30
    with pytest.raises(ConfigError) as e:
        check_fits(text, plain, 500_000, 2, free, "cuda:0")
    message = str(e.value)
    assert "500000 tokens per micro-batch x 392.0 KiB of activations per token = at least 186.92 GiB; " \
           "130.00 GiB free on cuda:0" in message
    assert "train.mlp_tiles=N" in message and "train.offload_activations=true" in message
    assert "at least 28.61 GiB" in check_fits(text, every, 500_000, 2, free, "cuda:0")


# -- real runs: every switch on against the plain run -----------------------------------------------

BASE = ["model=tiny", "train.max_steps=4", "train.lr=1e-3", "train.adam_eps=1e-4", "train.warmup_ratio=0",
        "train.eval_every=0", "train.export_dtype=fp32", "train.seed=7", "train.micro_batch_size=2",
        "train.grad_accum=2", "train.gradient_checkpointing=true"]
LONG = ["train.mlp_tiles=3", "train.offload_activations=true"]
# name: (settings, ranks). Two ranks gathering layer by layer see rows of different lengths: each must
# still make the same gathers (empty tiles included).
RUNS = {"ntp_packed_zero3_2_ranks": (["method=ntp", "train.packing=true", "deepspeed=zero3",
                                      "deepspeed.gather_per_block=false", "train.grad_accum=1"], 2),
        "sftmix_zero2_lora": (["method=sftmix", "peft=lora", "peft.dropout=0", "deepspeed=zero2"], 0)}


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory, confidence_file):
    root = tmp_path_factory.mktemp("long_context")
    out = {}
    for name, (extra, nproc) in RUNS.items():
        extra = extra + ([f"method.confidence_file={confidence_file}"] if "method=sftmix" in extra else [])
        ref, long = str(root / f"{name}_ref"), str(root / name)
        train_cli(BASE + extra + [f"output_dir={ref}"], nproc=nproc)
        proc = train_cli(BASE + extra + LONG + ["train.save_every=2", f"output_dir={long}"], nproc=nproc)
        out[name] = (ref, long, proc, extra, nproc)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(RUNS))
def test_every_switch_on_trains_as_the_plain_run(long_runs, name):
    from safetensors.torch import load_file

    ref, long, proc, _, nproc = long_runs[name]
    assert "saved activations moved to host memory in step 1" in proc.stderr
    assert "train.mlp_tiles: each feed-forward in 3 tiles of tokens" in proc.stderr
    assert ("empty ones too" in proc.stderr) == (nproc == 2)
    assert lines(os.path.join(long, "samples.jsonl")) == lines(os.path.join(ref, "samples.jsonl"))
    got, want = read_metrics(long), read_metrics(ref)
    for g, r in zip(got, want, strict=True):
        for key in [k for k in r if k.startswith(("loss", "tokens/", "pairs"))]:
            assert g[key] == pytest.approx(r[key], rel=1e-5), (r["step"], key)
    folder, file = ("adapter", "adapter_model.safetensors") if "lora" in name else ("model", "model.safetensors")
    wa, wb = (load_file(os.path.join(d, folder, file)) for d in (ref, long))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.e2e
def test_every_switch_on_killed_and_resumed_is_bitwise(long_runs, tmp_path):
    _, clean, _, extra, nproc = long_runs["ntp_packed_zero3_2_ranks"]
    args = BASE + extra + LONG + ["train.save_every=2", f"output_dir={tmp_path}"]
    proc = train_cli(args, nproc=nproc, check=False, timeout=180, env={"SFTMIX_FAULT": "after_step:1:3"})
    assert proc.returncode != 0 and not os.path.exists(os.path.join(tmp_path, "model"))
    proc = train_cli(args, nproc=nproc)
    assert "resumed from" in proc.stderr and "step_2" in proc.stderr
    assert same_weights(clean, str(tmp_path)) and same_history(clean, str(tmp_path))
