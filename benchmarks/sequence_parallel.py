"""Per-rank memory against sequence length with and without sequence parallelism, on CPU ranks.

    python benchmarks/sequence_parallel.py                          # lengths 1024 2048 4096 8192
    python benchmarks/sequence_parallel.py --lengths 1024 2048 --budget-gb 1.2

For each length L, one optimizer step on one conversation of L tokens through launch/train.py:
N=1 as one process, N=2 as two ranks that share the sequence (train.sequence_parallel=2,
deepspeed launcher, gloo). A rank's peak resident memory is the run's logged peak_mem_gb (rank
0's; the ranks are symmetric). Its activation memory at L is that peak minus the same layout's
peak at --base-length, where activations are negligible: what is left is what grows with L.
The model is a random Llama (--arch) large enough that activations, not the fused loss's fixed
chunk, dominate. The longest sequence under --budget-gb per rank is read off a straight-line fit
of each layout's peaks (attention on CPU is sdpa's flash kernel: memory linear in L).
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
    script = os.path.join(ROOT, "launch", "train.py")
    if sp == 1:
        cmd = [sys.executable, script, *args]
    else:
        from sftmix_ds.common import free_port

        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(sp), "--master_port",
               str(free_port()), script, *args]
    threads = max(1, (os.cpu_count() or 2) // sp)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    tokens = round(record["tokens_per_s"] * record["step_s"])
    return {"length": length, "sequence_parallel": sp, "tokens": tokens, "peak_gb": record["peak_mem_gb"],
            "step_s": record["step_s"]}


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

    fig, ax = plt.subplots(figsize=(6, 4))
    for sp in (1, 2):
        mine = [r for r in rows if r["sequence_parallel"] == sp]
        ax.plot([r["tokens"] for r in mine], [r["activation_gb"] for r in mine], "o-",
                label=f"sequence_parallel={sp}")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("activation memory per rank (GB)")
    ax.set_title("peak RSS above the short-sequence baseline, one step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--base-length", type=int, default=128)
    parser.add_argument("--budget-gb", type=float, default=2.0, help="per-rank peak memory budget")
    parser.add_argument("--arch", type=json.loads, default=ARCH, help="the random Llama's model.arch (JSON)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sp_bench_")
    rows, base = [], {}
    for sp in (1, 2):
        base[sp] = run(args.base_length, sp, work, args.arch)["peak_gb"]
        for length in args.lengths:
            row = run(length, sp, work, args.arch)
            row["activation_gb"] = row["peak_gb"] - base[sp]
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["length"], r["sequence_parallel"]): r for r in rows}
    lines = ["# Sequence parallelism: per-rank memory against sequence length (CPU)", "",
             f"`python benchmarks/sequence_parallel.py --lengths {' '.join(map(str, args.lengths))} "
             f"--budget-gb {args.budget_gb}`: random Llama {json.dumps(args.arch)}, fp32, ZeRO-3, one step of one "
             f"sequence, sdpa attention, no gradient checkpointing. Baseline peaks at {args.base_length} tokens: "
             f"N=1 {base[1]:.3f} GB, N=2 {base[2]:.3f} GB per rank.", "",
             "| tokens | N=1 peak GB | N=2 peak GB / rank | N=1 activations GB | N=2 activations GB / rank | ratio | "
             "N=1 step s | N=2 step s |", "|---|---|---|---|---|---|---|---|"]
    for length in args.lengths:
        one, two = by[(length, 1)], by[(length, 2)]
        lines.append(f"| {one['tokens']} | {one['peak_gb']:.3f} | {two['peak_gb']:.3f} | {one['activation_gb']:.3f} | "
                     f"{two['activation_gb']:.3f} | {two['activation_gb'] / one['activation_gb']:.2f} | "
                     f"{one['step_s']:.1f} | {two['step_s']:.1f} |")
    longest = {}
    for sp in (1, 2):
        intercept, slope = fit_line([(r["tokens"], r["peak_gb"]) for r in rows if r["sequence_parallel"] == sp])
        longest[sp] = int((args.budget_gb - intercept) / slope)
    lines += ["", f"Longest sequence under {args.budget_gb} GB per rank (straight-line fit of the peaks): "
              f"N=1 {longest[1]} tokens, N=2 {longest[2]} tokens ({longest[2] / longest[1]:.2f}x).",
              "", "![activation memory per rank](sequence_parallel_cpu.png)"]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "sequence_parallel_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.results, "sequence_parallel_cpu.json"), "w") as f:
        json.dump({"rows": rows, "base_gb": base, "longest_under_budget": longest, "budget_gb": args.budget_gb,
                   "arch": args.arch}, f, indent=1)
    plot(rows, os.path.join(args.results, "sequence_parallel_cpu.png"))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
