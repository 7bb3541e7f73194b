"""Judges: is a candidate answer correct for an example? judge(record, candidate) -> bool.

The record is the raw data record (its gold fields: `answer`, `test`,
`entry_point`, the gold response); which judge applies is a dataset setting
(`data.judge`): numeric, exact, python_tests, llm, or a dotted path to a
user's callable with the same signature.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Optional

from ..config import JUDGE_PROMPT
from .sandbox import run_python

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> Optional[float]:
    """The final number in a text ("... The answer is 1,234." -> 1234.0), or None."""
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(record: dict, candidate: str, field: str = "answer") -> bool:
    gold, got = last_number(str(record[field])), last_number(candidate)
    return gold is not None and got is not None and math.isclose(gold, got, rel_tol=1e-6, abs_tol=1e-9)


def normalize(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", (text or "").lower())
    text = re.sub(r"\b(the|a|an)\b", " ", text)
    return " ".join(text.split())


def exact(record: dict, candidate: str, field: str = "answer") -> bool:
    """Normalised match of the gold answer with the whole candidate or its final line."""
    gold = normalize(str(record[field]))
    lines = [line for line in (candidate or "").strip().splitlines() if line.strip()]
    return bool(gold) and (normalize(candidate) == gold or (bool(lines) and normalize(lines[-1]) == gold))


def contains(record: dict, candidate: str, field: str = "answer") -> bool:
    """The normalised gold answer appears in the normalised candidate (short open answers)."""
    gold = normalize(str(record[field]))
    return bool(gold) and f" {gold} " in f" {normalize(candidate)} "


def extract_code(text: str) -> str:
    """The last fenced code block of an answer, or the whole answer when it has none."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text or "", flags=re.S)
    return blocks[-1] if blocks else (text or "")


def python_tests(record: dict, candidate: str, timeout_s: float = 10.0) -> bool:
    """Run the candidate's code with the example's tests (HumanEval layout: `test` defines
    check(candidate), `entry_point` names the function, `stub` is the signature and
    docstring) in the sandbox."""
    code = extract_code(candidate)
    if record.get("stub") and f"def {record['entry_point']}" not in code:
        code = record["stub"] + code  # the answer is the function body only
    program = f"{code}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"
    return run_python(program, timeout_s=timeout_s).passed


VERDICT = re.compile(r"verdict\s*:\s*(yes|no)", re.I)


def parse_verdict(text: str) -> bool:
    """True only for an explicit "VERDICT: yes"; anything unparseable counts as no."""
    found = VERDICT.findall(text or "")
    return bool(found) and found[-1].lower() == "yes"


class LLMJudge:
    """The base model as judge: one batched generation over all pending checks."""

    def __init__(self, generate: Callable, prompt: str = JUDGE_PROMPT):
        self.generate, self.prompt = generate, prompt

    def judge_many(self, items) -> list:
        """items: (question, gold, candidate) triples -> verdicts."""
        prompts = [self.prompt.format(question=q, gold=g, candidate=c) for q, g, c in items]
        return [parse_verdict(t) for t in self.generate(prompts)] if prompts else []


def resolve_judge(name: str) -> Callable:
    """A record-level judge by name or dotted path (the llm judge is built separately)."""
    builtin = {"numeric": numeric, "exact": exact, "contains": contains, "python_tests": python_tests}
    if name in builtin:
        return builtin[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown judge {name!r}: use numeric, exact, contains, python_tests, llm or a dotted path")
    return getattr(importlib.import_module(module), attr)
