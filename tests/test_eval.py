"""Evaluation: judged accuracy on a scripted model, and the real entry point on an exported model."""
import json
import os
import sys

import pytest
import torch

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
    """After training: the judged sets, perplexity and lm-eval on the export, into eval.json, eval.md
    and the run's summary; launch/eval.py on 2 ranks (lm-eval on rank 0, the other waiting) gives the
    same figures."""
    out = tmp_path / "run"
    evaluation = ["eval=arith", "eval.tasks.0.limit=4", "eval.general.0.limit=4", "eval.max_new_tokens=4",
                  "eval.batch_size=1", "eval.harness.tasks=[sftmix_arith,sftmix_arith_cot]", "eval.harness.limit=4"]
    launch_cli("train.py", ["model=tiny", "method=ntp", "train.max_steps=1", *evaluation, f"output_dir={out}"])
    with open(out / "eval" / "eval.json") as f:
        results = json.load(f)
    assert results["model"] == str(out / "model")
    assert results["tasks"]["arith"]["n"] == 4 and results["general"]["capitals"]["n"] == 4
    assert results["perplexity"]["n"] == 32 and results["perplexity"]["perplexity"] > 1
    harness = results["harness"]["sftmix_arith"]
    assert harness["metric"] == "exact_match" and harness["n"] == len(harness["samples"]) == 4
    assert (out / "eval" / "eval.md").read_text() == markdown_table(results)
    assert "| lm-eval sftmix_arith exact_match (last_number) |" in markdown_table(results)
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["eval/tasks/arith"] == results["tasks"]["arith"]["accuracy"]
    assert summary["eval/lm_eval/sftmix_arith"] == harness["value"]
    cot = results["harness"]["sftmix_arith_cot"]  # every metric and filter, in eval.json, eval.md and the summary
    assert set(cot["metrics"]) == {"exact_match,strict_match", "exact_match,last_number"}
    assert "| lm-eval sftmix_arith_cot exact_match (last_number) |" in markdown_table(results)
    assert summary["eval/lm_eval/sftmix_arith_cot/exact_match,last_number"] == cot["metrics"][
        "exact_match,last_number"]["value"]
    again = tmp_path / "again"  # launch/eval.py on the export, over 2 ranks, gives the same figures
    launch_cli("eval.py", ["model=tiny", *evaluation, f"eval.model_path={out / 'model'}", f"output_dir={again}"],
               nproc=2)
    from sftmix_ds.config import path_tag

    with open(again / "eval" / path_tag(out / "model") / "eval.json") as f:  # one folder per evaluated model
        two = json.load(f)
    assert two["tasks"] == results["tasks"] and two["general"] == results["general"]
    assert two["harness"] == results["harness"]
    assert abs(two["perplexity"]["perplexity"] - results["perplexity"]["perplexity"]) < 1e-4 * results[
        "perplexity"]["perplexity"]


def test_the_shipped_lm_eval_tasks_ask_the_projects_questions():
    """Each shipped task's documents are the held-out set's last user turns and gold answers, in order."""
    import os

    from sftmix_ds.data import load_conversations
    from sftmix_ds.eval.harness import SHIPPED_TASKS, shipped_tasks

    sys.path.insert(0, SHIPPED_TASKS)
    from utils import PLACES, held_out

    assert shipped_tasks() == ["sftmix_arith", "sftmix_arith_cot", "sftmix_capitals", "sftmix_study_general",
                              "sftmix_study_indomain"]
    for place, file in (("builtin", "arith_eval.jsonl"), ("builtin", "capitals.jsonl"), ("study", "general.jsonl")):
        docs = held_out(place, file)["test"]
        convs = load_conversations([os.path.join(PLACES[place], file)])
        assert [d["question"] for d in docs] == [c.messages[-2]["content"] for c in convs]
        assert [d["answer"] for d in docs] == [str(c.record["answer"]) for c in convs]


@pytest.mark.e2e
def test_lm_eval_and_the_projects_judges_agree_on_the_same_answers(tmp_path):
    """SmolLM2-135M-Instruct on 8 arithmetic and 8 capitals questions through launch/eval.py: where
    both harnesses generated the same answer, lm-eval's exact match and the project's judge agree,
    but for the rules the README gives: a numeric answer written otherwise than its gold (1,234 for
    1234, 4.0 for 4) is right for the numeric judge only; a capital named with more after it
    ("Ottawa, Canada.") is right for the contains judge only."""
    import re

    proc = launch_cli("eval.py", ["model=smollm2_135m", "eval=arith", "eval.tasks.0.limit=8",
                                  "eval.general.0.limit=8", "eval.perplexity_files=[]", "eval.harness.limit=8",
                                  "eval.harness.tasks=[sftmix_arith,sftmix_capitals]", f"output_dir={tmp_path}"],
                      timeout=900)
    with open(tmp_path / "eval" / "base" / "eval.json") as f:
        results = json.load(f)
    compared = 0
    for group, ours, theirs in (("tasks", "arith", "sftmix_arith"), ("general", "capitals", "sftmix_capitals")):
        mine = {x["id"]: x for x in results[group][ours]["examples"]}
        for s in results["harness"][theirs]["samples"]:
            m = mine[s["id"]]
            if m["answer"] != s["response"]:
                continue  # lm-eval batches and pads otherwise: a few greedy answers part late
            compared += 1
            if m["correct"] == s["correct"]:
                continue
            if ours == "arith":  # only the numeric judge's reading of a number written otherwise
                assert m["correct"] and s["extracted"] != s["target"], s
            else:  # the name, then more: contains accepts it, exact match of the final answer does not
                assert m["correct"] and re.search(re.escape(s["target"]) + r"\W*\w", s["response"]), s
    assert compared >= 12, proc.stderr[-2000:]
    assert results["general"]["capitals"]["accuracy"] > 0.3  # a real model: the comparison is not vacuous


@pytest.mark.e2e
def test_lm_eval_tasks_generate_with_their_own_settings_unless_overridden():
    """The chain-of-thought task asks for 256 new tokens, not eval.max_new_tokens (the tiny random model
    never stops early, so its answers show the budget); eval.harness.gen_kwargs overrides every task's."""
    from omegaconf import OmegaConf

    from sftmix_ds.config import HarnessConfig, load_model_config
    from sftmix_ds.eval.harness import run_harness
    from sftmix_ds.models import load_tokenizer, prepare_model

    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    path = prepare_model(load_model_config("tiny"), cache)
    tokenizer, _ = load_tokenizer(path)

    def answer_lengths(**gen_kwargs):
        harness = OmegaConf.structured(HarnessConfig(tasks=["sftmix_arith_cot"], limit=2, batch_size=2,
                                                     gen_kwargs=gen_kwargs))
        out = run_harness(harness, path, tokenizer, torch.device("cpu"), torch.float32, "<|im_end|>")
        return [len(tokenizer(s["response"], add_special_tokens=False)["input_ids"])
                for s in out["sftmix_arith_cot"]["samples"]]

    assert min(answer_lengths()) > 48
    assert max(answer_lengths(max_gen_toks=8)) <= 10  # re-tokenizing decoded text may split a token or two


@pytest.mark.e2e
def test_unknown_lm_eval_tasks_and_missing_data_fail_before_a_model_loads(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "empty")}
    for tasks, messages in (("[sftmix_arithh]", ["eval.harness.tasks: no lm-eval task or group 'sftmix_arithh' "
                                                 "(close: sftmix_arith"]),
                            ("[gsm8k]", ["eval.harness.tasks: task 'gsm8k' cannot load its data",
                                         "offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): fill the datasets cache"]),
                            ("[sftmix_arith] eval.harness.include_path=[/nonexistent]",
                             ["eval.harness.include_path: '/nonexistent' is not a folder"])):
        proc = launch_cli("eval.py", ["model=tiny", "eval=lm_eval", *f"eval.harness.tasks={tasks}".split(),
                                      f"output_dir={tmp_path}"], check=False, env=env)
        assert proc.returncode == 2 and all(m in proc.stderr for m in messages), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Running generate_until" not in proc.stderr
