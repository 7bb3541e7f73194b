"""ntp vs sftmix vs s3ft on the same data, budget and seeds; the base model as a row.

    python benchmarks/compare_methods.py                       # SmolLM2-135M, 3 seeds, reduced size
    python benchmarks/compare_methods.py --train-size 128 --epochs 2 --eval-size 32
    python benchmarks/compare_methods.py --toy                 # tiny random model, for the tests

Every run goes through launch/train.py (eval=arith at the end): held-out arithmetic
accuracy (numeric judge), held-out perplexity, and capitals accuracy (a general-ability
set none of the runs trains on). Writes benchmarks/results/compare_methods.md (mean and
std per method and metric) and two PNG plots (training curves, accuracy bars).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ntp", "sftmix", "s3ft")
METRICS = (("in-domain accuracy", lambda r: r["tasks"]["arith"]["accuracy"]),
           ("held-out perplexity", lambda r: r["perplexity"]["perplexity"]),
           ("general accuracy (capitals)", lambda r: r["general"]["capitals"]["accuracy"]))


def run(script: str, overrides: list) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{script} {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "compare_methods"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--toy", action="store_true", help="tiny random model, 16 examples, 1 seed, 2 new tokens")
    args = ap.parse_args()
    if args.toy:
        args.model, args.seeds, args.train_size, args.eval_size = "tiny", 1, 16, 4
    new_tokens = 2 if args.toy else 48
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "train.jsonl")
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        lines = f.readlines()
    half = args.train_size // 2  # both tasks: arithmetic first, leg counting second in the file
    with open(data, "w") as f:
        f.writelines(lines[:half] + lines[64:64 + args.train_size - half])
    evals = [f"eval=arith", f"eval.tasks.0.limit={args.eval_size}", f"eval.general.0.limit={args.eval_size}",
             f"eval.max_new_tokens={new_tokens}"]
    common = [f"model={args.model}", "data=jsonl", "data.judge=numeric", f"data.train_files=[{data}]",
              f"data.eval_files=[{os.path.join(ROOT, 'sftmix_ds', 'builtin_data', 'arith_eval.jsonl')}]",
              f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.eval_every=2", *evals]
    if args.toy:  # 16 examples in steps of 4: enough steps for SFTMix's 4 reference checkpoints
        common.append("train.micro_batch_size=4")

    base_dir = os.path.join(args.out, "base")
    if not os.path.exists(os.path.join(base_dir, "eval", "eval.json")):
        run("eval.py", [f"model={args.model}", f"output_dir={base_dir}", *evals[1:]])
    results = {"base": [json.load(open(os.path.join(base_dir, "eval", "eval.json")))]}
    curves = {}
    targets = os.path.join(args.out, "s3ft_targets.jsonl")  # greedy generation: the same for every seed
    for method in METHODS:
        results[method], curves[method] = [], []
        for seed in range(args.seeds):
            out = os.path.join(args.out, f"{method}-seed{seed}")
            extra = [f"method.targets_file={targets}"] if method == "s3ft" and os.path.exists(targets) else []
            if method == "s3ft":
                extra += [f"method.max_new_tokens={new_tokens * 2}"]
            run("train.py", common + [f"method={method}", f"train.seed={seed}", f"output_dir={out}", *extra])
            if method == "s3ft" and not os.path.exists(targets):
                os.link(os.path.join(out, "s3ft", "targets.jsonl"), targets)
            results[method].append(json.load(open(os.path.join(out, "eval", "eval.json"))))
            with open(os.path.join(out, "metrics.jsonl")) as f:
                curves[method].append([json.loads(line) for line in f])

    mix = json.load(open(os.path.join(args.out, "s3ft-seed0", "s3ft", "mix.json")))["share"]
    lines = [f"# Method comparison: {args.model}", "",
             f"`python benchmarks/compare_methods.py {' '.join(sys.argv[1:])}`: {args.train_size} training "
             f"examples (arithmetic + leg counting), {args.epochs} epoch(s), lr {args.lr}, {args.seeds} seed(s); "
             f"evaluation on {args.eval_size} held-out arithmetic and {args.eval_size} capitals questions "
             f"(greedy, {new_tokens} new tokens) and the 32 held-out examples for perplexity. "
             f"S3FT target mix: own {100 * mix['own']:.1f}%, paraphrase {100 * mix['paraphrase']:.1f}%, "
             f"gold {100 * mix['gold']:.1f}%.", "",
             "| method | " + " | ".join(name for name, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for method, runs in results.items():
        cells = []
        for _, get in METRICS:
            m, s = mean_std([get(r) for r in runs])
            cells.append(f"{m:.3f} ± {s:.3f}" if len(runs) > 1 else f"{m:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    os.makedirs(args.results, exist_ok=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.results, "compare_methods.md"), "w") as f:
        f.write(text)
    print(text)
    plot(curves, results, args.results)


def plot(curves, results, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, runs in curves.items():
        for i, records in enumerate(runs):
            ax.plot([r["step"] for r in records], [r.get("loss/ntp", r["loss"]) for r in records], alpha=0.8,
                    color={"ntp": "#4878a8", "sftmix": "#c44e52", "s3ft": "#55a868"}[method],
                    label=method if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training NTP loss (response tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "compare_methods_curves.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, (name, get) in zip(axes, (METRICS[0], METRICS[2])):
        names = list(results)
        stats = [mean_std([get(r) for r in results[m]]) for m in names]
        ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#4878a8")
        ax.set_title(name)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "compare_methods_accuracy.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
