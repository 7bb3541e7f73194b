"""Per-rank memory against sequence length with and without sequence parallelism, on CPU ranks.

    python benchmarks/sequence_parallel.py                      # lengths 1024 .. 16384
    python benchmarks/sequence_parallel.py --lengths 1024 2048 --budget-gb 1.2

For each length L, one optimizer step on one conversation of L tokens through the training entry
point: N=1 as one process, N=2 as two ranks that share the sequence (train.sequence_parallel=2,
deepspeed launcher, gloo). Two figures per rank (rank 0's; the ranks are symmetric):
- activation memory: the bytes of the tensors autograd saves for the backward pass during the
  step's forward (each storage once, the parameters not counted), measured by a saved-tensors
  hook around the engine's forward;
- peak resident memory (the run's peak_mem_gb), with MALLOC_MMAP_THRESHOLD_ fixed so freed tensors
  go back to the system and the peak follows what was live (glibc's default moving threshold keeps
  freed blocks and makes the peak a function of fragmentation).
The model is a random Llama (--arch) large enough that activations dominate. The longest sequence
under --budget-gb per rank is read off a straight-line fit of each layout's peaks (attention on CPU
is sdpa's flash kernel: memory linear in L).
Writes benchmarks/results/sequence_parallel_cpu.{md,json,png}.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The training entry point, its engine forward measuring what autograd saves for backward.
SHIM = """
import atexit, os, sys
import torch
sys.path.insert(0, {root!r})
from sftmix_ds.engine.wrapper import LossModule

peak = [0]
forward = LossModule.forward


def measured(self, *args, **kwargs):
    if not self.training or kwargs.get("compare_logits"):
        return forward(self, *args, **kwargs)
    saved = {{}}

    def pack(t):
        # ZeRO-3 gathers each parameter into new storage as its module runs: compare with them now
        storage = t.untyped_storage()
        if storage.data_ptr() not in {{p.untyped_storage().data_ptr() for p in self.parameters()}}:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(self, *args, **kwargs)
    peak[0] = max(peak[0], sum(saved.values()))
    return out


LossModule.forward = measured
atexit.register(lambda: print("SAVED_BYTES", os.environ.get("RANK"), peak[0], file=sys.stderr))
from sftmix_ds.cli import train_main
train_main()
"""
ARCH = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": 65536}


def conversations(path: str, length: int, count: int = 2) -> None:
    """`count` chat records of about `length` tokens each (SmolLM2's tokenizer), a long answer to a short question."""
    from transformers import AutoTokenizer

    from sftmix_ds.models import SMOLLM2_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    rng = random.Random(length)
    with open(path, "w") as f:
        for i in range(count):
            words = " ".join(str(rng.randrange(10**6)) for _ in range(length))
            answer = tokenizer.decode(tokenizer(words)["input_ids"][:length - 24])
            f.write(json.dumps({"id": f"long-{length}-{i}", "messages": [
                {"role": "user", "content": "Continue the list."}, {"role": "assistant", "content": answer}]}) + "\n")


def run(length: int, sp: int, work: str, arch: dict) -> dict:
    data = os.path.join(work, f"data_{length}.jsonl")
    if not os.path.exists(data):
        conversations(data, length)
    out = os.path.join(work, f"run_{length}_sp{sp}")
    shutil.rmtree(out, ignore_errors=True)
    args = ["model=tiny", "model.attn_implementation=sdpa", *(f"model.arch.{k}={v}" for k, v in arch.items()),
            "data=jsonl", f"data.train_files=[{data}]", f"data.max_length={length + 64}", "method=ntp",
            "train.max_steps=1", "train.micro_batch_size=1", "train.export_final=false", "train.eval_every=0",
            f"train.sequence_parallel={sp}", f"output_dir={out}", f"data.cache_dir={work}/cache"]
    script = os.path.join(work, "train_measured.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(SHIM.format(root=ROOT))
    if sp == 1:
        cmd = [sys.executable, script, *args]
    else:
        from sftmix_ds.common import free_port

        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(sp), "--master_port",
               str(free_port()), script, *args]
    threads = max(1, (os.cpu_count() or 2) // sp)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
                               "MALLOC_MMAP_THRESHOLD_": "131072"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    tokens = round(record["tokens_per_s"] * record["step_s"])
    saved = [int(line.split()[2]) for line in proc.stderr.splitlines() if line.startswith("SAVED_BYTES 0 ")]
    return {"length": length, "sequence_parallel": sp, "tokens": tokens, "activation_gb": saved[0] / 2**30,
            "peak_gb": record["peak_mem_gb"], "step_s": record["step_s"]}


def fit_line(points):
    """Least squares (intercept, slope) of peak GB against length."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("activation_gb", "peak_gb"), ("activations saved for backward, per rank",
                                                                   "peak resident memory, per rank")):
        for sp in (1, 2):
            mine = [r for r in rows if r["sequence_parallel"] == sp]
            ax.plot([r["tokens"] for r in mine], [r[key] for r in mine], "o-", label=f"sequence_parallel={sp}")
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--budget-gb", type=float, default=2.0, help="per-rank peak memory budget")
    parser.add_argument("--arch", type=json.loads, default=ARCH, help="the random Llama's model.arch (JSON)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sp_bench_")
    rows = []
    for sp in (1, 2):
        for length in args.lengths:
            rows.append(run(length, sp, work, args.arch))
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["length"], r["sequence_parallel"]): r for r in rows}
    lines = ["# Sequence parallelism: per-rank memory against sequence length (CPU)", "",
             f"`python benchmarks/sequence_parallel.py --lengths {' '.join(map(str, args.lengths))} "
             f"--budget-gb {args.budget_gb}`: random Llama {json.dumps(args.arch)}, fp32, ZeRO-3, one step of one "
             "sequence, sdpa attention, no gradient checkpointing, 2 CPU cores (N=2: one thread per rank). "
             "Activations: bytes autograd saves for backward (parameters not counted); peak: resident memory.", "",
             "| tokens | activations N=1 GB | N=2 GB / rank | ratio | peak N=1 GB | N=2 GB / rank | "
             "step N=1 s | N=2 s |", "|---|---|---|---|---|---|---|---|"]
    for length in args.lengths:
        one, two = by[(length, 1)], by[(length, 2)]
        lines.append(f"| {one['tokens']} | {one['activation_gb']:.3f} | {two['activation_gb']:.3f} | "
                     f"{two['activation_gb'] / one['activation_gb']:.2f} | {one['peak_gb']:.3f} | "
                     f"{two['peak_gb']:.3f} | {one['step_s']:.1f} | {two['step_s']:.1f} |")
    longest = {}
    for sp in (1, 2):
        intercept, slope = fit_line([(r["tokens"], r["peak_gb"]) for r in rows if r["sequence_parallel"] == sp])
        longest[sp] = int((args.budget_gb - intercept) / slope)
    lines += ["", f"Longest sequence under {args.budget_gb} GB per rank (straight-line fit of the peaks): "
              f"N=1 {longest[1]} tokens, N=2 {longest[2]} tokens ({longest[2] / longest[1]:.2f}x).",
              "", "![memory per rank](sequence_parallel_cpu.png)"]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "sequence_parallel_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.results, "sequence_parallel_cpu.json"), "w") as f:
        json.dump({"rows": rows, "longest_under_budget": longest, "budget_gb": args.budget_gb,
                   "arch": args.arch}, f, indent=1)
    plot(rows, os.path.join(args.results, "sequence_parallel_cpu.png"))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
