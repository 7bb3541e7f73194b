"""The judges that decide whether an answer is right (S3FT keeps the model's own answers they
accept; evaluation counts them): numeric, exact, contains, the LLM judge's verdict parsing, and
unit tests run in the sandbox (hostile candidates: tests/test_sandbox.py)."""
import json
import os

import pytest

from sftmix_ds.inference import LLMJudge
from sftmix_ds.inference.judges import contains, exact, numeric, parse_verdict, python_tests

from .helpers import ROOT


def humaneval(n):
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "humaneval.jsonl")) as f:
        return [json.loads(line) for line in f][:n]


@pytest.mark.parametrize("gold,candidate,expected", [
    ("1234", "First 1000 + 234.\nThe answer is 1,234.", True), ("-4", "so x = -4", True),
    ("0.5", "The answer is 0.50", True), ("12", "The answer is 13.", False), ("7", "no idea", False),
    ("40", "She pays $40 in total.", True), ("1500", "It weighs 1,500 kg", True), ("3", "3 apples and 2 pears", False),
    ("-12", "The temperature drops to -12 degrees.", True)])
def test_numeric_judge(gold, candidate, expected):
    assert numeric({"answer": gold}, candidate) is expected


@pytest.mark.parametrize("gold,candidate,expected", [
    ("1634852831975", "The total is 1634851831975.", False),  # a relative tolerance of 1e-6 accepted these
    ("10861852", "so 10861860", False),
    ("12", "1,2", False),  # "1,2" is not twelve
    ("2", "pick 1,2", True),
    ("1234567", "It is 1,234,567.", True),
    ("1234", "1,23,4", False),
    ("0.5", "0.50", True), ("7", "7.0", True), ("0.1", "0.1000001", False),
    (0.3333333333, "about 0.33333333", True),  # the gold is a float value: relative 1e-6
    ("1.5e-3", "0.0015000001", True), ("1.5e-3", "0.0016", False)])
def test_numeric_judge_is_exact_except_for_float_golds(gold, candidate, expected):
    assert numeric({"answer": gold}, candidate) is expected


@pytest.mark.parametrize("gold,candidate,expected", [
    # the reproductions, and what the same rule says about their neighbours
    ("3/4", "4", False), ("3/4", "The answer is 3/4.", True), ("3/4", "so 0.75", True), ("-1/2", "-0.5", True),
    ("2:30", "30", False), ("2:30", "It ends at 2:30 pm.", True), ("1:05:09", "1:05:09", True),
    ("2:30", "2.5", False),
    ("-25", "\u221225", True), ("-25", "the answer is \uff0d25", True), ("25", "\u221225", False),
    ("5", "1e999999999", False), ("5", "1e-999999999", False), (2.5, "1e400", False), (2.5, "2.5", True),
    ("7", "7/0", False)])
def test_numeric_judge_reads_fractions_times_and_minus_signs_and_rejects_what_it_cannot_read(gold, candidate,
                                                                                             expected):
    assert numeric({"answer": gold}, candidate) is expected


def test_exact_judge_normalises():
    assert exact({"answer": "New Delhi"}, "Let me think.\nnew delhi.")
    assert exact({"answer": "The Hague"}, "hague")
    assert not exact({"answer": "Paris"}, "Lyon")


@pytest.mark.parametrize("gold,candidate,expected", [
    ("-25", "25", False), ("-25", "-25", True), ("-25", "Thinking.\n\u221225.", True),
    ("3.5", "3-5", False), ("3.5", "3.5", True), ("1/2", "1 2", False), ("1/2", "1/2", True),
    ("2:30", "2 30", False), ("New Delhi", "NEW DELHI!", True), ("well-known", "well known", True)])
def test_exact_judge_keeps_signs_and_separators_of_numbers(gold, candidate, expected):
    assert exact({"answer": gold}, candidate) is expected


@pytest.mark.parametrize("gold,candidate,expected", [
    ("Paris", "It is not Paris, it is Lyon.", False), ("Paris", "The capital isn't Paris.", False),
    ("Paris", "No, Paris.", False), ("Paris", "It can't be Paris.", False),
    ("Paris", "Paris.", True), ("Paris", "The capital of France is Paris.", True),
    ("Paris", "Not Lyon: the capital is Paris.", True),  # the negation is not next to the answer
    ("New Delhi", "Definitely New Delhi", True)])
def test_contains_judge_rejects_a_negated_answer(gold, candidate, expected):
    assert contains({"answer": gold}, candidate) is expected


def test_contains_judge_for_open_answers():
    assert contains({"answer": "New Delhi"}, "The capital of India is New Delhi.")
    assert not contains({"answer": "Rome"}, "The capital is Romeo")


def test_contains_judge_rejects_naming_another_questions_answer_too():
    """Listing every capital of the set does not answer one question; another answer inside the gold
    (York in New York) or the gold itself among the set's answers is no rival."""
    capitals = ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Nairobi", "York", "New York"]
    assert not contains({"answer": "Paris"}, "Paris London Berlin Madrid Rome Tokyo Nairobi", others=capitals)
    assert contains({"answer": "Paris"}, "Paris London Berlin Madrid Rome Tokyo Nairobi")  # without the set
    assert contains({"answer": "Paris"}, "The capital of France is Paris.", others=capitals)
    assert contains({"answer": "New York"}, "It is New York.", others=capitals)
    assert not contains({"answer": "York"}, "York, or New York", others=capitals)  # New York holds York: a rival


def test_evaluation_gives_a_judge_that_takes_them_the_sets_other_answers():
    from sftmix_ds.data.formats import Conversation
    from sftmix_ds.eval import accuracy

    golds = ["Paris", "Rome", "Tokyo"]
    convs = [Conversation(f"c{i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": g}], "x", {})
             for i, g in enumerate(golds)]
    answers = ["Paris.", "Rome or Paris or Tokyo", "It is Tokyo"]
    serial = lambda items, fn: fn(items)
    result = accuracy(convs, lambda prompts: answers, contains, serial)
    assert [e["correct"] for e in result["examples"]] == [True, False, True]


def test_llm_judge_parses_a_verdict_and_counts_anything_else_as_no():
    prompts_seen = []

    def scripted(prompts):
        prompts_seen.extend(prompts)
        return ["Reasoning...\nVERDICT: yes", "VERDICT: NO", "I think it is right", "verdict: Yes."]

    verdicts = LLMJudge(scripted).judge_many([("q1", "g1", "c1"), ("q2", "g2", "c2"), ("q3", "g3", "c3"),
                                               ("q4", "g4", "c4")])
    assert verdicts == [True, False, False, True]
    assert "q2" in prompts_seen[1] and "g2" in prompts_seen[1] and "c2" in prompts_seen[1]
    assert not parse_verdict("") and parse_verdict("VERDICT: no ... VERDICT: yes")


def test_python_tests_judge_on_humaneval():
    problems = humaneval(4)
    assert all(python_tests(p, p["completion"]) for p in problems)  # gold solutions pass
    body_only = problems[0]["completion"].split('"""\n', 2)[-1].replace("```", "")
    assert python_tests(problems[0], body_only)  # a bare body gets the stub prepended
    wrong = f"```python\ndef {problems[0]['entry_point']}(*args):\n    return None\n```"
    assert not python_tests(problems[0], wrong)
    assert not python_tests(problems[0], "```python\nwhile True: pass\n```", timeout_s=2)


def test_humaneval_33_whose_tests_call_the_function_by_name():
    """HumanEval/33's check compares candidate(x) with sort_third(x): the name is the candidate (as in
    the official harness, where the program defines it), not the prompt's empty stub."""
    [problem] = [p for p in humaneval(164) if p["id"] == "HumanEval/33"]
    assert "sort_third([1, 2, 3])" in problem["test"]
    assert python_tests(problem, problem["completion"])
    wrong = problem["completion"].replace("l[::3] = sorted(l[::3])", "l[::3] = sorted(l[::3], reverse=True)")
    assert wrong != problem["completion"] and not python_tests(problem, wrong)
