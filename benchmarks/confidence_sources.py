"""What SFTMix's confidence costs: the whole job (stage 1 included) per confidence source,
against a plain NTP run of the same epochs, on the same data, in one run on one machine.

    python benchmarks/confidence_sources.py                    # SmolLM2-135M, 64 examples, 2 epochs
    python benchmarks/confidence_sources.py --train-size 128 --epochs 3
    python benchmarks/confidence_sources.py --toy              # tiny random model, for the tests

Each job goes through launch/train.py in a fresh output folder. Wall time is the job's, from
launch to exit (model loading, stage 1, training, export). Tokens are counted from the runs'
own metrics (trained: forward and backward; padding not counted) and, for the scoring passes
(forward only), as C times one epoch's tokens. Writes benchmarks/results/confidence_sources_<device>.md.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {"ntp": ["method=ntp"],
        "sftmix online": ["method=sftmix", "method.confidence_source=online"],
        "sftmix reference": ["method=sftmix", "method.confidence_source=reference"],
        "sftmix random": ["method=sftmix", "method.confidence_source=random"]}


def trained_tokens(run_dir: str) -> int:
    """All tokens of every training step of the runs under run_dir (the reference run's too)."""
    total = 0
    for path in glob.glob(os.path.join(run_dir, "**", "metrics.jsonl"), recursive=True):
        with open(path) as f:
            total += sum(round(r["tokens_per_s"] * r["step_s"]) for r in map(json.loads, f) if "step_s" in r)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "confidence_sources"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--toy", action="store_true", help="tiny random model, 16 examples")
    args = ap.parse_args()
    if args.toy:
        args.model, args.train_size, args.micro_batch, args.checkpoints = "tiny", 16, 4, 2
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    data = os.path.join(args.out, "train.jsonl")
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        lines = f.readlines()
    with open(data, "w") as f:
        f.writelines(lines[:args.train_size])
    common = [f"model={args.model}", "data=jsonl", f"data.train_files=[{data}]", "data.format=alpaca",
              "data.max_length=256", f"train.epochs={args.epochs}", f"train.micro_batch_size={args.micro_batch}",
              "train.eval_every=0", "train.log_every=1", "logger=none"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "offline"}
    rows = {}
    for name, overrides in JOBS.items():
        run_dir = os.path.join(args.out, name.replace(" ", "_"))
        method = overrides + ([f"method.checkpoints={args.checkpoints}"] if "sftmix" in name else [])
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *common, *method,
                               f"output_dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = {"wall_s": time.perf_counter() - started, "trained": trained_tokens(run_dir)}
        print(f"{name}: {rows[name]['wall_s']:.0f} s", file=sys.stderr)

    scored = args.checkpoints * rows["ntp"]["trained"] // args.epochs  # every example's tokens, C times
    rows["sftmix online"]["scored"] = rows["sftmix reference"]["scored"] = scored
    base = rows["ntp"]["wall_s"]
    device = "gpu" if __import__("torch").cuda.is_available() else "cpu"
    out = [f"# SFTMix confidence sources: cost of the whole job ({device})", "",
           f"`python benchmarks/confidence_sources.py --model {args.model} --train-size {args.train_size} "
           f"--epochs {args.epochs} --checkpoints {args.checkpoints} --micro-batch {args.micro_batch}`", "",
           f"{args.train_size} arithmetic examples, {args.epochs} epochs, micro-batch {args.micro_batch}, one process, "
           f"ZeRO-3, C={args.checkpoints} scoring points; each job from launch to exit in a fresh folder "
           f"(OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {os.cpu_count()} cores).", "",
           "| job | wall s | vs ntp | tokens trained | tokens scored |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['wall_s']:.0f} | {r['wall_s'] / base:.2f}x | {r['trained']} | "
                   f"{r.get('scored', 0)} |")
    out += ["", "online: no reference run; its first epoch is the NTP epoch, scored at C points in place. "
            "reference: the paper's one-epoch reference run and C scoring passes of exported checkpoints, "
            "then all epochs of SFTMix. random: no stage-1 compute (the ablation)."]
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"confidence_sources_{device}.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
