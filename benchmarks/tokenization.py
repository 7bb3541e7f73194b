"""Tokenization throughput, one process against data.num_proc workers, on UltraChat-shaped
conversations (3 user/assistant exchanges, about 1,000 tokens each) with SmolLM2's tokenizer.

python benchmarks/tokenization.py --conversations 4000 --num-proc 1 2 --out benchmarks/results/tokenize_cpu.md

Both runs must give the same examples (checked); the table gives tokens/s and the speedup.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conversations(n: int, seed: int = 0):
    from sftmix_ds.data import Conversation

    rng = random.Random(seed)
    words = [w.strip() for w in open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split()
             if w.strip().isalpha()]
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))
    out = []
    for i in range(n):
        messages = []
        for _ in range(3):
            messages += [{"role": "user", "content": text(60)}, {"role": "assistant", "content": text(220)}]
        out.append(Conversation(f"c{i}", messages, f"synthetic:{i + 1}", {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each setting; the fastest counts")
    parser.add_argument("--out", default="benchmarks/results/tokenize_cpu.md")
    a = parser.parse_args()
    from transformers import AutoTokenizer

    from sftmix_ds.data.tokenize import tokenize_conversations
    from sftmix_ds.models import SMOLLM2_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    convs = conversations(a.conversations)
    rows, reference = [], None
    for n in a.num_proc:
        seconds = []
        for _ in range(a.repeat):
            started = time.perf_counter()
            result = tokenize_conversations(convs, tokenizer, 4096, "truncate", num_proc=n, progress=True)
            seconds.append(time.perf_counter() - started)
        seconds = min(seconds)
        reference = reference or result
        assert result == reference, f"num_proc={n} gave other examples than num_proc={a.num_proc[0]}"
        tokens = sum(len(e.input_ids) for e in result[0])
        rows.append((n, seconds, tokens))
    lines = [f"Tokenizing {a.conversations} UltraChat-shaped conversations ({rows[0][2]:,} tokens) with SmolLM2's "
             f"tokenizer on {os.cpu_count()} cores (the fastest of {a.repeat} runs each); every row gives identical "
             "examples.", "",
             "| num_proc | seconds | tokens/s | speedup |", "|---|---|---|---|"]
    lines += [f"| {n} | {s:.1f} | {t / s:,.0f} | {rows[0][1] / s:.2f}x |" for n, s, t in rows]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
