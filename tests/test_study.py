"""The method study (benchmarks/study.py): its statistics, and a toy-size run end to end that a
second invocation resumes without running anything."""
import json
import os
import random
import subprocess
import sys

import pytest

from .helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import study  # noqa: E402


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = random.Random(1)
    values = [float(rng.random() < 0.5) for _ in range(400)]
    mean, low, high = study.bootstrap_ci(values)
    assert mean == sum(values) / 400
    half = 1.96 * (mean * (1 - mean) / 400) ** 0.5  # ~0.049
    assert low == pytest.approx(mean - half, abs=0.01) and high == pytest.approx(mean + half, abs=0.01)
    assert study.bootstrap_ci([1.0] * 50) == (1.0, 1.0, 1.0)


def test_paired_difference():
    ref = {f"q{i}": float(i % 2) for i in range(100)}
    assert study.paired_difference(ref, ref) == (0.0, 0.0, 0.0, 1.0)
    flipped = {q: 1.0 - v for q, v in ref.items()}  # right exactly where ref is wrong: no mean change
    mean, low, high, p = study.paired_difference(flipped, ref)
    assert mean == 0.0 and low < 0 < high and p > 0.5
    better = {q: 1.0 for q in ref}  # +0.5 on average, every difference >= 0
    mean, low, high, p = study.paired_difference(better, ref)
    assert mean == 0.5 and 0.38 < low < 0.5 < high < 0.62 and p == 0.0


def test_seed_question_difference_matches_a_loop_and_carries_seed_variance():
    import numpy as np

    rng = random.Random(2)
    qs = [f"q{i}" for i in range(60)]
    arm = [{q: rng.random() < p for q in qs} for p in (0.9, 0.3, 0.6)]
    ref = [{q: rng.random() < 0.5 for q in qs} for _ in range(3)]
    mean, low, high, p = study.seed_question_difference(arm, ref, seed=5)
    # The same resamples drawn and averaged one by one.
    g = np.random.default_rng(5)
    seed_draws, question_draws = g.integers(0, 3, (study.BOOTSTRAP, 3)), g.integers(0, 60, (study.BOOTSTRAP, 60))
    naive = sorted(sum(float(arm[s][qs[j]]) - float(ref[s][qs[j]]) for s in ss for j in qq) / (3 * 60)
                   for ss, qq in zip(seed_draws, question_draws))
    assert mean == pytest.approx(sum(float(a[q]) - float(r[q]) for a, r in zip(arm, ref) for q in qs) / 180)
    assert low == pytest.approx(naive[int(0.025 * study.BOOTSTRAP)])
    assert high == pytest.approx(naive[int(0.975 * study.BOOTSTRAP) - 1])
    # Seeds that agree: about the question-only interval; seeds far apart: much wider.
    same = study.seed_question_difference([arm[0]] * 3, [ref[0]] * 3)
    pooled = study.paired_difference({q: float(arm[0][q]) for q in qs}, {q: float(ref[0][q]) for q in qs})
    assert same[0] == pooled[0] and same[1] == pytest.approx(pooled[1], abs=0.03)
    one_question_bootstrap = study.paired_difference(
        {q: sum(a[q] for a in arm) / 3 for q in qs}, {q: sum(r[q] for r in ref) / 3 for q in qs})
    assert high - low > 1.5 * (one_question_bootstrap[2] - one_question_bootstrap[1])


def test_permutation_p_counts_the_relabellings():
    # 3 vs 3 fully separated: 2 of the C(6,3) = 20 relabellings are as extreme (this one and its mirror).
    assert study.permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert study.permutation_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    # 1, 2, 4 vs 3, 5, 6 (difference 7/3): the relabellings whose sum is <= 7 or >= 14.
    assert study.permutation_p([1.0, 2.0, 4.0], [3.0, 5.0, 6.0]) == pytest.approx(4 / 20)


def test_question_scores_pool_the_seeds():
    runs = [{"accuracy": {"indomain": {"a": True, "b": False}}}, {"accuracy": {"indomain": {"a": True, "b": True}}}]
    assert study.question_scores(runs, "indomain") == {"a": 1.0, "b": 0.5}


def run_study(tmp_path, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "study.py"), "--toy", "--out",
                           str(tmp_path / "out"), "--results", str(tmp_path / "results"), *extra], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.e2e
def test_study_at_toy_size_runs_every_arm_and_resumes(tmp_path):
    proc = run_study(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = tmp_path / "results" / "study"
    steps = {p.stem: json.loads(p.read_text()) for p in (records / "steps").glob("*.json")}
    arms = list(study.ARMS)
    assert steps.keys() == {"sweep-lr0.0001", "sweep-lr0.0003", "reference", "s3ft_targets", "base",
                            *(f"{arm}-seed0" for arm in arms)}
    # The sweep's choice is the lowest final validation loss, and every run trains at it.
    chosen = min((steps[f"sweep-lr{lr}"]["val_loss"][-1], lr) for lr in (0.0001, 0.0003))[1]
    assert {steps[f"{arm}-seed0"]["lr"] for arm in arms} == {chosen}
    for arm in arms:
        r = steps[f"{arm}-seed0"]
        assert [c["epoch"] for c in r["curves"]] == ([0, 1, 2] if arm == "ntp" else [1, 2])
        assert all(set(c) == {"epoch", *(name for name, _ in study.PPL_SETS)} for c in r["curves"])
        assert len(r["accuracy"]["indomain"]) == 8 and len(r["accuracy"]["general"]) == 2  # 2 per generator
        assert len(r["train_loss"]) == 2
    # mu=0 trains the same paired batches as sftmix: the same first step (its NTP term comes from
    # the plain loss instead of the fused SFTMix one: fp32 rounding apart); the online arm's warm-up
    # epoch trains ntp's batches.
    first = {arm: json.loads(open(tmp_path / "out" / f"{arm}-seed0" / "metrics.jsonl").readline())
             for arm in ("sftmix", "sftmix_mu0")}
    assert first["sftmix"]["loss/ntp"] == pytest.approx(first["sftmix_mu0"]["loss/ntp"], rel=1e-6)
    assert first["sftmix_mu0"]["loss/mix"] == 0.0 or "loss/mix" not in first["sftmix_mu0"]
    assert steps["sftmix_online-seed0"]["train_loss"][0] == pytest.approx(steps["ntp-seed0"]["train_loss"][0],
                                                                          rel=1e-4)
    table = (tmp_path / "results" / "study.md").read_text()
    assert "Status: complete" in table
    for arm in ["base", *arms]:
        assert f"| {study.ARM_LABELS[arm]} |" in table
    assert f"| {chosen:g} |" in table and "**chosen**" in table
    assert "Where a difference comes from" in table
    for png in ("study_accuracy.png", "study_perplexity.png"):
        assert (tmp_path / "results" / png).stat().st_size > 5000

    # A second invocation finds every record and runs nothing; the report is the same.
    mtimes = {p: p.stat().st_mtime for p in (records / "steps").glob("*.json")}
    again = run_study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[study]" not in again.stdout
    assert {p: p.stat().st_mtime for p in (records / "steps").glob("*.json")} == mtimes
    assert (tmp_path / "results" / "study.md").read_text() == table

    # Records of another design are refused, naming what differs.
    design = json.loads((records / "design.json").read_text())
    (records / "design.json").write_text(json.dumps({**design, "epochs": 5}))
    refused = run_study(tmp_path)
    assert refused.returncode != 0 and "epochs: 5 -> 2" in refused.stderr
