"""Long sequences on one device: memory against length for each long-context switch (CPU).

    python benchmarks/long_context.py                            # lengths 1024 .. 8192
    python benchmarks/long_context.py --lengths 256 512 --variants checkpointed all

For each variant and length, two optimizer steps of ntp on one conversation of that many tokens
through the training entry point (one process, ZeRO-2, fp32). Two figures:
- device bytes: the peak, over the second step's forwards and backwards (the first allocates ZeRO's
  gradient buffers, once), of the bytes of every tensor the step allocated and still held (a
  TorchDispatchMode follows each storage until it is freed); views, gradients (tensors of a
  parameter's shape, what ZeRO allocates for them), the optimizer step and the host copies of
  train.offload_activations not counted: the activations a GPU's allocator would hold for the step.
  Per token: the slope between the two longest lengths, which drops what does not grow with length
  (the loss's chunk, at short lengths the peak);
- peak resident memory (the run's peak_mem_gb, with MALLOC_MMAP_THRESHOLD_ fixed as in
  sequence_parallel.py). On CPU the offloaded copies stay in the same memory, so offloading lowers
  device bytes, not this.
The longest sequence under --budget-gb is read off the line through each variant's peaks at the two
longest lengths (attention on CPU is sdpa's flash kernel: memory linear in length).
The model is a random Llama with the proportions of Llama-3.1-8B (32 blocks, feed-forward 3.5x the
hidden size, 4 query heads per key/value head) at hidden size 128, so that the blocks' inputs weigh
against one block's intermediates as they do at 8B.
Writes benchmarks/results/long_context_cpu.{md,json,png}.

    python benchmarks/long_context.py --grow llama1b_random --deadline 240          # a GPU stage
    python benchmarks/long_context.py --grow llama8b_random --lora --deadline 300

--grow: the longest sequence a model trains on this device with every switch on (gradient
checkpointing, offload, train.mlp_tiles = tokens / hidden size): one step of ntp and of sftmix (a pair
of two such sequences) at doubling lengths from --start until a step fails (out of memory, or the
fit check refuses it) or the deadline; peak memory, step time and tokens/s at each length.
Writes benchmarks/results/long_context_<gpu|cpu>_MODEL.{md,json}.
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
    counting, live, peak, held = True, 0, 0, {{}}  # held: storage address -> bytes counted
    parameter_shapes = set()  # a tensor of a parameter's shape is its gradient (activations have tokens)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {{}}))
        if Live.counting:
            inputs = set()
            tree_map_only(torch.Tensor, lambda t: inputs.add(t.untyped_storage().data_ptr()), (args, kwargs))
            tree_map_only(torch.Tensor, lambda t: self.follow(t, inputs), out)
        return out

    @staticmethod
    def follow(t, inputs):
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in inputs or key in Live.held or not size or tuple(t.shape) in Live.parameter_shapes:
            return  # a view, an in-place result, known already, or a gradient
        Live.held[key] = size
        Live.live += size
        Live.peak = max(Live.peak, Live.live)
        weakref.finalize(storage, Live.drop, key)

    @staticmethod
    def drop(key):
        Live.live -= Live.held.pop(key, 0)


def paused(fn):
    def run(*args, **kwargs):
        was, Live.counting = Live.counting, False
        try:
            return fn(*args, **kwargs)
        finally:
            Live.counting = was
    return run


deepspeed.runtime.engine.DeepSpeedEngine.step = paused(deepspeed.runtime.engine.DeepSpeedEngine.step)
# Gradients are not activations: a tensor of a parameter's shape is not counted, nor what ZeRO allocates
# for gradients, and a parameter's accumulated gradient leaves the count when ZeRO takes it.
zero = deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer
process_gradients = paused(zero.process_gradients)


def taking_gradient(self, param, i):
    if param.grad is not None:
        Live.drop(param.grad.untyped_storage().data_ptr())
    return process_gradients(self, param, i)


zero.process_gradients = taking_gradient
zero.update_hook_state_and_maybe_run_epilogue = paused(zero.update_hook_state_and_maybe_run_epilogue)
long_context.ActivationOffload._pack = paused(long_context.ActivationOffload._pack)  # its host copies
loss_step = trainer.Recipe._loss_step


def measured(self, *args, **kwargs):
    if self.step == 0:  # the first step allocates ZeRO's buffers once: measure the second
        return loss_step(self, *args, **kwargs)
    Live.parameter_shapes = {{tuple(p.shape) for p in self.model.parameters()}}
    with Live():
        return loss_step(self, *args, **kwargs)


trainer.Recipe._loss_step = measured
atexit.register(lambda: print("DEVICE_BYTES", Live.peak, file=sys.stderr))
from sftmix_ds.cli import train_main
train_main()
"""


def long_data(work: str, length: int, count: int) -> str:
    """`count` conversations of about `length` tokens, and a confidence file that pairs them for sftmix."""
    from sftmix_ds.confidence import confidence_records, write_confidence_file

    data = os.path.join(work, f"data_{length}_{count}.jsonl")
    if not os.path.exists(data):
        conversations(data, length, count=count)
        ids = [f"long-{length}-{i}" for i in range(count)]
        write_confidence_file(data + ".confidence", confidence_records([{i: float(n) for n, i in enumerate(ids)}]),
                              "benchmark")
    return data


def run(variant: str, length: int, work: str, arch: dict, loss_chunk_size: int = 32) -> dict:
    """One measured ntp step of one sequence on the CPU model (see the docstring)."""
    out = os.path.join(work, f"run_{variant}_{length}")
    args = ["model=tiny", "model.attn_implementation=sdpa", *(f"model.arch.{k}={v}" for k, v in arch.items()),
            # ZeRO-2's reduce bucket (DeepSpeed's default 5e8 elements: 2 GB in fp32) would dwarf the activations
            "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000000",
            # and the fused loss's chunk (auto: 2^24 logits, 256 MB of temporaries) the blocks' activations
            f"train.loss_chunk_size={loss_chunk_size}", *VARIANTS[variant]]
    script = os.path.join(work, "train_measured.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(SHIM.format(root=ROOT))
    proc, record = one_step(script, args, "ntp", length, work, out, {"MALLOC_MMAP_THRESHOLD_": "131072"}, steps=2)
    if proc.returncode != 0:
        sys.exit(f"{variant} at {length} failed:\n{proc.stderr[-4000:]}")
    device = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("DEVICE_BYTES ")]
    return {"variant": variant, "length": length, "tokens": round(record["tokens_per_s"] * record["step_s"]),
            "device_gb": device[0] / 2**30, "peak_gb": record["peak_mem_gb"], "step_s": record["step_s"]}


def one_step(script: str, args: list, method: str, length: int, work: str, out: str, env: dict, timeout=None,
             steps: int = 1):
    """(the process, its last metrics record or None) of `steps` optimizer steps on sequences of `length`
    tokens (sftmix: a pair of them)."""
    count = 2 if method == "sftmix" else 1
    data = long_data(work, length, count)
    shutil.rmtree(out, ignore_errors=True)
    args = ["data=jsonl", f"data.train_files=[{data}]", f"data.max_length={length + 64}", f"method={method}",
            f"train.max_steps={steps}", f"train.micro_batch_size={count}", "train.export_final=false",
            "train.eval_every=0", "train.save_every_minutes=0", f"output_dir={out}", f"data.cache_dir={work}/cache",
            *([f"method.confidence_file={data}.confidence"] if method == "sftmix" else []), *args]
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled", **env})
    metrics = os.path.join(out, "metrics.jsonl")
    if proc.returncode != 0 or not os.path.exists(metrics):
        return proc, None
    with open(metrics) as f:
        return proc, json.loads(f.readlines()[-1])


def grow(args) -> None:
    """The longest sequence each method trains on this device with every switch on (see the docstring)."""
    import math
    import time

    import torch
    from omegaconf import OmegaConf

    started, work = time.monotonic(), tempfile.mkdtemp(prefix="long_context_grow_")
    hidden = OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{args.grow}.yaml")).arch.hidden_size
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    rows, stem = [], os.path.join(args.results, f"long_context_{kind}_{args.grow}")
    for method in args.methods:
        length = args.start
        while args.deadline - (time.monotonic() - started) > 60:
            tokens = length * (2 if method == "sftmix" else 1)
            switches = [*CHECKPOINTED, "train.offload_activations=true",
                        f"train.mlp_tiles={max(2, math.ceil(tokens / hidden))}"]
            overrides = [f"model={args.grow}", *switches, *(["peft=lora"] if args.lora else [])]
            try:
                proc, record = one_step(os.path.join(ROOT, "launch", "train.py"), overrides, method, length, work,
                                        os.path.join(work, f"{method}_{length}"), {},
                                        timeout=args.deadline - (time.monotonic() - started))
            except subprocess.TimeoutExpired:
                rows.append({"method": method, "length": length, "result": "the deadline"})
                break
            if record is None:
                why = [line for line in proc.stderr.splitlines() if "out of memory" in line.lower()
                       or "cannot fit" in line or "Error" in line]
                rows.append({"method": method, "length": length, "result": (why or ["failed"])[-1][:300]})
                break
            rows.append({"method": method, "length": length, "tokens": tokens, "result": "ok",
                         "peak_gb": record["peak_mem_gb"], "peak_reserved_gb": record.get("peak_mem_reserved_gb"),
                         "step_s": record["step_s"], "tokens_per_s": record["tokens_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
            length *= 2
        lines = [f"# Long context on one device: the longest sequence of {args.grow} ({kind})", "",
                 f"`python benchmarks/long_context.py --grow {args.grow}{' --lora' if args.lora else ''} --start "
                 f"{args.start} --deadline {args.deadline}`: one step per length, every switch on "
                 "(gradient checkpointing, offload, train.mlp_tiles = tokens / hidden size), bf16 on a GPU; "
                 "sftmix: a pair of sequences of that length in one micro-batch.", "",
                 "| method | length | tokens | result | peak allocated GB | reserved GB | step s | tokens/s |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['length']} | {r.get('tokens', '')} | {r['result']} | {r.get('peak_gb', '')} | "
                  f"{r.get('peak_reserved_gb', '')} | {r.get('step_s', '')} | {r.get('tokens_per_s', '')} |"
                  for r in rows]
        os.makedirs(args.results, exist_ok=True)
        with open(stem + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(stem + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


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
        if key == "device_gb":  # the switches' lines lie near zero on a linear scale
            ax.set_yscale("log")
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
    parser.add_argument("--loss-chunk-size", type=int, default=32, help="rows per fused-loss chunk")
    parser.add_argument("--from-json", help="rewrite the report from this results JSON (no runs)")
    parser.add_argument("--grow", help="a model config (conf/model): find its longest sequence instead")
    parser.add_argument("--methods", nargs="+", default=["ntp", "sftmix"])
    parser.add_argument("--start", type=int, default=16384)
    parser.add_argument("--deadline", type=float, default=300, help="--grow: seconds for all its runs")
    parser.add_argument("--lora", action="store_true", help="--grow: with peft=lora")
    args = parser.parse_args()
    if args.grow:
        return grow(args)
    work = tempfile.mkdtemp(prefix="long_context_bench_")
    rows = []
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
    else:
        for variant in args.variants:
            for length in args.lengths:
                rows.append(run(variant, length, work, args.arch, args.loss_chunk_size))
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for variant in args.variants:
        # The two longest lengths: below them what does not grow with length (gradients, buffers) sets the peak.
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["tokens"])[-2:]
        device_at_zero, per_token = fit_line([(r["tokens"], r["device_gb"] * 2**30) for r in mine])
        intercept, slope = fit_line([(r["tokens"], r["peak_gb"]) for r in mine])
        summary[variant] = {"device_bytes_per_token": per_token, "rss_bytes_per_token": slope * 2**30,
                            "longest_under_budget": int((args.budget_gb - intercept) / slope) if slope > 0 else None,
                            "longest_device_under_budget": int((args.budget_gb * 2**30 - device_at_zero) / per_token)
                            if per_token > 0 else None}
    base = summary.get("checkpointed", {}).get("device_bytes_per_token")
    lines = ["# Long context on one device: memory against sequence length (CPU)", "",
             f"`python benchmarks/long_context.py --lengths {' '.join(map(str, args.lengths))} "
             f"--budget-gb {args.budget_gb}`: random Llama {json.dumps(args.arch)} (Llama-3.1-8B's proportions), "
             "fp32, ZeRO-2, ntp, one sequence, sdpa attention, fused-loss chunks of 32 rows, 2 CPU cores. Device "
             "bytes: the peak of the activations the second step's forwards and backwards held (gradients, the "
             "optimizer and the offload's host copies not counted: see the script's docstring); per token: the "
             "slope between the two longest lengths. Peak RSS: resident memory, in which offloaded copies still "
             "count on CPU.", "",
             "| variant | settings | " + " | ".join(f"device GB @{n}" for n in args.lengths) +
             " | device bytes / token | vs checkpointed | " + " | ".join(f"RSS GB @{n}" for n in args.lengths) +
             f" | longest under {args.budget_gb} GB RSS | longest under {args.budget_gb} GB of device bytes |",
             "|---|---|" + "---|" * (2 * len(args.lengths) + 4)]
    for variant in args.variants:
        mine = {r["length"]: r for r in rows if r["variant"] == variant}
        s = summary[variant]
        ratio = f"{s['device_bytes_per_token'] / base:.2f}x" if base else "-"
        lines.append(f"| {variant} | {' '.join(VARIANTS[variant]) or '(none)'} | "
                     + " | ".join(f"{mine[n]['device_gb']:.3f}" for n in args.lengths)
                     + f" | {s['device_bytes_per_token']:.0f} | {ratio} | "
                     + " | ".join(f"{mine[n]['peak_gb']:.2f}" for n in args.lengths)
                     + f" | {s['longest_under_budget']} | {s['longest_device_under_budget']} |")
    for key, what in (("longest_under_budget", "resident memory (CPU: the offloaded copies count)"),
                      ("longest_device_under_budget", "device bytes (what a GPU's allocator would hold)")):
        every, none = (summary.get(v, {}).get(key) for v in ("all", "none"))
        if every and none:
            lines += ["", f"Longest sequence under {args.budget_gb} GB of {what}, extrapolated on the line through "
                      f"the two longest lengths: every switch {every} tokens, none {none} ({every / none:.1f}x)."]
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
