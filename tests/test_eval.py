"""Evaluation: judged accuracy on a scripted model, and the real entry point on an exported model."""
import json

import pytest

from sftmix_ds.data.formats import Conversation
from sftmix_ds.eval import accuracy, markdown_table
from sftmix_ds.inference.judges import numeric

from .helpers import launch_cli


def test_accuracy_on_a_scripted_model_with_known_answers():
    golds = ["4", "10", "-3", "7"]
    convs = [Conversation(f"q{i}", [{"role": "user", "content": f"question {i}"},
                                    {"role": "assistant", "content": f"The answer is {g}."}], "t", {"answer": g})
             for i, g in enumerate(golds)]
    scripted = {"question 0": "The answer is 4.", "question 1": "It is 11", "question 2": "so -3",
                "question 3": "no idea"}
    generate = lambda prompts: [scripted[p[-1]["content"]] for p in prompts]
    same_rank = lambda items, fn: fn(items)
    result = accuracy(convs, generate, numeric, same_rank)
    assert result["accuracy"] == 0.5 and result["n"] == 4
    assert [e["correct"] for e in result["examples"]] == [True, False, True, False]
    assert [e["answer"] for e in result["examples"]] == list(scripted.values())





@pytest.mark.e2e
def test_eval_entry_point_on_an_exported_model(tmp_path):
    out = tmp_path / "run"
    launch_cli("train.py", ["model=tiny", "method=ntp", "train.max_steps=1", "eval=arith", "eval.tasks.0.limit=4",
                            "eval.general.0.limit=4", "eval.max_new_tokens=4", "eval.batch_size=1",
                            f"output_dir={out}"])
    with open(out / "eval" / "eval.json") as f:
        results = json.load(f)
    assert results["model"] == str(out / "model")
    assert results["tasks"]["arith"]["n"] == 4 and results["general"]["capitals"]["n"] == 4
    assert results["perplexity"]["n"] == 32 and results["perplexity"]["perplexity"] > 1
    assert (out / "eval" / "eval.md").read_text() == markdown_table(results)
    assert json.loads((out / "eval_summary.json").read_text())["eval/tasks/arith"] == results["tasks"]["arith"][
        "accuracy"]
    again = tmp_path / "again"  # launch/eval.py on the export, over 2 ranks, gives the same figures
    launch_cli("eval.py", ["model=tiny", "eval.tasks.0.limit=4", "eval.general.0.limit=4", "eval.max_new_tokens=4",
                           "eval.batch_size=1",
                           f"eval.model_path={out / 'model'}", f"output_dir={again}"], nproc=2)
    from sftmix_ds.config import path_tag

    with open(again / "eval" / path_tag(out / "model") / "eval.json") as f:  # one folder per evaluated model
        two = json.load(f)
    assert two["tasks"] == results["tasks"] and two["general"] == results["general"]
    assert abs(two["perplexity"]["perplexity"] - results["perplexity"]["perplexity"]) < 1e-4 * results[
        "perplexity"]["perplexity"]
