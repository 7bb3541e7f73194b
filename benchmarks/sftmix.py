"""SFTMix costs, each pair measured in one run on one machine:

  (a) fused SFTMix loss vs the naive full-logits reference: forward+backward time and peak memory
  (b) one SFTMix training step vs one plain-SFT step on the same batch (DeepSpeed ZeRO-3 engine)
  (c) stage-1 scoring throughput vs training throughput, same model and data (tokens/s)
  (d) scoring-loss peak memory vs a naive full-logits scoring pass

    python benchmarks/sftmix.py                  # CPU: reduced sizes, smollm2_135m for (b), (c)
    python benchmarks/sftmix.py --full           # GPU: M=16384, d=2048, bf16; triton and torch backends

Each loss measurement runs in a fresh subprocess: peak memory is the rise of
the process's high-water mark (CUDA: max_memory_allocated) over what the
inputs already took, so both sides are charged for everything they allocate,
gradients included. Writes benchmarks/results/sftmix_<cpu|gpu>.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def measure_loss(kind: str, M: int, d: int, V: int, dtype: str) -> dict:
    """Run one loss variant twice; memory from the first run, time from the second."""
    import torch

    from sftmix_ds.inference import token_nll
    from sftmix_ds.losses import Head, fused_sftmix_loss, reference_sftmix_loss

    cuda = torch.cuda.is_available()
    dev, dt = ("cuda" if cuda else "cpu"), getattr(torch, dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(M, d, device=dev, generator=g).to(dt).requires_grad_()
    weight = (torch.randn(V, d, device=dev, generator=g) * 0.02).to(dt).requires_grad_()
    labels = torch.randint(0, V, (M,), device=dev, generator=g)
    P = M // 2  # about half the response rows are mixed: each pair mixes min(len_c, len_u) tokens
    pair_a, pair_b = torch.arange(P, device=dev), torch.arange(P, 2 * P, device=dev)
    lam = torch.rand(P, device=dev, generator=g)

    def run():
        if kind in ("fused", "fused_torch"):  # fused: the automatic backend (triton on CUDA)
            ntp, mix = fused_sftmix_loss(hidden, weight, labels, pair_a, pair_b, lam,
                                         backend="torch" if kind == "fused_torch" else "auto")
            (ntp + 0.2 * mix).backward()
        elif kind == "reference":
            ntp, mix = reference_sftmix_loss(hidden, weight, labels, pair_a, pair_b, lam)
            (ntp + 0.2 * mix).backward()
        elif kind == "score_fused":
            with torch.no_grad():
                token_nll(hidden, Head(weight), labels, 0)
        elif kind == "score_naive":
            with torch.no_grad():
                torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, labels[:, None])
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb("VmRSS")
    run()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mb("VmHWM") - base
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"kind": kind, "peak_mb": peak, "time_s": min(times)}


def loss_in_subprocess(kind, M, d, V, dtype) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", kind, str(M), str(d), str(V), dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_and_scoring(model_name: str, steps: int) -> dict:
    """(b) and (c): the real DeepSpeed engine, one process, ZeRO-3, the same 8 examples."""
    import torch
    from hydra import compose, initialize_config_dir

    from sftmix_ds.config import CONF_DIR, register_configs
    from sftmix_ds.inference import example_nll, score
    from sftmix_ds.data import load_split
    from sftmix_ds.engine import DeepSpeedStrategy, LossModule
    from sftmix_ds.methods.ntp import NTP
    from sftmix_ds.methods.sftmix import SFTMix
    from sftmix_ds.models import load_tokenizer, prepare_model

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model_name}", "train.micro_batch_size=8"])
    path = prepare_model(cfg.model, cfg.model_cache_dir)
    tokenizer, pad_id = load_tokenizer(path)
    examples = load_split(cfg.data, tokenizer, cfg.data.train_files)
    batch_examples = examples[:8]  # as pairs: [0..3] confident, [4..7] unconfident
    strategy = DeepSpeedStrategy(cfg.deepspeed, cfg.train)
    result = {}
    for method in (NTP(), SFTMix()):
        batch = method.collate(batch_examples, pad_id)
        counts = method.token_counts(batch)
        inputs = {k: v.to(strategy.comm.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        engine = strategy.prepare(LossModule(strategy.load_model(path), method.loss_terms, strategy), 1000)
        times = []
        for i in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            terms = engine(**inputs)
            strategy.backward_and_step(sum(method.weights[n] * terms[n] / max(counts[n], 1) for n in terms))
            if strategy.comm.on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[method.name] = {"step_s": statistics.median(times[1:]),
                               "tokens": int(batch["attention_mask"].sum()), "mix_tokens": counts.get("mix", 0)}
        strategy.release()
    engine = strategy.prepare_inference(LossModule(strategy.load_model(path), example_nll, strategy))
    score(engine, strategy.comm, examples[:16], 8, pad_id)  # warm-up
    start = time.perf_counter()
    score(engine, strategy.comm, examples, 8, pad_id)
    elapsed = time.perf_counter() - start
    result["scoring"] = {"tokens_per_s": sum(len(e.input_ids) for e in examples) / elapsed, "n": len(examples)}
    result["training_tokens_per_s"] = result["ntp"]["tokens"] / result["ntp"]["step_s"]
    strategy.release()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="issue sizes: M=16384, d=2048 (needs a GPU)")
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        kind, M, d, V, dtype = args.measure
        print(json.dumps(measure_loss(kind, int(M), int(d), int(V), dtype)))
        return
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    M, d, dtype = (16384, 2048, "bfloat16") if args.full else (8192, 128, "float32")
    backend = "triton" if gpu else "torch"  # what backend=auto picks here
    lines = [f"# SFTMix costs: {device}", "", f"`python benchmarks/sftmix.py{' --full' if args.full else ''}`; "
             f"torch {torch.__version__}. Loss sizes: M={M} rows (P=M/2 mixed), d={d}, {dtype}"
             + ("" if args.full else " (d scaled down from 2048 so the CPU finishes: the [M, V] logits, which "
                                     "decide memory, keep their full size)") + ".", "",
             "## (a) fused SFTMix loss vs full-logits reference, forward+backward", "",
             "| V | backend | reference peak MiB | fused peak MiB | memory ratio | reference s | fused s "
             "| time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for V in (49152, 128256):
        ref = loss_in_subprocess("reference", M, d, V, dtype)
        for kind, name in [("fused", backend)] + ([("fused_torch", "torch")] if gpu else []):
            fused = loss_in_subprocess(kind, M, d, V, dtype)
            lines.append(f"| {V} | {name} | {ref['peak_mb']:.0f} | {fused['peak_mb']:.0f} | "
                         f"1/{ref['peak_mb'] / fused['peak_mb']:.1f} | {ref['time_s']:.2f} | {fused['time_s']:.2f} | "
                         f"{fused['time_s'] / ref['time_s']:.2f}x |")
    lines += ["", "## (d) scoring loss vs naive full-logits scoring pass, V=49152, no grad", "",
              "| naive peak MiB | chunked peak MiB | memory ratio |", "|---|---|---|"]
    naive, chunked = (loss_in_subprocess(k, M, 576 if not args.full else d, 49152, dtype)
                      for k in ("score_naive", "score_fused"))
    lines.append(f"| {naive['peak_mb']:.0f} | {chunked['peak_mb']:.0f} | "
                 f"1/{naive['peak_mb'] / chunked['peak_mb']:.1f} |")
    r = step_and_scoring(args.model, args.steps)
    lines += ["", f"## (b) one training step on the same 8 examples, {args.model}, ZeRO-3, 1 process", "",
              "| plain SFT s/step | SFTMix s/step | ratio | mixed tokens |", "|---|---|---|---|",
              f"| {r['ntp']['step_s']:.3f} | {r['sftmix']['step_s']:.3f} | "
              f"{r['sftmix']['step_s'] / r['ntp']['step_s']:.3f}x | {r['sftmix']['mix_tokens']} |",
              "", f"## (c) stage-1 scoring vs training throughput, {args.model}", "",
              "| training tokens/s | scoring tokens/s | ratio |", "|---|---|---|",
              f"| {r['training_tokens_per_s']:.0f} | {r['scoring']['tokens_per_s']:.0f} | "
              f"{r['scoring']['tokens_per_s'] / r['training_tokens_per_s']:.2f}x |"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", f"sftmix_{'gpu' if gpu else 'cpu'}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
