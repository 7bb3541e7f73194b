"""Judges: is a candidate answer correct for an example? judge(record, candidate) -> bool.

The record is the raw data record (its gold fields: `answer`, `test`,
`entry_point`, the gold response); which judge applies is a dataset setting
(`data.judge`): numeric, exact, python_tests, llm, or a dotted path to a
user's callable with the same signature.
"""
from __future__ import annotations

import functools
import importlib
import re
from decimal import Decimal
from fractions import Fraction
from typing import Callable, Sequence

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

# Minus signs people (and models) write: U+2212 and the full-width hyphen-minus mean "-".
MINUS = str.maketrans({"\u2212": "-", "\uff0d": "-"})
# A number as people write it: thousands separators only in whole groups of three (1,234,567),
# an optional decimal part, an optional exponent; "1,2" is two numbers, not 12. Before it, a
# fraction (3/4) and a time of day or duration (2:30, 1:05:09), which are one value each.
NUMBER = re.compile(r"(?P<time>(?<![\d.:/])\d{1,2}(?::\d{2}){1,2}(?![\d:]))"
                    r"|(?P<fraction>(?<![\d.:/])-?\d+/\d+(?![\d/]|\.\d))"
                    r"|(?P<decimal>(?<![\d.:/])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\d,]*\d)"
                    r"|-?\.\d+)")
MAX_EXPONENT = 400  # beyond any float: a number written with a larger exponent is not read (no huge integers)
FLOAT_REL_TOL = Fraction(1, 10**6)
FLOAT_ABS_TOL = Fraction(1, 10**12)


def last_number(text: str):
    """The final number in a text ("... The answer is 1,234." -> 1234), exactly: a Fraction, or
    ("time", (h, m[, s])) for a time; None when there is none or it cannot be read."""
    matches = list(NUMBER.finditer((text or "").translate(MINUS)))
    if not matches:
        return None
    m = matches[-1]
    if m["time"]:
        return "time", tuple(int(part) for part in m["time"].split(":"))
    if m["fraction"]:
        numerator, denominator = m["fraction"].split("/")
        return Fraction(int(numerator), int(denominator)) if int(denominator) else None
    written = Decimal(m["decimal"].replace(",", ""))
    if abs(written.as_tuple().exponent) > MAX_EXPONENT:
        return None
    return Fraction(written)


def numeric(record: dict, candidate: str, field: str = "answer") -> bool:
    """The candidate's last number equals the gold's: exactly (as written decimals: 0.5 = 0.50,
    1,234 = 1234; a fraction gold 3/4 by its value, so 0.75 too; a time gold 2:30 only as that
    time), except where the gold is a float value (a JSON number with a fraction or an exponent,
    or text in scientific notation), which is matched within a relative 1e-6. A number the judge
    cannot read (an exponent beyond 400, a zero denominator) is a wrong answer."""
    gold_value = record[field]
    gold, got = last_number(str(gold_value)), last_number(candidate)
    if gold is None or got is None or isinstance(gold, tuple) != isinstance(got, tuple):
        return False
    inexact = isinstance(gold_value, float) or bool(re.search(r"\d[eE][-+]?\d", str(gold_value)))
    if inexact and not isinstance(gold, tuple):
        return abs(gold - got) <= max(FLOAT_REL_TOL * max(abs(gold), abs(got)), FLOAT_ABS_TOL)
    return gold == got


ARTICLES = {"the", "a", "an"}
# A signed number with its inner separators (-25, 3.5, 1/2, 2:30, 1,234) is one token, so signs
# and separators are compared; other text is compared word by word, case and punctuation aside.
TOKEN = re.compile(r"(?<![\w.])-?\d+(?:[.,:/]\d+)*|[^\W_]+")


def normalize(text: str) -> str:
    """Lower-cased tokens without articles: words, and numbers whole with their sign and separators."""
    tokens = TOKEN.findall((text or "").translate(MINUS).lower())
    return " ".join(t for t in tokens if t not in ARTICLES)


def exact(record: dict, candidate: str, field: str = "answer") -> bool:
    """Normalised match of the gold answer with the whole candidate or its final line
    (normalize: case, punctuation and articles aside; numbers compared whole, sign included)."""
    gold = normalize(str(record[field]))
    lines = [line for line in (candidate or "").strip().splitlines() if line.strip()]
    return bool(gold) and (normalize(candidate) == gold or (bool(lines) and normalize(lines[-1]) == gold))


# Words that, just before the gold answer, say it is not the answer ("it is not Paris").
NEGATIONS = {"not", "no", "never", "nor", "neither", "isn", "wasn", "aren", "weren", "don", "doesn", "didn",
             "cannot", "can", "won", "wouldn", "shouldn", "hardly"}
NEGATION_WINDOW = 3  # tokens before the answer that are looked at


def contains(record: dict, candidate: str, field: str = "answer", others: Sequence[str] = ()) -> bool:
    """The normalised gold answer appears in the normalised candidate (short open answers), and no
    appearance is negated by one of NEGATIONS in the NEGATION_WINDOW tokens before it: what the
    judge cannot decide ("not Paris ... Paris") it rejects. ("can" counts for "can't", which the
    normalisation splits.) `others`: the other answers of the same evaluation set; a candidate naming
    one of them as well (beyond those inside the gold) is rejected, so listing every capital does not
    answer "the capital of France"."""
    gold = normalize(str(record[field])).split()
    words = normalize(candidate).split()
    found = _places(words, gold)
    negated = any(NEGATIONS & set(words[max(0, i - NEGATION_WINDOW):i]) for i in found)
    rivals = (o for o in map(lambda text: normalize(str(text)).split(), others) if o and not _places(gold, o))
    return bool(found) and not negated and not any(_places(words, rival) for rival in rivals)


def _places(words: list, phrase: list) -> list:
    """Where `phrase` (a list of words) starts in `words`."""
    return [i for i in range(len(words) - len(phrase) + 1) if phrase and words[i:i + len(phrase)] == phrase]


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
