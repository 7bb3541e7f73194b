"""A GPU session: what matters most first, inside one deadline, results kept as they come.

On the lent offline CUDA host (no network; torch, triton and an older transformers installed),
from the project root, with the wheels `bash benchmarks/make_wheelhouse.sh .whl` built here:

    python3 benchmarks/gpu_session.py --out "$OUT" --deadline 540

Installs .whl/ into a private folder (no network), then runs each stage as its own process with
its own timeout, all under the global deadline (a stage that cannot get 20 s is skipped), and
rewrites OUT/summary.md after every stage, so a session cut short keeps what it finished:
  1. environment: GPU, driver, versions;
  2. GPU tests: the loss tests (Triton kernels compiled on the GPU against the reference, the
     fp32 weight-gradient accumulation, CUDA chunk sizes) and the speed switches' equality tests;
  3. speed switches on llama1b_random at 2,048 tokens, micro-batch 4 (benchmarks/levers.py): TRL's
     SFTTrainer without DeepSpeed and under ZeRO-3, sftmix_ds ntp at its defaults and with each switch
     set back (ZeRO-3, the padding mask, no width rounding) or changed (ZeRO-0, packing, compile, LoRA),
     sftmix, stage-1 scoring (forward only: its tokens/s against training's) and packing with the
     varlen kernel; every step's time, tokens/s and MFU (6 x (parameters - input embedding) + 6 x layers x
     hidden x sequence FLOPs per token against 989 TFLOP/s, H100/H200 dense bf16), in order of value,
     each run started only while the stage's deadline leaves a minute;
  4. memory: ntp on llama1b_random at micro-batch 16 x 2,048 tokens with the default settings (peak
     allocated and reserved);
  5. S3FT generation on llama1b_random (benchmarks/s3ft.py --generation-only): the stage's batched,
     length-sorted generation against plain `generate` one prompt at a time, new tokens/s;
  6. kernel checks at SmolLM2's and Llama-3's head shapes (benchmarks/sftmix.py --full), if time is left;
  7. llama8b_random (Llama-3.1-8B's shape, random) trained on the one device with the README's one-GPU
     recipe (recipe=sftmix_llama3_8b_lora: LoRA, micro-batch 4 x accumulation 8, gradient
     checkpointing, 2,048 tokens), SFTMix: memory and tokens/s;
  8. long context on one device (benchmarks/long_context.py --grow): the longest ntp and sftmix sequence
     of llama1b_random, then of llama8b_random with LoRA, every long-context switch on, one step at
     doubling lengths from 16K tokens with peak memory at each, until a step fails or the stage's time
     is up (a session with --deadline 540 reaches them only when the stages before finish early).
Models are random-init (llama1b_random) with the tokenizer that ships in the repo: nothing to download.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
STAGES = [  # (name, command, timeout s, result files it writes under the repo)
    ("environment", [PY, "-c", "import torch, triton, transformers, deepspeed, trl, platform; "
                     "print('python', platform.python_version()); print('torch', torch.__version__, 'cuda', "
                     "torch.version.cuda); print('triton', triton.__version__); print('transformers', "
                     "transformers.__version__); print('deepspeed', deepspeed.__version__); print('trl', "
                     "trl.__version__); print('gpu', torch.cuda.get_device_name(), "
                     "torch.cuda.get_device_properties(0).total_memory / 2**30, 'GiB')"], 60, []),
    ("nvidia-smi", ["nvidia-smi"], 30, []),
    ("gpu tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_losses.py",
                   "tests/test_heads.py", "tests/test_speed.py"], 120, []),
    ("speed switches llama1b_random", [PY, "benchmarks/levers.py", "--model", "llama1b_random", "--seq", "2048",
                                       "--steps", "8", "--warmup", "2", "--micro-batch", "4", "--deadline", "380"], 400,
     ["benchmarks/results/levers_gpu.md", "benchmarks/results/levers_gpu.json"]),
    ("memory llama1b_random micro-batch 16", [PY, "benchmarks/throughput.py", "--models", "llama1b_random", "--seq",
                                              "2048", "--steps", "4", "--warmup", "1", "--micro-batch", "16",
                                              "--methods", "ntp", "--no-peer", "--out",
                                              "benchmarks/results/memory_gpu.md"], 150,
     ["benchmarks/results/memory_gpu.md", "benchmarks/results/memory_gpu.json"]),
    ("generation llama1b_random", [PY, "benchmarks/s3ft.py", "--model", "llama1b_random", "--generation-only",
                                   "--prompts", "16", "--max-new-tokens", "64", "--batch-size", "16"], 120,
     ["benchmarks/results/s3ft_gpu_llama1b_random.md"]),
    ("kernel checks (V=49152, 128256)", [PY, "benchmarks/sftmix.py", "--full", "--model", "tiny"], 150,
     ["benchmarks/results/sftmix_gpu.md"]),
    ("llama8b_random one GPU, recipe=sftmix_llama3_8b_lora", [
        PY, "benchmarks/throughput.py", "--models", "llama8b_random", "--seq", "2048", "--steps", "3", "--warmup", "1",
        "--micro-batch", "4", "--grad-accum", "8", "--gradient-checkpointing", "--methods", "sftmix", "--no-peer",
        "--out", "benchmarks/results/llama8b_lora_one_gpu_gpu.md", "recipe=sftmix_llama3_8b_lora"], 400,
     ["benchmarks/results/llama8b_lora_one_gpu_gpu.md", "benchmarks/results/llama8b_lora_one_gpu_gpu.json"]),
    ("long context llama1b_random", [PY, "benchmarks/long_context.py", "--grow", "llama1b_random", "--deadline",
                                     "240"], 250, ["benchmarks/results/long_context_gpu_llama1b_random.md"]),
    ("long context llama8b_random LoRA", [PY, "benchmarks/long_context.py", "--grow", "llama8b_random", "--lora",
                                          "--start", "65536", "--deadline", "400"], 410,
     ["benchmarks/results/long_context_gpu_llama8b_random.md"]),
]


def install_wheels(out: str) -> dict:
    """The project's missing dependencies from .whl/ into /tmp/site; returns the environment to run with."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels:
        proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", "/tmp/site",
                               *wheels], capture_output=True, text=True)
        with open(os.path.join(out, "install.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
        env["PYTHONPATH"] = os.pathsep.join(["/tmp/site", ROOT])
    else:
        env["PYTHONPATH"] = ROOT
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results", "gpu"))
    ap.add_argument("--deadline", type=float, default=540, help="seconds for the whole session")
    ap.add_argument("--only", nargs="+", help="run only the stages whose names contain one of these (the environment "
                                              "always runs), e.g. a second call for what the first did not reach")
    a = ap.parse_args()
    started = time.monotonic()
    os.makedirs(a.out, exist_ok=True)
    env = install_wheels(a.out)
    rows = []

    def write_summary():
        with open(os.path.join(a.out, "summary.md"), "w") as f:
            f.write("# GPU session\n\n| stage | result | wall (s) |\n|---|---|---|\n")
            f.writelines(f"| {name} | {result} | {wall:.0f} |\n" for name, result, wall in rows)

    stages = [s for s in STAGES if not a.only or s[0] == "environment" or any(o in s[0] for o in a.only)]
    for name, cmd, timeout, results in stages:
        left = a.deadline - (time.monotonic() - started) - 10
        if left < 20:
            rows.append((name, "skipped: the deadline", 0.0))
            write_summary()
            continue
        stage_started = time.monotonic()
        log = os.path.join(a.out, name.split(" (")[0].replace(" ", "_") + ".log")
        with open(log, "w") as f:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=min(timeout, left))
                result = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                result = f"timed out after {min(timeout, left):.0f} s"
            except OSError as e:  # the command itself is missing
                result = f"could not start: {e}"
        for path in results:
            if os.path.exists(os.path.join(ROOT, path)):
                shutil.copy(os.path.join(ROOT, path), a.out)
        rows.append((name, result, time.monotonic() - stage_started))
        write_summary()
    return 0 if all(result == "ok" for _, result, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
