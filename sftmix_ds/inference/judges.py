"""Judges: is a candidate answer correct for an example? judge(record, candidate) -> bool.

The record is the raw data record (its gold fields: `answer`, `test`,
`entry_point`, the gold response); which judge applies is a dataset setting
(`data.judge`): numeric, exact, python_tests, llm, or a dotted path to a
user's callable with the same signature.
"""
from __future__ import annotations

import functools
import importlib
import math
import re
from decimal import Decimal
from fractions import Fraction
from typing import Callable, Optional

from .sandbox import isolation, run_tests

JUDGE_PROMPT = """You are grading an answer against a gold answer.

Question:
{question}

Gold answer:
{gold}

Candidate answer:
{candidate}

Does the candidate answer reach the same final answer as the gold answer? \
Reply with one line: VERDICT: yes or VERDICT: no."""

# A number as people write it: thousands separators only in whole groups of three (1,234,567),
# an optional decimal part, an optional exponent; "1,2" is two numbers, not 12.
NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\d,]*\d)|-?\.\d+")
FLOAT_REL_TOL = 1e-6


def last_number(text: str) -> Optional[Fraction]:
    """The final number in a text ("... The answer is 1,234." -> 1234), exactly, or None."""
    found = NUMBER.findall(text or "")
    return Fraction(Decimal(found[-1].replace(",", ""))) if found else None


def numeric(record: dict, candidate: str, field: str = "answer") -> bool:
    """The candidate's last number equals the gold's: exactly (as written decimals: 0.5 = 0.50,
    1,234 = 1234), except where the gold is a float value (a JSON number with a fraction or an
    exponent, or text in scientific notation), which is matched within a relative 1e-6."""
    gold_value = record[field]
    gold, got = last_number(str(gold_value)), last_number(candidate)
    if gold is None or got is None:
        return False
    inexact = isinstance(gold_value, float) or bool(re.search(r"\d[eE][-+]?\d", str(gold_value)))
    if inexact:
        return math.isclose(float(gold), float(got), rel_tol=FLOAT_REL_TOL, abs_tol=1e-12)
    return gold == got


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


def python_tests(record: dict, candidate: str, timeout_s: float = 10.0, allow_unsandboxed: bool = False) -> bool:
    """The candidate's code against the example's tests (HumanEval layout: `test` defines
    check(candidate), `entry_point` names the function, `stub` is the signature, docstring and
    any helpers), in the sandbox, with a verdict the candidate cannot forge (sandbox.run_tests)."""
    code = extract_code(candidate)
    stub = record.get("stub") or ""
    if stub and f"def {record['entry_point']}" not in code:
        code = stub + code  # the answer is the function body only
    return run_tests(code, record["test"], record["entry_point"], helpers=stub, timeout_s=timeout_s,
                     allow_unsandboxed=allow_unsandboxed).passed


RECORD_JUDGES = {"numeric": numeric, "exact": exact, "contains": contains, "python_tests": python_tests}
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


def resolve_judge(name: str, allow_unsandboxed_code: bool = False) -> Callable:
    """A record-level judge by name or dotted path (the llm judge is built separately).
    allow_unsandboxed_code: python_tests may run code without isolation where the machine has none."""
    if name == "python_tests":
        return functools.partial(python_tests, allow_unsandboxed=allow_unsandboxed_code)
    if name in RECORD_JUDGES:
        return RECORD_JUDGES[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown judge {name!r}: use {', '.join(RECORD_JUDGES)}, llm (S3FT only) "
                         "or a dotted path to judge(record, candidate) -> bool")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"judge {name!r} is not callable")
    return fn


def check_judge_name(name: str, llm_ok: bool, allow_unsandboxed_code: bool = False) -> None:
    """Raise ValueError (saying what is allowed) unless `name` resolves to a judge that can run here."""
    if not (llm_ok and name == "llm"):
        resolve_judge(name)
    if name == "python_tests" and not allow_unsandboxed_code and isolation()[0] is None:
        raise ValueError(f"python_tests runs model-written code, and this machine cannot sandbox it "
                         f"({isolation()[2]}); set allow_unsandboxed_code=true to run it anyway")
