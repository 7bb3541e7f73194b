"""Training throughput, MFU and peak memory: sftmix_ds (ntp, sftmix) against TRL's SFTTrainer.

    python benchmarks/throughput.py                      # CUDA: llama1b_random, llama8b_random at 2048 tokens
    python benchmarks/throughput.py --models tiny --seq 256 --steps 6   # CPU-sized

For each model (random weights, no download) every run is a separate process on
the same synthetic data (example lengths uniform in [seq/4, seq], tokenized once
by sftmix_ds, so both trainers see the same token ids and loss masks):
  - sftmix_ds method=ntp and method=sftmix (--methods) through launch/train.py, at its defaults
    (deepspeed.zero_stage=auto: ZeRO-2 on one process; --zero 3 for ZeRO-3);
  - TRL SFTTrainer (--trl-zero: without DeepSpeed, the plain Trainer's fastest single-device
    setting, or under ZeRO-2/3), fed the examples in sftmix_ds's step order, so the first steps'
    losses must agree. Both use torch's AdamW, fused on CUDA (DeepSpeed 0.19.8's FusedAdam JIT
    build fails on torch 2.11 / CUDA 13: ValueError on the arch entry '...0a'). TRL 1.16 always installs its own
    fused, chunked LM head (no full logits; `add_fused_lm_head`); it runs with padded
    batches and, with --trl-variants padding_free, also padding-free (each micro-batch
    flattened into one row with restarting position ids: its fastest layout here).
Tokens/s count real (non-padding) tokens per device (one process: per device is
the whole), median over the steps after --warmup (every step's time is kept in the JSON
results beside the table); peak memory is what the CUDA
allocator had allocated and reserved. Writes benchmarks/results/throughput_<gpu|cpu>.md,
rewritten after every run, so a run cut short keeps the rows it finished.
"""
import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bf16 peak of the devices we report MFU for (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
MFU_FORMULA = ("model FLOPs/token = 6 * (parameters - input embedding) + 6 * layers * hidden * seq "
               "(causal attention scores and values, forward + backward); "
               "MFU = tokens/s per device * FLOPs/token / peak dense bf16 FLOP/s")


def flops_per_token(arch: dict, n_params: int, seq: int) -> float:
    embedding = arch["vocab_size"] * arch["hidden_size"]
    if arch.get("tie_word_embeddings"):  # the tied matrix is also the LM head's matmul
        embedding = 0
    return 6 * (n_params - embedding) + 6 * arch["num_hidden_layers"] * arch["hidden_size"] * seq


def peak_flops(device: str):
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in device:
            return tflops * 1e12
    return None


def make_data(folder: str, tokenizer_path: str, n: int, seq: int, seed: int = 0) -> str:
    """n chat examples whose token lengths are about uniform in [seq/4, seq], plus a
    confidence file (random half confident) so method=sftmix skips its stage 1."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    rng = random.Random(seed)
    words = [w for w in ("time year people way day man thing woman life child world school state family student "
                         "group country problem hand part place case week company system program question work "
                         "government number night point home water room mother area money story fact month lot "
                         "right study book eye job word business issue side kind head house service friend").split()]
    per_word = len(tok(" ".join(words * 4))["input_ids"]) / (len(words) * 4)
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            target = rng.randint(seq // 4, seq)
            body = max(8, target - 16) / per_word  # about 16 tokens of chat template around the two turns
            prompt = " ".join(rng.choice(words) for _ in range(max(2, int(0.2 * body))))
            answer = " ".join(rng.choice(words) for _ in range(max(2, int(0.8 * body))))
            f.write(json.dumps({"id": f"b{i}", "messages": [{"role": "user", "content": prompt},
                                                            {"role": "assistant", "content": answer}]}) + "\n")
    with open(os.path.join(folder, "confidence.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"b{i}", "confidence": rng.random(),
                                "split": "confident" if i % 2 else "unconfident"}) + "\n")
    return path


def common_overrides(a, model: str, data: str) -> list:
    return [f"model={model}", "data=jsonl", f"data.train_files=[{data}]", "data.eval_files=[]",
            f"data.max_length={a.seq}", "data.overlong=truncate", f"train.max_steps={a.steps}",
            f"train.micro_batch_size={a.micro_batch}", f"train.grad_accum={a.grad_accum}", f"train.lr={a.lr}",
            "train.warmup_ratio=0", "train.save_every=0", "train.eval_every=0", "train.export_final=false",
            f"train.gradient_checkpointing={str(a.gradient_checkpointing).lower()}", "resume=none"]


def run_sftmix_ds(a, model: str, method: str, data: str, folder: str) -> dict:
    out = os.path.join(folder, f"run_{method}")
    extra = [f"method.confidence_file={os.path.join(folder, 'confidence.jsonl')}"] if method == "sftmix" else []
    zero = [] if a.zero == "auto" else [f"deepspeed.zero_stage={a.zero}"]
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"method={method}", f"output_dir={out}",
           *common_overrides(a, model, data), *zero, *extra, *a.overrides]
    _run(cmd)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = records[a.warmup:]
    return {"losses": [r["loss/ntp"] for r in records], "step_times": [r["step_s"] for r in records],
            "tokens_per_s": statistics.median(r["tokens_per_s_per_device"] for r in timed),
            "step_s": statistics.median(r["step_s"] for r in timed),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in records),
            "peak_reserved_gb": max(r.get("peak_mem_reserved_gb", 0.0) for r in records) or None}


def run_scoring(a, model: str, model_path: str, data: str, folder: str) -> dict:
    """SFTMix's stage-1 scoring pass (forward only, launch/score.py) of the model's own folder over `data`:
    the tokens/s per device it logs, engine build and model load not counted."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", "score.py"), f"output_dir={os.path.join(folder, 'score')}",
           f"method.score_checkpoints=[{model_path}]", *common_overrides(a, model, data), *a.overrides]
    found = re.search(r"(\d+) tokens, \d+ forward passes a rank, in ([\d.]+) s: (\d+) tokens/s per device", _run(cmd))
    if not found:
        raise SystemExit(f"{' '.join(cmd[:3])}: no scoring throughput in its log")
    return {"tokens": int(found[1]), "seconds": float(found[2]), "tokens_per_s": float(found[3])}


def run_trl(a, model: str, data: str, folder: str, variant: str) -> dict:
    result = os.path.join(folder, f"trl_{variant}.json")
    _run([sys.executable, os.path.abspath(__file__), "--trl-worker",
          json.dumps({**vars(a), "model": model, "data": data, "result": result, "variant": variant})])
    with open(result) as f:
        return json.load(f)


def _run(cmd) -> str:
    """The command's stderr (where the entry points log); SystemExit with its tail if it failed."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stderr


def trl_worker(spec: dict) -> None:
    """TRL's SFTTrainer on the same tokens, in sftmix_ds's example order, ZeRO-3."""
    import resource

    import torch
    from datasets import Dataset
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftmix_ds.config import CONF_DIR, register_configs, resolve_precision
    from sftmix_ds.data import Batches, load_split
    from sftmix_ds.engine import dist_env
    from sftmix_ds.models import attention_implementation, load_tokenizer, prepare_model

    dist_env()  # a one-process group for DeepSpeed under the HF Trainer
    register_configs()
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("train", overrides=common_overrides(argparse.Namespace(**spec), spec["model"], spec["data"])
                      + ["method=ntp", "output_dir=/tmp/unused"] + spec["overrides"])
    t = cfg.train
    path = prepare_model(cfg.model, cfg.model_cache_dir)
    tokenizer, pad_id = load_tokenizer(path)
    tokenizer.pad_token_id = pad_id
    examples = load_split(cfg.data, tokenizer, cfg.data.train_files)
    batches = Batches(len(examples), t.micro_batch_size, t.grad_accum, 1, 0, t.seed)
    order = [i for s in range(t.max_steps) for mb in batches.micro_batches(0, s) for i in mb if i is not None]
    rows = [examples[i] for i in order]
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in rows], "labels": [e.labels for e in rows]})
    step_tokens = [sum(len(e.input_ids) for e in rows[s * batches.step_size:(s + 1) * batches.step_size])
                   for s in range(t.max_steps)]
    bf16 = resolve_precision(t.precision) == "bf16"
    zero = {"stage": spec["trl_zero"], "reduce_bucket_size": "auto"}
    if spec["trl_zero"] == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    # torch's AdamW (fused on CUDA) under DeepSpeed too: its FusedAdam build fails on torch 2.11 / CUDA 13
    ds_config = {"zero_optimization": zero,
                 "bf16": {"enabled": "auto"}, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "optimizer": {"type": "AdamW", "params": {
                     "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True,
                     **({"fused": True} if torch.cuda.is_available() else {})}}} if spec["trl_zero"] else None
    args = SFTConfig(output_dir=os.path.join(os.path.dirname(spec["result"]), "trl"), max_steps=t.max_steps,
                     per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
                     learning_rate=t.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=t.weight_decay,
                     adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=t.adam_eps,
                     max_grad_norm=t.max_grad_norm, bf16=bf16, logging_steps=1, report_to=[], save_strategy="no",
                     deepspeed=ds_config, gradient_checkpointing=t.gradient_checkpointing,
                     # padding-free without packing enforces no max_length; the examples come truncated
                     max_length=None if spec["variant"] == "padding_free" else cfg.data.max_length,
                     dataset_kwargs={"skip_prepare_dataset": True},
                     use_cpu=not torch.cuda.is_available(), seed=t.seed, dataloader_num_workers=0,
                     padding_free=spec["variant"] == "padding_free")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *_, **__):  # sftmix_ds's order: the same batches, step by step
            return torch.utils.data.SequentialSampler(self.train_dataset)

    timer = StepTimes()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation=attention_implementation(
                                                     path, cfg.model.attn_implementation))
    trainer = InOrder(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = range(spec["warmup"], len(timer.times))
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    with open(spec["result"], "w") as f:
        json.dump({"losses": losses, "step_times": timer.times,
                   "tokens_per_s": statistics.median(step_tokens[s] / timer.times[s] for s in timed),
                   "step_s": statistics.median(timer.times[s] for s in timed), "peak_mem_gb": peak,
                   "peak_reserved_gb": reserved}, f)


def model_size(model: str) -> tuple:
    """(arch dict with vocab_size, parameter count) of a model config, from its saved folder."""
    from transformers import AutoConfig

    from sftmix_ds.config import load_model_config
    from sftmix_ds.models import prepare_model

    cfg = load_model_config(model)
    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.join(os.environ.get("HOME", "/tmp"), ".cache",
                                                                      "sftmix_ds")), "models")
    path = prepare_model(cfg, cache)
    config = AutoConfig.from_pretrained(path)
    arch = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                                            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}
    h, i, L, V = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    kv = h // arch["num_attention_heads"] * arch["num_key_value_heads"]
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h
    n = L * per_layer + h + V * h * (1 if arch["tie_word_embeddings"] else 2)
    return arch, path, n


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--trl-worker":
        return trl_worker(json.loads(sys.argv[2]))
    import torch

    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama1b_random", "llama8b_random"] if gpu else ["tiny"])
    ap.add_argument("--seq", type=int, default=2048 if gpu else 256)
    ap.add_argument("--examples", type=int, default=0, help="0: as many as --steps need")
    ap.add_argument("--steps", type=int, default=12 if gpu else 6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers")
    ap.add_argument("--no-peer", action="store_true", help="skip TRL")
    ap.add_argument("--methods", nargs="+", choices=["ntp", "sftmix"], default=["ntp", "sftmix"],
                    help="sftmix_ds's methods (sftmix needs an even --micro-batch)")
    ap.add_argument("--zero", choices=["auto", "2", "3"], default="auto", help="sftmix_ds's deepspeed.zero_stage")
    ap.add_argument("--trl-zero", type=int, choices=[0, 2, 3], default=0,
                    help="TRL under DeepSpeed ZeRO-2/3, or 0: the plain Trainer (its fastest on one device)")
    ap.add_argument("--trl-variants", nargs="+", choices=["padded", "padding_free"],
                    default=["padded", "padding_free"] if gpu else ["padded"])
    ap.add_argument("--out", help="the results file (default: benchmarks/results/throughput_<gpu|cpu>.md)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for sftmix_ds, e.g. train.packing=true")
    a = ap.parse_args()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    peak = peak_flops(device) if gpu else None
    n_examples = a.examples or a.steps * a.micro_batch * a.grad_accum
    lines = [f"# Training throughput: {device}", "",
             f"`python benchmarks/throughput.py {' '.join(sys.argv[1:])}`: sequence {a.seq} (examples "
             f"{a.seq // 4}..{a.seq} tokens), micro-batch {a.micro_batch}, grad accum {a.grad_accum}, sftmix_ds "
             f"deepspeed.zero_stage={a.zero}, TRL {f'ZeRO-{a.trl_zero}' if a.trl_zero else 'without DeepSpeed'}, "
             f"{'bf16' if gpu else 'fp32'}, 1 process, "
             f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}; "
             f"median over steps {a.warmup + 1}..{a.steps}; torch {torch.__version__}, "
             f"python {platform.python_version()}.",
             "", f"MFU: {MFU_FORMULA}"
             + (f", peak {peak / 1e12:.0f} TFLOP/s." if peak else " (no peak known for this device)."),
             "", "| model | trainer | tokens/s per device | step (s) | MFU | peak allocated / reserved (GiB) "
             "| first losses |",
             "|---|---|---|---|---|---|---|"]
    checks = []
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"throughput_{'gpu' if gpu else 'cpu'}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def write():
        with open(out, "w") as f:
            f.write("\n".join(lines + ["", *checks]) + "\n")

    all_runs = {}
    for model in a.models:
        arch, path, n_params = model_size(model)
        fpt = flops_per_token(arch, n_params, a.seq)
        runs = {}
        with tempfile.TemporaryDirectory(prefix=f"bench-{model}-") as folder:
            data = make_data(folder, path, n_examples, a.seq)
            trainers = {f"sftmix_ds {m}": lambda m=m: run_sftmix_ds(a, model, m, data, folder) for m in a.methods}
            for variant in [] if a.no_peer else a.trl_variants:
                trainers[f"TRL SFTTrainer ({variant})"] = lambda v=variant: run_trl(a, model, data, folder, v)
            for name, run in trainers.items():
                r = runs[name] = run()
                mfu = f"{100 * r['tokens_per_s'] * fpt / peak:.1f}%" if peak else "n/a"
                reserved = f" / {r['peak_reserved_gb']:.2f}" if r.get("peak_reserved_gb") else ""
                lines.append(f"| {model} ({n_params / 1e9:.2f}B) | {name} | {r['tokens_per_s']:.0f} | "
                             f"{r['step_s']:.3f} | {mfu} | {r['peak_mem_gb']:.2f}{reserved} | "
                             f"{', '.join(f'{x:.4f}' for x in r['losses'][:3])} |")
                write()
        all_runs[model] = runs
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(all_runs, f, indent=1)
        ntp, mix = runs.get("sftmix_ds ntp"), runs.get("sftmix_ds sftmix")
        if ntp and mix:
            checks.append(f"- {model}: sftmix / ntp time per token {ntp['tokens_per_s'] / mix['tokens_per_s']:.3f}x "
                          "(bar: <= 1.02x; per token because sftmix's pairing puts other examples in each step)")
        peers = {name: r for name, r in runs.items() if name.startswith("TRL")}
        if peers and ntp:
            best_name, best = max(peers.items(), key=lambda item: item[1]["tokens_per_s"])
            diff = max(abs(x - y) for r in peers.values() for x, y in zip(ntp["losses"][:3], r["losses"][:3]))
            checks.append(f"- {model}: sftmix_ds ntp / {best_name} (TRL's fastest here) tokens/s "
                          f"{ntp['tokens_per_s'] / best['tokens_per_s']:.2f}x (bar: >= 1.3x); first 3 losses differ "
                          f"by at most {diff:.2e}")
        write()
    print("\n".join(lines + ["", *checks]))


if __name__ == "__main__":
    main()
