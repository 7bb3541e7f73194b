"""Datasets of the shipped lm-eval tasks: the project's own held-out sets, read by the project's own
loader, so lm-eval asks exactly the questions `launch/eval.py` asks (each conversation's last user
turn; the gold is the record's `answer` field, else the last assistant turn)."""
import os

import datasets

from sftmix_ds.data import load_conversations, require_final_answer

PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLACES = {"builtin": os.path.join(PACKAGE, "builtin_data"),
          "study": os.path.join(os.path.dirname(PACKAGE), "benchmarks", "study_data")}


def held_out(place: str, file: str, **_) -> dict:
    path = os.path.join(PLACES[place], file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the data of this task is in the repository (a source checkout), not here")
    conversations = load_conversations([path])
    require_final_answer(conversations, "an lm-eval task")
    docs = [{"id": c.id, "question": c.messages[-2]["content"],
             "answer": str(c.record.get("answer", c.messages[-1]["content"]))} for c in conversations]
    return {"test": datasets.Dataset.from_list(docs)}
