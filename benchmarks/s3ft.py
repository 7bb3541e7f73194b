"""S3FT stage costs and the target mix on SmolLM2-135M-Instruct, in one run:

  (a) generation throughput (new tokens/s): the stage's batched, length-sorted, KV-cached
      generation against a naive loop that generates one example at a time, same prompts
  (b) the target mix (own / paraphrase / gold) of a real build on the embedded arith data

    python benchmarks/s3ft.py [--prompts 32] [--max-new-tokens 64] [--mix-examples 128]
    python benchmarks/s3ft.py --model llama1b_random --generation-only   # (a) only, a random-init model (GPU)

Writes benchmarks/results/s3ft_<cpu|gpu>.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ARITH = os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mix-examples", type=int, default=128)
    ap.add_argument("--model", default="smollm2_135m", help="a model config (conf/model/NAME.yaml) for (a)")
    ap.add_argument("--generation-only", action="store_true", help="(a) only: (b) needs SmolLM2's own answers")
    args = ap.parse_args()
    import torch

    from sftmix_ds.config import load_model_config
    from sftmix_ds.data import load_conversations
    from sftmix_ds.models import prepare_model
    from sftmix_ds.inference import Generator

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    path = prepare_model(load_model_config(args.model), cache)
    convs = load_conversations([ARITH])
    prompts = [c.messages[:-1] for c in convs[::max(1, len(convs) // args.prompts)][:args.prompts]]
    gen = Generator(path, device, torch.bfloat16 if gpu else torch.float32, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size)
    gen(prompts[:2], progress=False)  # warm-up
    start = time.perf_counter()
    batched = gen(prompts, progress=False)
    t_batched, tok_b = time.perf_counter() - start, gen.new_tokens
    naive, tok_n, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for p in prompts:  # the naive loop: one prompt at a time, as a first script would
            ids = gen.tokenizer(gen.render(p), return_tensors="pt", add_special_tokens=False).to(device)
            out = gen.model.generate(**ids, **gen.kwargs)
            tok_n += int((out[0, ids["input_ids"].shape[1]:] != gen.pad_id).sum())
            naive.append(gen.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    t_naive = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, naive))
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    text = [f"# S3FT stage: {name}", "", f"`python benchmarks/s3ft.py {' '.join(sys.argv[1:])}`; {args.model}, greedy, "
            f"batch size {args.batch_size}, torch {torch.__version__}.", "",
            "## (a) generation throughput, same prompts", "",
            "| stage (batched) new tok/s | naive loop new tok/s | speed-up | identical outputs |", "|---|---|---|---|",
            f"| {tok_b / t_batched:.0f} | {tok_n / t_naive:.0f} | {(tok_b / t_batched) / (tok_n / t_naive):.1f}x | "
            f"{same}/{len(prompts)} |", ""]
    if not args.generation_only:
        text += target_mix(args)
    suffix = "" if args.model == "smollm2_135m" else f"_{args.model}"
    with open(os.path.join(ROOT, "benchmarks", "results", f"s3ft_{'gpu' if gpu else 'cpu'}{suffix}.md"), "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


def target_mix(args) -> list:
    """(b): a real S3FT build on the embedded arith data, its counts of own / paraphrase / gold targets."""
    out_dir = tempfile.mkdtemp(prefix="bench-s3ft-")
    subset = os.path.join(out_dir, "data.jsonl")
    with open(ARITH) as f:
        lines = f.readlines()
    with open(subset, "w") as f:  # both tasks: the first half arithmetic, the second leg counting
        f.writelines(lines[:args.mix_examples // 2] + lines[64:64 + args.mix_examples - args.mix_examples // 2])
    subprocess.run([sys.executable, os.path.join(ROOT, "launch", "s3ft_build.py"), "data=jsonl", "data.judge=numeric",
                    f"data.train_files=[{subset}]", f"method.max_new_tokens={args.max_new_tokens}",
                    f"output_dir={out_dir}"], check=True, cwd=ROOT, capture_output=True)
    with open(os.path.join(out_dir, "s3ft", "mix.json")) as f:
        mix = json.load(f)
    return [f"## (b) target mix on {sum(mix['counts'].values())} embedded arith examples (numeric judge)", "",
            "| own | paraphrase | gold |", "|---|---|---|",
            "| " + " | ".join(f"{mix['counts'][s]} ({100 * mix['share'][s]:.1f}%)"
                              for s in ("own", "paraphrase", "gold")) + " |", ""]


if __name__ == "__main__":
    main()
