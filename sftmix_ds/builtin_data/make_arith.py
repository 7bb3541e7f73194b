"""Regenerate the embedded default dataset (arith_*.jsonl) offline from reasoning-gym.

    python sftmix_ds/builtin_data/make_arith.py

Each record is an alpaca example with a stable id, the gold `answer` and the
reasoning-gym `task`, so later stages can judge generated answers.
"""
import json
import os

import reasoning_gym

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = {"arith_train.jsonl": (128, 1234), "arith_eval.jsonl": (32, 5678)}


def solution(entry: dict, task: str) -> str:
    if task == "basic_arithmetic":
        return f"{entry['metadata']['expression']} = {entry['answer']}\nThe answer is {entry['answer']}."
    return f"The answer is {entry['answer']}."


def make(path: str, size: int, seed: int) -> None:
    records = []
    for task in ("basic_arithmetic", "leg_counting"):
        for i, entry in enumerate(reasoning_gym.create_dataset(task, size=size // 2, seed=seed)):
            records.append({"id": f"{task}-{seed}-{i}", "task": task, "instruction": entry["question"].strip(),
                            "output": solution(entry, task), "answer": entry["answer"]})
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    for name, (size, seed) in SPLITS.items():
        make(os.path.join(HERE, name), size, seed)
