"""train.sequence_parallel: the sharded loss against the unsharded one (2 gloo processes, no engine),
refusals before any process group, and real runs at N=2 against one process."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sftmix_ds.common import IGNORE, free_port
from sftmix_ds.config import ConfigError
from sftmix_ds.data.batching import aligned_pairs, response_rows
from sftmix_ds.engine.sequence import SequenceParallel, check_data_parallel, check_sequence_parallel
from sftmix_ds.losses import fused_sftmix_loss

from .helpers import lines, read_metrics, same_history, same_run_within_fp32, same_weights, train_cli

B, T, D, V = 4, 15, 8, 11  # T odd: the slices need a padding column


def loss_inputs():
    """A pair micro-batch [a1, a2, b1, b2] whose partners' responses sit in different halves of the
    sequence (a1 early, b1 late, and the reverse for pair 2), so pairs cross the two slices."""
    g = torch.Generator().manual_seed(0)
    labels = torch.full((B, T), IGNORE)
    for row, (start, stop) in enumerate([(1, 6), (9, 15), (10, 15), (2, 8)]):
        labels[row, start:stop] = torch.randint(0, V, (stop - start,), generator=g)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    pair_a, pair_b, pair_of_row = aligned_pairs(labels, 2)
    lam = torch.tensor([0.3, 0.8], dtype=torch.float64)[pair_of_row]
    return hidden, weight, labels, pair_a, pair_b, lam


def unsharded():
    hidden, weight, labels, pair_a, pair_b, lam = loss_inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    rows, targets, _ = response_rows(hidden, {"labels": labels})
    ntp, mix = fused_sftmix_loss(rows, weight, targets, pair_a, pair_b, lam, chunk_size=3, backend="torch")
    (ntp + 0.7 * mix).backward()
    return ntp.detach(), mix.detach(), hidden.grad, weight.grad


def sharded_rank(rank: int, port: int, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sp = SequenceParallel(2, rank, 2)
    hidden, weight, labels, pair_a, pair_b, lam = loss_inputs()
    _, _, shard = sp.split(torch.zeros(B, T, dtype=torch.long), labels, None)
    full = torch.cat([hidden, hidden.new_zeros(B, 1, D)], 1)  # the padding column
    local = full[:, shard.start:shard.stop].clone().requires_grad_(True)
    weight.requires_grad_(True)
    rows, targets, _ = response_rows(local, {"shard": shard})
    rows, targets, a, b, lam_here, ntp_rows = shard.partners(rows, targets, pair_a, pair_b, lam)
    ntp, mix = fused_sftmix_loss(rows, weight, targets, a, b, lam_here, chunk_size=3, backend="torch",
                                 ntp_rows=ntp_rows)
    (ntp + 0.7 * mix).backward()
    crossing = int((shard.owner[pair_a] != shard.owner[pair_b]).sum())
    torch.save({"ntp": ntp.detach(), "mix": mix.detach(), "grad_h": local.grad, "grad_w": weight.grad,
                "start": shard.start, "stop": shard.stop, "crossing": crossing}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_sftmix_loss_and_gradients_equal_the_unsharded(tmp_path):
    mp.spawn(sharded_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert parts[0]["crossing"] > 0  # partners do sit on different ranks
    ntp, mix, grad_h, grad_w = unsharded()
    torch.testing.assert_close(sum(p["ntp"] for p in parts), ntp)
    torch.testing.assert_close(sum(p["mix"] for p in parts), mix)
    torch.testing.assert_close(sum(p["grad_w"] for p in parts), grad_w)
    got_h = torch.cat([p["grad_h"] for p in parts], 1)
    torch.testing.assert_close(got_h[:, :T], grad_h)
    assert float(got_h[:, T:].abs().max()) == 0  # the padding column carries no gradient


def test_layouts_that_cannot_work_are_refused_naming_the_key(tmp_path):
    from transformers import LlamaConfig

    check_data_parallel(2, 4)
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=3: must divide the number of ranks \(4\)"):
        check_data_parallel(3, 4)
    LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3).save_pretrained(tmp_path)
    check_sequence_parallel(3, str(tmp_path), "sdpa")
    check_sequence_parallel(6, str(tmp_path), "flash_attention_2")  # 3 key/value heads, each on 2 ranks
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=4: .* divide the model's 6 attention heads"):
        check_sequence_parallel(4, str(tmp_path), "sdpa")
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=2: .* or be a multiple of its 3 key/value"):
        check_sequence_parallel(2, str(tmp_path), "sdpa")
    for refused in ("eager", "flex_attention"):
        with pytest.raises(ConfigError, match=f"needs model.attn_implementation sdpa or flash_attention_2 .*"
                                              f"resolves to {refused}"):
            check_sequence_parallel(3, str(tmp_path), refused)


# -- real runs: 2 ranks at N=2 (one sequence-parallel group) against one process -----------------

BASE = ["model=tiny", "model.attn_implementation=sdpa", "train.max_steps=4", "train.lr=1e-3", "train.adam_eps=1e-4",
        "train.warmup_ratio=0", "train.eval_every=0", "train.export_dtype=fp32", "train.seed=7",
        "train.micro_batch_size=2", "train.grad_accum=2", "deepspeed=zero3"]
# name: (method, the sequence-parallel run's extra settings, its ranks); each compared with one process
# at N=1 (micro-batch 4, no accumulation: the same global batch of 4).
RUNS = {"ntp": ("ntp", [], 2), "ntp_packed_zero2": ("ntp", ["train.packing=true", "deepspeed=zero2"], 2),
        "sftmix": ("sftmix", ["train.save_every=2"], 2),
        "sftmix_packed_checkpointing": ("sftmix", ["train.packing=true", "train.gradient_checkpointing=true"], 2),
        "sftmix_lora": ("sftmix", ["peft=lora", "peft.dropout=0"], 2),
        # long context on one device composed with sequence parallelism (ZeRO-3 gathering layer by layer)
        "sftmix_long_context": ("sftmix", ["train.gradient_checkpointing=true", "train.mlp_tiles=3",
                                           "train.offload_activations=true", "deepspeed.gather_per_block=false"], 2),
        # 2 data-parallel groups x 2 ranks sharing each sequence
        "sftmix_packed_4_ranks": ("sftmix", ["train.packing=true", "train.grad_accum=1"], 4)}


def method_args(method, confidence_file):
    return [f"method={method}"] + ([f"method.confidence_file={confidence_file}"] if method == "sftmix" else [])


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory, confidence_file):
    root = tmp_path_factory.mktemp("sequence_parallel")
    out, refs = {}, {}  # refs: one reference run per distinct setting (several layouts share one)
    for name, (method, extra, nproc) in RUNS.items():
        lora = [a for a in extra if a.startswith("peft")]
        args = BASE + method_args(method, confidence_file) + lora + ["train.micro_batch_size=4", "train.grad_accum=1"]
        key = tuple(args)
        if key not in refs:
            refs[key] = str(root / f"{name}_ref")
            train_cli(args + [f"output_dir={refs[key]}"])
        sp = str(root / name)
        proc = train_cli(BASE + method_args(method, confidence_file) + extra + ["train.sequence_parallel=2",
                                                                                f"output_dir={sp}"], nproc=nproc)
        out[name] = (refs[key], sp, proc)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_sharing_each_sequence_equal_one_process(sp_runs, name):
    from safetensors.torch import load_file

    ref, sp, proc = sp_runs[name]
    assert f"{RUNS[name][2]} ranks (sequence parallel 2), global batch 4" in proc.stderr
    assert lines(os.path.join(sp, "samples.jsonl")) == lines(os.path.join(ref, "samples.jsonl"))
    got, want = read_metrics(sp), read_metrics(ref)
    for g, r in zip(got, want, strict=True):
        for key in [k for k in r if k.startswith(("loss", "tokens/", "pairs", "lam_mean", "eval_loss"))]:
            assert g[key] == pytest.approx(r[key], rel=1e-5), (r["step"], key)
    if name.startswith("sftmix"):
        assert all(r["pairs"] > 0 for r in want) and want[0]["loss/mix"] > 0
    folder = "adapter" if name.endswith("lora") else "model"
    file = "adapter_model.safetensors" if name.endswith("lora") else "model.safetensors"
    wa, wb = (load_file(os.path.join(d, folder, file)) for d in (ref, sp))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.e2e
def test_kill_9_mid_run_then_resume_is_bitwise(sp_runs, confidence_file, tmp_path):
    _, clean, _ = sp_runs["sftmix"]
    args = BASE + method_args("sftmix", confidence_file) + ["train.save_every=2", "train.sequence_parallel=2",
                                                             f"output_dir={tmp_path}"]
    proc = train_cli(args, nproc=2, check=False, timeout=180, env={"SFTMIX_FAULT": "after_step:1:3"})
    assert proc.returncode != 0 and not os.path.exists(os.path.join(tmp_path, "model"))
    proc = train_cli(args, nproc=2)
    assert "resumed from" in proc.stderr and "step_2" in proc.stderr
    assert same_weights(clean, str(tmp_path))  # bitwise, fp32 on CPU
    assert same_history(clean, str(tmp_path))


@pytest.mark.e2e
def test_resume_at_another_sequence_parallel_size_keeps_the_run(sp_runs, confidence_file, tmp_path):
    """N=2 -> N=1 on the same 2 ranks (1 -> 2 data-parallel groups: grad_accum 2 -> 1), and 1 rank at
    N=1 -> 2 ranks at N=2 (a universal checkpoint), each equal to the uninterrupted N=2 run."""
    _, clean, _ = sp_runs["sftmix"]
    args = BASE + method_args("sftmix", confidence_file) + ["train.save_every=2"]
    down = str(tmp_path / "down")
    train_cli(args + ["train.sequence_parallel=2", "train.stop_after_steps=2", f"output_dir={down}"], nproc=2)
    proc = train_cli(args + [f"output_dir={down}"], nproc=2)
    assert "train.grad_accum 2 -> 1 on 2 ranks" in proc.stderr and "universal" not in proc.stderr.lower()
    same_run_within_fp32(clean, down)
    up = str(tmp_path / "up")
    train_cli(args + ["train.stop_after_steps=2", f"output_dir={up}"])
    proc = train_cli(args + ["train.sequence_parallel=2", f"output_dir={up}"], nproc=2)
    assert "resumed from" in proc.stderr
    same_run_within_fp32(clean, up)
