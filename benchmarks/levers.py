"""What each speed switch does, sftmix_ds against TRL's SFTTrainer on the same tokens in the same order.

    python benchmarks/levers.py        # CPU: the host-overhead proxy (tiny_deep: 16 layers, d=64, 4 x 128 tokens)
    python benchmarks/levers.py --model llama1b_random --seq 2048 --steps 8 --deadline 400   # one GPU

On CPU the model is many narrow layers whose compute is small, so a step's time is mostly what the
trainer does around the math (per-module hooks, Python, host reads). A CPU never waits for itself, so
this proxy does not see where a GPU's host waits for the device; the same script on a GPU does (it is
a stage of benchmarks/gpu_session.py). Every run is its own process (benchmarks/throughput.py's
runners), in order of value, each started only while --deadline leaves a minute for it: TRL without
DeepSpeed (the plain Trainer, its fastest on one device), sftmix_ds at its defaults and with one
switch at a time set back to its old value (or, for compile and LoRA, turned on), SFTMix, SFTMix's
stage-1 scoring pass (forward only, over 256 examples of the same lengths: its tokens/s against
training's), and TRL under ZeRO-3. Every step's time is kept (the first step, and any step slower
than 1.5x the median, show).
Writes benchmarks/results/levers_<cpu|gpu>.md (and .json), rewritten after every run.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import throughput  # noqa: E402

SCORING = "sftmix_ds stage-1 scoring (forward only, launch/score.py)"
SCORED_EXAMPLES = 256  # a scoring pass over this many examples of the same lengths: seconds of work, not a few batches
# In order of value: (name, "trl" and its ZeRO stage (0: no DeepSpeed), or a sftmix_ds method and overrides).
RUNS = [("TRL SFTTrainer, no DeepSpeed", "trl", 0),
        ("sftmix_ds ntp (defaults: ZeRO-2 on one rank, no padding mask)", "ntp", []),
        ("sftmix_ds ntp, deepspeed.zero_stage=3", "ntp", ["deepspeed.zero_stage=3"]),
        ("sftmix_ds ntp, deepspeed.zero_stage=0", "ntp", ["deepspeed.zero_stage=0"]),
        ("sftmix_ds ntp, train.padding_mask=true", "ntp", ["train.padding_mask=true"]),
        ("sftmix_ds sftmix (defaults)", "sftmix", []),
        (SCORING, "score", []),
        ("sftmix_ds ntp, train.packing=true model.attn_implementation=varlen", "ntp",
         ["train.packing=true", "model.attn_implementation=varlen"]),
        ("sftmix_ds ntp, train.compile=true", "ntp", ["train.compile=true"]),
        ("sftmix_ds ntp, deepspeed.zero_stage=3 deepspeed.gather_per_block=false", "ntp",
         ["deepspeed.zero_stage=3", "deepspeed.gather_per_block=false"]),
        ("sftmix_ds ntp, train.packing=true", "ntp", ["train.packing=true"]),
        ("sftmix_ds ntp, train.pad_to_multiple_of=1", "ntp", ["train.pad_to_multiple_of=1"]),
        ("sftmix_ds ntp, peft=lora", "ntp", ["peft=lora"]),
        ("TRL SFTTrainer, ZeRO-3", "trl", 3)]
RUN_S = 60  # a run is started only with this much of --deadline left


def main():
    import torch

    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny_deep")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=3600, help="seconds for all the runs")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  f"levers_{'gpu' if gpu else 'cpu'}.md"))
    args = ap.parse_args()
    started = time.monotonic()
    base = dict(seq=args.seq, steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch, grad_accum=1,
                lr=1e-5, gradient_checkpointing=False, zero="auto", trl_zero=0, overrides=[])
    arch, path, n_params = throughput.model_size(args.model)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    peak = throughput.peak_flops(device) if gpu else None
    flops = throughput.flops_per_token(arch, n_params, args.seq)
    lines = [f"# Speed switches: {device}", "",
             f"`python benchmarks/levers.py {' '.join(sys.argv[1:])}`: {args.model} "
             f"({arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}, vocabulary {arch['vocab_size']}, "
             f"{n_params / 1e6:.1f}M parameters), micro-batch {args.micro_batch}, sequence {args.seq} (examples "
             f"{args.seq // 4}..{args.seq} tokens), {'bf16' if gpu else 'fp32'}, 1 process; median step over steps "
             f"{args.warmup + 1}..{args.steps}; tokens/s count real tokens; torch {torch.__version__}, "
             f"python {platform.python_version()}.", "", f"MFU: {throughput.MFU_FORMULA}.", "",
             "| trainer | step (s) | / TRL's fastest | tokens/s | MFU | first losses | every step (s) |",
             "|---|---|---|---|---|---|---|"]
    results = {}

    def write():
        best = min((r["step_s"] for name, r in results.items() if name.startswith("TRL") and "step_s" in r),
                   default=None)
        rows = []
        for name, r in results.items():
            if "failed" in r:
                rows.append(f"| {name} | {r['failed']} | | | | | |")
                continue
            if name == SCORING:
                rows.append(f"| {name} | | | {r['tokens_per_s']:.0f} | | | {r['tokens']} tokens in "
                            f"{r['seconds']:.2f} s |")
                continue
            ratio = f"{r['step_s'] / best:.2f}x" if best else "n/a"
            mfu = f"{100 * r['tokens_per_s'] * flops / peak:.1f}%" if peak else "n/a"
            times = ", ".join(f"{t:.3f}" for t in r["step_times"])
            losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
            rows.append(f"| {name} | {r['step_s']:.4f} | {ratio} | {r['tokens_per_s']:.0f} | {mfu} | {losses} | "
                        f"{times} |")
        with open(args.out, "w") as f:
            f.write("\n".join(lines + rows + [""] + checks(best)) + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)

    def checks(best) -> list:
        out = []
        ntp, mix = results.get(RUNS[1][0], {}), results.get("sftmix_ds sftmix (defaults)", {})
        if "step_s" in ntp:
            times, median = ntp["step_times"], ntp["step_s"]
            out.append(f"- sftmix_ds ntp at its defaults: first step {times[0]:.2f} s, slowest later step "
                       f"{max(times[1:]) / median:.2f}x the median (bars: 3 s after the engine is built; 1.5x)")
            if best:
                out.append(f"- its step against TRL's fastest: {ntp['step_s'] / best:.2f}x (bar: <= 0.5x)")
            if "step_s" in mix:
                out.append(f"- sftmix / ntp time per token {ntp['tokens_per_s'] / mix['tokens_per_s']:.3f}x "
                           "(bar: <= 1.02x)")
            if "tokens_per_s" in results.get(SCORING, {}):
                out.append(f"- stage-1 scoring tokens/s / ntp training tokens/s: "
                           f"{results[SCORING]['tokens_per_s'] / ntp['tokens_per_s']:.2f}x (bar: >= 2.5x)")
        return out

    with tempfile.TemporaryDirectory(prefix="levers-") as folder:
        data = throughput.make_data(folder, path, args.steps * args.micro_batch, args.seq)
        os.makedirs(os.path.join(folder, "scoring"))
        scoring_data = throughput.make_data(os.path.join(folder, "scoring"), path, SCORED_EXAMPLES, args.seq)
        for name, trainer, setting in RUNS:
            if args.deadline - (time.monotonic() - started) < RUN_S:
                results[name] = {"failed": "skipped: the deadline"}
                continue
            try:
                if trainer == "score":
                    r = throughput.run_scoring(argparse.Namespace(**base), args.model, path, scoring_data, folder)
                elif trainer == "trl":
                    r = throughput.run_trl(argparse.Namespace(**{**base, "trl_zero": setting}), args.model, data,
                                           folder, "padded")
                else:
                    r = throughput.run_sftmix_ds(argparse.Namespace(**{**base, "overrides": setting}), args.model,
                                                 trainer, data, folder)
            except SystemExit as e:  # a run that failed: its stderr's tail, and the next run
                results[name] = {"failed": "failed: see the .json", "error": str(e)[-2000:]}
                write()
                continue
            if "step_times" in r:  # a training run (scoring has tokens/s only)
                r["step_s"] = statistics.median(r["step_times"][args.warmup:])
            results[name] = r
            write()
    print(open(args.out).read())


if __name__ == "__main__":
    main()
