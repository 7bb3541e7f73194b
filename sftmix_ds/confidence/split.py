"""Confidence from per-checkpoint perplexities, the median split, and the confidence file."""
from __future__ import annotations

import json
import math
import os
import random
from typing import Dict, List, Sequence

from ..common import atomic_file
from ..data import DataError

CONFIDENT, UNCONFIDENT = "confident", "unconfident"


class ConfidenceFileError(DataError):
    """A confidence file that does not fit the dataset; the message names the file and the problem."""


def confidence_records(perplexities: Sequence[Dict[str, float]]) -> List[dict]:
    """One record per id: perplexities per checkpoint, confidence = -mean perplexity, and its half.

    Sorted by confidence, highest first (ties by id), the first floor(N/2) are
    `confident` and the rest `unconfident`, so the halves differ by at most one.
    """
    ids = sorted(perplexities[0])
    records = [{"id": i, "perplexities": [p[i] for p in perplexities],
                "confidence": -sum(p[i] for p in perplexities) / len(perplexities)} for i in ids]
    ranked = sorted(records, key=lambda r: (-r["confidence"], r["id"]))
    for rank, r in enumerate(ranked):
        r["split"] = CONFIDENT if rank < len(ranked) // 2 else UNCONFIDENT
    return ranked


def random_split_records(ids: Sequence[str], seed: int) -> List[dict]:
    """A random half/half split in the confidence file's format: each id gets a uniform draw as its
    "confidence" (from a generator seeded by the seed and the set of ids, so the split does not
    depend on the ids' order) and no perplexities; the median split is then as usual."""
    rng = random.Random(json.dumps([seed, sorted(ids)]))
    records = [{"id": i, "perplexities": [], "confidence": rng.random()} for i in sorted(ids)]
    ranked = sorted(records, key=lambda r: (-r["confidence"], r["id"]))
    for rank, r in enumerate(ranked):
        r["split"] = CONFIDENT if rank < len(ranked) // 2 else UNCONFIDENT
    return ranked


def write_confidence_file(path: str, records: List[dict], fingerprint: str) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps({"fingerprint": fingerprint, "n": len(records)}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_confidence_file(path: str, expected_ids: Sequence[str] | None = None) -> List[dict]:
    """Records of a confidence file, checked against the dataset's ids when given."""
    if not os.path.isfile(path):
        raise ConfidenceFileError(f"{path}: no such confidence file")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfidenceFileError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if lineno == 1 and "fingerprint" in r:
                continue
            conf = r.get("confidence") if isinstance(r, dict) else None
            if not isinstance(conf, (int, float)) or not math.isfinite(conf):
                raise ConfidenceFileError(f"{path}:{lineno}: confidence must be a finite number, got {conf!r}")
            if r.get("split") not in (CONFIDENT, UNCONFIDENT) or "id" not in r:
                raise ConfidenceFileError(f"{path}:{lineno}: needs an 'id' and a split of confident/unconfident")
            if not isinstance(r["id"], str):
                raise ConfidenceFileError(f"{path}:{lineno}: 'id' must be a string, got {type(r['id']).__name__}")
            records.append(r)
    if expected_ids is not None:
        have, want = {r["id"] for r in records}, set(expected_ids)
        if len(have) != len(records):
            raise ConfidenceFileError(f"{path}: duplicate ids")
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ConfidenceFileError(f"{path}: does not match the dataset: {len(missing)} dataset ids missing "
                                      f"(e.g. {missing[:3]}), {len(extra)} ids not in the dataset (e.g. {extra[:3]})")
    return records


def summarize(records: List[dict]) -> dict:
    conf = sorted(r["confidence"] for r in records)
    q = lambda f: conf[min(len(conf) - 1, int(f * len(conf)))]
    return {"n": len(records), "confident": sum(r["split"] == CONFIDENT for r in records),
            "unconfident": sum(r["split"] == UNCONFIDENT for r in records),
            "min": conf[0], "q25": q(0.25), "median": q(0.5), "q75": q(0.75), "max": conf[-1]}


def plot_confidence(records: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = [r["confidence"] for r in records]
    threshold = min(r["confidence"] for r in records if r["split"] == CONFIDENT) if len(records) > 1 else conf[0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(conf, bins=min(50, max(5, len(conf) // 4)), color="#4878a8")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"median split ({threshold:.3g})")
    ax.set_xlabel("confidence = -mean perplexity over the scored model states")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
