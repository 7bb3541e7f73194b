"""Padding, packing and length grouping for ntp and sftmix, and what each stage's memory costs.

    python benchmarks/batching.py                   # both parts, SmolLM2-135M on the embedded data
    python benchmarks/batching.py --skip-memory     # the batching table only
    python benchmarks/batching.py --skip-batching   # the memory table only

Batching: for method in (ntp, sftmix) and layout in (padded, grouped, packed), one
launch/train.py run of --steps steps on the embedded arithmetic data (sftmix with a
fixed random confidence split, so stage 1 does not run); tokens/s is real
(non-padding) tokens per second, median over the steps after the first; the
padding share is computed from the same batches the run takes (tokens computed
that are padding). Memory: the README's default SFTMix job (stage 1 and 2) and the
same job with method=ntp, each one process; peak resident memory of the whole
process. Writes benchmarks/results/batching_cpu.md and stage_memory_cpu.md.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"padded": [], "grouped": ["train.group_by_length=true"], "packed": ["train.packing=true"]}
TRAIN_FILE = os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")


# Runs a command and prints the peak resident memory of its process (its own child, so the figure
# is that run's alone: RUSAGE_CHILDREN keeps the largest child's peak).
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run(args: list, out: str) -> float:
    """launch/train.py with args into a fresh `out`; returns the process's peak resident memory (GB)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, os.path.join(ROOT, "launch", "train.py"), *args,
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[4:])} failed:\n{proc.stderr[-3000:]}")
    return int(proc.stdout.rsplit("PEAK_KB", 1)[1]) / 2**20


def padding_share(method: str, layout: str, confidence: str, micro_batch: int, steps: int, max_length: int) -> float:
    """Share of the computed tokens (rows x width of every micro-batch) that are padding."""
    from omegaconf import OmegaConf

    from sftmix_ds.data import load_split
    from sftmix_ds.methods.base import RunOptions
    from sftmix_ds.methods.ntp import NTP
    from sftmix_ds.methods.sftmix import SFTMix
    from sftmix_ds.config import DataConfig
    from sftmix_ds.models import load_tokenizer, prepare_model

    model_path = prepare_model(OmegaConf.create({"name": "smollm2_135m", "source": "smollm2"}),
                               os.path.join(os.path.expanduser("~"), ".cache", "sftmix_ds", "models"))
    tokenizer, pad_id = load_tokenizer(model_path)
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "max_length": max_length, "cache_dir": os.path.join(tempfile.gettempdir(), "sftmix-bench")})
    examples = load_split(data, tokenizer, [TRAIN_FILE])
    train_cfg = OmegaConf.create({"micro_batch_size": micro_batch, "grad_accum": 1, "seed": 42,
                                  "group_by_length": layout == "grouped"})
    pack_width = max_length if layout == "packed" else 0
    if method == "ntp":
        m = NTP(options=RunOptions(pack_width=pack_width))
    else:
        m = SFTMix(options=RunOptions(pack_width=pack_width))
        with open(confidence) as f:
            m.split = {r["id"]: r["split"] for r in map(json.loads, list(f)[1:])}
    batches = m.batches(examples, train_cfg, 1, 0)
    real = computed = 0
    for step in range(min(steps, batches.steps_per_epoch)):
        for mb in batches.micro_batches(0, step):
            b = m.collate([examples[i] if i is not None else None for i in mb], pad_id, key=(0, step))
            real += int(b["attention_mask"].sum())
            computed += b["input_ids"].numel()
    return 1 - real / computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512, help="data.max_length: the packed row width")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_batching"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from sftmix_ds.confidence import confidence_records, write_confidence_file

    os.makedirs(args.out, exist_ok=True)
    with open(TRAIN_FILE) as f:
        ids = [json.loads(line)["id"] for line in f]
    confidence = os.path.join(args.out, "confidence.jsonl")
    rng = random.Random(0)
    write_confidence_file(confidence, confidence_records([{i: rng.uniform(1, 5) for i in ids}]), "benchmark")

    os.makedirs(args.results, exist_ok=True)
    if not args.skip_batching:
        write(os.path.join(args.results, "batching_cpu.md"), batching_table(args, confidence))
    if not args.skip_memory:
        write(os.path.join(args.results, "stage_memory_cpu.md"), memory_table(args))


def write(path: str, lines: list) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def batching_table(args, confidence: str) -> list:
    rows = {}
    for method in ("ntp", "sftmix"):
        for layout, switches in LAYOUTS.items():
            out = os.path.join(args.out, f"{method}-{layout}")
            extra = [f"method.confidence_file={confidence}"] if method == "sftmix" else []
            run(["model=smollm2_135m", f"method={method}", f"train.max_steps={args.steps}",
                 f"train.micro_batch_size={args.micro_batch}", f"data.max_length={args.max_length}",
                 "data.eval_files=[]", "train.export_final=false", *switches, *extra], out)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f]
            rows[method, layout] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
                "padding": padding_share(method, layout, confidence, args.micro_batch, args.steps, args.max_length)}
            print(method, layout, rows[method, layout], flush=True)

    lines = ["# Batching: padding, length grouping and packing (CPU)", "",
             f"`python benchmarks/batching.py {' '.join(sys.argv[1:])}`: SmolLM2-135M-Instruct, the embedded "
             f"arithmetic data, {args.steps} steps of micro-batch {args.micro_batch}, 1 process, ZeRO-3, fp32, "
             f"{os.cpu_count()} CPU cores; packed rows of data.max_length={args.max_length} tokens. tokens/s counts "
             "real tokens (median over steps 2..N); padding = share of computed tokens that are padding.", "",
             "| method | layout | tokens/s | padding | vs padded |", "|---|---|---|---|---|"]
    for (method, layout), r in rows.items():
        speedup = r["tokens_per_s"] / rows[method, "padded"]["tokens_per_s"]
        lines.append(f"| {method} | {layout} | {r['tokens_per_s']:.0f} | {100 * r['padding']:.1f}% | {speedup:.2f}x |")
    packed_ratio = rows["ntp", "packed"]["tokens_per_s"] / rows["sftmix", "packed"]["tokens_per_s"]
    lines += ["", f"sftmix / ntp time per token, both packed: {packed_ratio:.3f}x (goal: at most 1.05x). "
              "Packing vs padded tokens/s: "
              f"ntp {rows['ntp', 'packed']['tokens_per_s'] / rows['ntp', 'padded']['tokens_per_s']:.2f}x, "
              f"sftmix {rows['sftmix', 'packed']['tokens_per_s'] / rows['sftmix', 'padded']['tokens_per_s']:.2f}x "
              "(goal: at least 1.3x)."]

    return lines


def memory_table(args) -> list:
    peaks = {}
    for method in ("ntp", "sftmix"):
        peaks[method] = run([f"method={method}"], os.path.join(args.out, f"default-{method}"))
        print(method, "peak RSS GB", peaks[method], flush=True)
    return ["# Peak memory of the README's default job (CPU)", "",
            f"`python benchmarks/batching.py --skip-batching`: the default job (`python launch/train.py`: "
            f"SmolLM2-135M, 128 examples, 1 epoch, ZeRO-3, 1 process, {os.cpu_count()} CPU cores) with "
            "`method=ntp` and with the default `method=sftmix` (stage 1: a reference run and 4 scoring passes, "
            "then stage 2): peak resident memory of the whole process.", "",
            "| job | peak RSS (GB) |", "|---|---|",
            f"| ntp | {peaks['ntp']:.2f} |", f"| sftmix (stage 1 + stage 2) | {peaks['sftmix']:.2f} |", "",
            f"sftmix / ntp: {peaks['sftmix'] / peaks['ntp']:.2f}x (goal: at most 1.1x; before stages released "
            "their engines: 11.9 GB against 7.2 GB, 1.65x)."]


if __name__ == "__main__":
    main()
