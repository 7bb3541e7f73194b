"""LoRA against full fine-tuning, in one run on one machine.

    python benchmarks/lora.py                  # SmolLM2-135M, ntp and sftmix, 8 steps each
    python benchmarks/lora.py --toy            # tiny random model, for the tests

1. Whole training jobs (launch/train.py, one process, ZeRO-3): tokens/s (median over the
   steps after the first) and peak memory (the process's resident peak on CPU, the device's
   on GPU) for ntp and sftmix (confidence_source=random, so the job is stage 2 alone), full
   against peft=lora.
2. The fused loss's backward at the model's head shape with the head trainable (full) and
   frozen (LoRA: no dW matmul, no [V, d] gradient buffer).
Writes benchmarks/results/lora_<device>.md.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job(model: str, method: str, lora: bool, steps: int, micro_batch: int, out: str) -> dict:
    overrides = [f"model={model}", f"method={method}", f"train.max_steps={steps}",
                 f"train.micro_batch_size={micro_batch}", "train.eval_every=0", "train.export_final=false",
                 "logger=none", f"output_dir={out}"]
    overrides += ["method.confidence_source=random"] if method == "sftmix" else []
    overrides += ["peft=lora"] if lora else []
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:] or records),
            "peak_gb": max(r["peak_mem_gb"] for r in records)}


def head_backward(vocab: int, dim: int, rows: int, frozen: bool, device: str, repeats: int = 3) -> tuple:
    """(seconds, peak bytes allocated on CUDA or None) of the fused loss's forward + backward."""
    from sftmix_ds.losses import fused_sftmix_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.02).to(device).requires_grad_(not frozen)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        ntp, _ = fused_sftmix_loss(hidden, weight, labels, empty, empty, empty.float())
        ntp.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return min(times), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2048, help="response rows for the head benchmark")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "lora_bench"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--toy", action="store_true")
    args = ap.parse_args()
    if args.toy:
        args.model, args.steps, args.micro_batch, args.rows = "tiny", 3, 4, 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for method in ("ntp", "sftmix"):
        full = job(args.model, method, False, args.steps, args.micro_batch, os.path.join(args.out, f"{method}_full"))
        lora = job(args.model, method, True, args.steps, args.micro_batch, os.path.join(args.out, f"{method}_lora"))
        rows.append((method, full, lora))
        print(method, full, lora, file=sys.stderr)

    from transformers import AutoConfig

    from sftmix_ds.config import load_model_config
    from sftmix_ds.models import prepare_model

    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    config = AutoConfig.from_pretrained(prepare_model(load_model_config(args.model), cache))
    trainable_s, trainable_peak = head_backward(config.vocab_size, config.hidden_size, args.rows, False, device)
    frozen_s, frozen_peak = head_backward(config.vocab_size, config.hidden_size, args.rows, True, device)

    out = [f"# LoRA against full fine-tuning ({device})", "",
           f"`python benchmarks/lora.py --model {args.model} --steps {args.steps} --micro-batch {args.micro_batch} "
           f"--rows {args.rows}`", "",
           f"## Training jobs: {args.model}, {args.steps} steps, micro-batch {args.micro_batch}, one process, ZeRO-3, "
           "peft=lora with r=8 on every decoder linear layer", "",
           "| method | full tokens/s | LoRA tokens/s | LoRA / full | full peak GB | LoRA peak GB | LoRA / full |",
           "|---|---|---|---|---|---|---|"]
    for method, full, lora in rows:
        out.append(f"| {method} | {full['tokens_per_s']:.0f} | {lora['tokens_per_s']:.0f} | "
                   f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}x | {full['peak_gb']:.2f} | "
                   f"{lora['peak_gb']:.2f} | "
                   f"{lora['peak_gb'] / full['peak_gb']:.2f}x |")
    out += ["", "Peak memory on CPU is the process's resident peak (model, optimizer, activations and the "
            "Python runtime together); on GPU the device's allocated peak.", "",
            f"## Fused loss forward + backward at the head's shape (V={config.vocab_size}, d={config.hidden_size}, "
            f"{args.rows} rows)", "",
            "| head | seconds | peak allocated |", "|---|---|---|",
            f"| trainable (full fine-tuning) | {trainable_s:.3f} | "
            f"{'n/a on CPU' if trainable_peak is None else f'{trainable_peak / 2**20:.0f} MiB'} |",
            f"| frozen (LoRA: dW skipped) | {frozen_s:.3f} | "
            f"{'n/a on CPU' if frozen_peak is None else f'{frozen_peak / 2**20:.0f} MiB'} |",
            "", f"frozen / trainable time: {frozen_s / trainable_s:.2f}x; the skipped dW buffer alone is "
            f"{config.vocab_size * config.hidden_size * 4 / 2**20:.0f} MiB in fp32."]
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"lora_{device}.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
