"""Plain-SFT training throughput and peak memory, through the real entry point.

    python benchmarks/throughput.py [--models tiny smollm2_135m] [--steps 6] [--nproc 0]

Runs launch/train.py for each model on the embedded dataset, skips the first
(warm-up) step, and reports response+prompt tokens/s (all ranks together) and
peak memory per rank. Writes benchmarks/results/throughput_<device>.md.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(model: str, steps: int, nproc: int, extra: list) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench-{model}-")
    script = os.path.join(ROOT, "launch", "train.py")
    overrides = [f"model={model}", "method=ntp", f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0",
                 f"output_dir={out}", "data.eval_files=[]", *extra]
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc)] if nproc \
        else [sys.executable]
    subprocess.run(launcher + [script] + overrides, check=True, cwd=ROOT, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][1:]
    return {"model": model, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in records), "steps": len(records)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2_135m"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=0, help="0: one plain process; N: deepspeed launcher, N ranks")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. deepspeed=zero2")
    args = ap.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = [run(m, args.steps, args.nproc, args.overrides) for m in args.models]
    lines = [f"# Plain SFT throughput: {device}", "",
             f"`python benchmarks/throughput.py --models {' '.join(args.models)} --steps {args.steps} "
             f"--nproc {args.nproc} {' '.join(args.overrides)}`; embedded arith data, defaults of conf/train.yaml "
             f"(ZeRO-3, micro-batch 8), median over steps 2..{args.steps}; python {platform.python_version()}, "
             f"torch {torch.__version__}.", "",
             "| model | tokens/s (all ranks) | peak memory per rank (GiB) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", f"throughput_{tag}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
