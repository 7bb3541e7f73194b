"""Long sequences on one device: memory against length for each long-context switch (CPU).

    python benchmarks/long_context.py                            # lengths 1024 .. 8192
    python benchmarks/long_context.py --lengths 256 512 --variants checkpointed all

For each variant and length, one optimizer step of ntp on one conversation of that many tokens
through the training entry point (one process, ZeRO-2, fp32). Two figures:
- device bytes: the peak, over the step's forwards and backwards, of the bytes of every tensor the
  step allocated and still held (a TorchDispatchMode follows each storage until it is freed), the
  optimizer step and the host copies of train.offload_activations not counted. This is what a GPU's
  allocator would hold for the step beyond the model, its gradients' buffers and its optimizer;
  per token: the slope of a straight-line fit over the lengths, which drops what does not grow with
  length (gradients, the loss's chunk);
- peak resident memory (the run's peak_mem_gb, with MALLOC_MMAP_THRESHOLD_ fixed as in
  sequence_parallel.py). On CPU the offloaded copies stay in the same memory, so offloading lowers
  device bytes, not this.
The longest sequence under --budget-gb is read off a straight-line fit of each variant's peaks
(attention on CPU is sdpa's flash kernel: memory linear in length).
The model is a random Llama with the proportions of Llama-3.1-8B (32 blocks, feed-forward 3.5x the
hidden size, 4 query heads per key/value head) at hidden size 128, so that the blocks' inputs weigh
against one block's intermediates as they do at 8B.
Writes benchmarks/results/long_context_cpu.{md,json,png}.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.sequence_parallel import conversations, fit_line  # noqa: E402

ARCH = {"hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 32, "num_attention_heads": 4,
        "num_key_value_heads": 1, "max_position_embeddings": 262144}
CHECKPOINTED = ["train.gradient_checkpointing=true"]
VARIANTS = {"none": [], "checkpointed": CHECKPOINTED,
            "tiled": CHECKPOINTED + ["train.mlp_tiles=32"],
            "offload": CHECKPOINTED + ["train.offload_activations=true"],
            "all": CHECKPOINTED + ["train.mlp_tiles=32", "train.offload_activations=true"]}
# The training entry point with the step's allocations followed (see the docstring).
SHIM = """
import atexit, os, sys, weakref
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
sys.path.insert(0, {root!r})
import deepspeed
from sftmix_ds import trainer
from sftmix_ds.engine import long_context


class Live(TorchDispatchMode):
    counting, live, peak, seen = True, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {{}}))
        if Live.counting:
            tree_map_only(torch.Tensor, self.follow, out)
        return out

    @staticmethod
    def follow(t):
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in Live.seen or not size:
            return
        Live.seen.add(key)
        Live.live += size
        Live.peak = max(Live.peak, Live.live)

        def freed():
            Live.live -= size
            Live.seen.discard(key)
        weakref.finalize(storage, freed)


def paused(fn):
    def run(*args, **kwargs):
        was, Live.counting = Live.counting, False
        try:
            return fn(*args, **kwargs)
        finally:
            Live.counting = was
    return run


deepspeed.runtime.engine.DeepSpeedEngine.step = paused(deepspeed.runtime.engine.DeepSpeedEngine.step)
long_context.ActivationOffload._pack = paused(long_context.ActivationOffload._pack)  # its host copies
loss_step = trainer.Recipe._loss_step


def measured(self, *args, **kwargs):
    with Live():
        return loss_step(self, *args, **kwargs)


trainer.Recipe._loss_step = measured
atexit.register(lambda: print("DEVICE_BYTES", Live.peak, file=sys.stderr))
from sftmix_ds.cli import train_main
train_main()
"""


def run(variant: str, length: int, work: str, arch: dict) -> dict:
    data = os.path.join(work, f"data_{length}.jsonl")
    if not os.path.exists(data):
        conversations(data, length, count=1)
    out = os.path.join(work, f"run_{variant}_{length}")
    shutil.rmtree(out, ignore_errors=True)
    args = ["model=tiny", "model.attn_implementation=sdpa", *(f"model.arch.{k}={v}" for k, v in arch.items()),
            "data=jsonl", f"data.train_files=[{data}]", f"data.max_length={length + 64}", "method=ntp",
            "train.max_steps=1", "train.micro_batch_size=1", "train.export_final=false", "train.eval_every=0",
            "train.save_every_minutes=0", f"output_dir={out}", f"data.cache_dir={work}/cache",
            # ZeRO-2's reduce bucket (DeepSpeed's default 5e8 elements: 2 GB in fp32) would dwarf the activations
            "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000000",
            *VARIANTS[variant]]
    script = os.path.join(work, "train_measured.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(SHIM.format(root=ROOT))
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": "131072"})
    if proc.returncode != 0:
        sys.exit(f"{variant} at {length} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    device = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("DEVICE_BYTES ")]
    return {"variant": variant, "length": length, "tokens": round(record["tokens_per_s"] * record["step_s"]),
            "device_gb": device[0] / 2**30, "peak_gb": record["peak_mem_gb"], "step_s": record["step_s"]}


def plot(rows, variants, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("device_gb", "peak_gb"), ("device memory held by the step",
                                                               "peak resident memory (CPU)")):
        for variant in variants:
            mine = [r for r in rows if r["variant"] == variant]
            ax.plot([r["tokens"] for r in mine], [r[key] for r in mine], "o-", label=variant)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("GB")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget-gb", type=float, default=4.0, help="peak resident memory budget")
    parser.add_argument("--arch", type=json.loads, default=ARCH, help="the random Llama's model.arch (JSON)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="long_context_bench_")
    rows = []
    for variant in args.variants:
        for length in args.lengths:
            rows.append(run(variant, length, work, args.arch))
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        _, per_token = fit_line([(r["tokens"], r["device_gb"] * 2**30) for r in mine])
        intercept, slope = fit_line([(r["tokens"], r["peak_gb"]) for r in mine])
        summary[variant] = {"device_bytes_per_token": per_token,
                            "longest_under_budget": int((args.budget_gb - intercept) / slope)}
    base = summary.get("checkpointed", {}).get("device_bytes_per_token")
    lines = ["# Long context on one device: memory against sequence length (CPU)", "",
             f"`python benchmarks/long_context.py --lengths {' '.join(map(str, args.lengths))} "
             f"--budget-gb {args.budget_gb}`: random Llama {json.dumps(args.arch)} (Llama-3.1-8B's proportions), "
             "fp32, ZeRO-2, ntp, one step of one sequence, sdpa attention, 2 CPU cores. Device bytes: the peak of "
             "what the step's forwards and backwards held (host copies of the offload not counted); per token: the "
             "slope over the lengths. Peak RSS: resident memory, in which offloaded copies still count on CPU.", "",
             "| variant | settings | " + " | ".join(f"device GB @{n}" for n in args.lengths) +
             " | device bytes / token | vs checkpointed | " + " | ".join(f"RSS GB @{n}" for n in args.lengths) +
             f" | longest under {args.budget_gb} GB RSS |",
             "|---|---|" + "---|" * (2 * len(args.lengths) + 3)]
    for variant in args.variants:
        mine = {r["length"]: r for r in rows if r["variant"] == variant}
        s = summary[variant]
        ratio = f"{s['device_bytes_per_token'] / base:.2f}x" if base else "-"
        lines.append(f"| {variant} | {' '.join(VARIANTS[variant]) or '(none)'} | "
                     + " | ".join(f"{mine[n]['device_gb']:.3f}" for n in args.lengths)
                     + f" | {s['device_bytes_per_token']:.0f} | {ratio} | "
                     + " | ".join(f"{mine[n]['peak_gb']:.2f}" for n in args.lengths)
                     + f" | {s['longest_under_budget']} |")
    if "none" in summary and "all" in summary:
        lines += ["", f"Longest sequence under {args.budget_gb} GB resident (straight-line fits, extrapolated past "
                  f"the measured lengths): every switch {summary['all']['longest_under_budget']} tokens, none "
                  f"{summary['none']['longest_under_budget']} tokens "
                  f"({summary['all']['longest_under_budget'] / summary['none']['longest_under_budget']:.1f}x)."]
    lines += ["", f"Step time at {args.lengths[-1]} tokens: " + ", ".join(
        f"{r['variant']} {r['step_s']:.1f} s" for r in rows if r["length"] == args.lengths[-1]) + ".",
        "", "![memory against length](long_context_cpu.png)"]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "long_context_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.results, "long_context_cpu.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary, "budget_gb": args.budget_gb, "arch": args.arch}, f, indent=1)
    plot(rows, args.variants, os.path.join(args.results, "long_context_cpu.png"))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
