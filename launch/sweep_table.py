"""A sweep's final metrics as one markdown table: `python launch/sweep_table.py multirun/DATE_TIME`.

Reads each point's overrides.yaml, the last record of its metrics.jsonl and, after an evaluation, its
eval_summary.json (judged accuracies, lm-eval scores, perplexity) as more columns. Points compare on
eval_loss, first: `loss` is each point's training objective, which for sftmix adds mu * loss/mix, so it
would rank points by mu.
"""
import glob
import json
import os
import sys

import yaml

METRICS = ("eval_loss", "loss/ntp", "loss/mix", "loss")


def main(sweep_dir: str) -> None:
    rows = []
    for point in sorted(glob.glob(os.path.join(sweep_dir, "*", "metrics.jsonl")), key=os.path.getmtime):
        folder = os.path.dirname(point)
        with open(point) as f:
            last = [json.loads(line) for line in f][-1]
        overrides = []
        if os.path.exists(os.path.join(folder, "overrides.yaml")):
            with open(os.path.join(folder, "overrides.yaml")) as f:
                overrides = yaml.safe_load(f) or []
        evals = [json.loads(line) for line in open(point) if "eval_loss" in line]
        last.setdefault("eval_loss", evals[-1]["eval_loss"] if evals else None)
        summary = os.path.join(folder, "eval_summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                last.update(json.load(f))
        rows.append((os.path.basename(folder), " ".join(overrides), last))
    if not rows:
        sys.exit(f"{sweep_dir}: no */metrics.jsonl found")
    columns = list(METRICS) + sorted({k for _, _, last in rows for k in last if k.startswith("eval/")})
    print("Compare points on eval_loss: `loss` is the training objective (sftmix: loss/ntp + mu * loss/mix).\n")
    print("| point | overrides | step | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for name, overrides, last in rows:
        cells = [f"{last[m]:.4f}" if isinstance(last.get(m), float) else "" for m in columns]
        print(f"| {name} | {overrides} | {last['step']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
