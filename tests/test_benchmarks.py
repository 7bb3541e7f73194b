"""The benchmarks, end to end at toy sizes (tiny random model, a few examples)."""
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.e2e  # every test here launches processes


def test_throughput_benchmark_matches_trl_losses_at_toy_size(tmp_path):
    """sftmix_ds and TRL's SFTTrainer train on the same tokens in the same order: the same losses."""
    import re

    out = tmp_path / "throughput.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--models", "tiny",
                           "--seq", "128", "--steps", "3", "--warmup", "1", "--trl-variants", "padded", "padding_free",
                           "--out", str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for row in ("| sftmix_ds ntp |", "| sftmix_ds sftmix |", "| TRL SFTTrainer (padded) |",
                "| TRL SFTTrainer (padding_free) |"):
        assert row in table
    assert "MFU: model FLOPs/token = 6 * (parameters - input embedding)" in table
    diff = float(re.search(r"first 3 losses differ by at most ([0-9.e+-]+)", table).group(1))
    assert diff < 1e-4


def test_confidence_sources_benchmark_at_toy_size(tmp_path):
    """Every source runs as a whole job; online trains exactly the NTP run's tokens and scores C epochs' worth."""
    import re

    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "confidence_sources.py"), "--toy",
                           "--out", str(tmp_path / "runs"), "--results", str(results)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (results / "confidence_sources_cpu.md").read_text()
    rows = {m.group(1): [int(m.group(2)), int(m.group(3))]
            for m in re.finditer(r"^\| ([a-z ]+) \| \d+ \| [0-9.]+x \| (\d+) \| (\d+) \|$", table, re.M)}
    assert rows.keys() == {"ntp", "sftmix online", "sftmix reference", "sftmix random"}
    ntp_tokens = rows["ntp"][0]
    assert rows["sftmix online"] == [ntp_tokens, ntp_tokens]  # C=2 passes over 2 epochs' data / 2
    assert rows["sftmix random"] == [ntp_tokens, 0]
    assert rows["sftmix reference"][0] == ntp_tokens * 3 // 2  # one reference epoch more


def test_lora_benchmark_at_toy_size(tmp_path):
    import re

    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lora.py"), "--toy", "--out",
                           str(tmp_path / "runs"), "--results", str(results)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (results / "lora_cpu.md").read_text()
    for method in ("ntp", "sftmix"):
        assert re.search(rf"^\| {method} \| \d+ \| \d+ \| [0-9.]+x \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$", table, re.M)
    assert "| frozen (LoRA: dW skipped) |" in table


def test_sequence_parallel_benchmark_at_toy_size(tmp_path):
    """Two ranks sharing each sequence hold about half the activations of one rank holding it all."""
    import json

    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sequence_parallel.py"), "--lengths",
                           "256", "512", "--arch", '{"num_hidden_layers": 1, "max_position_embeddings": 1024}',
                           "--results", str(results)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((results / "sequence_parallel_cpu.json").read_text())["rows"]
    by = {(r["length"], r["sequence_parallel"]): r for r in rows}
    for length in (256, 512):
        assert by[(length, 1)]["tokens"] == by[(length, 2)]["tokens"] > length - 40
        assert 0.4 < by[(length, 2)]["activation_gb"] / by[(length, 1)]["activation_gb"] < 0.6
    assert (results / "sequence_parallel_cpu.png").stat().st_size > 0
    assert "Longest sequence under" in (results / "sequence_parallel_cpu.md").read_text()


def test_long_context_benchmark_at_toy_size(tmp_path):
    """Per token, checkpointing holds less than no checkpointing and every switch on no more than
    checkpointing (at this size what does not grow with length may set the peak); --grow doubles the
    length until its deadline."""
    import json

    results = tmp_path / "results"
    arch = '{"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 8, "num_attention_heads": 4, ' \
           '"num_key_value_heads": 1, "max_position_embeddings": 4096}'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "long_context.py"), "--lengths", "512",
                           "1024", "--variants", "none", "checkpointed", "all", "--arch", arch, "--loss-chunk-size",
                           "4", "--results", str(results)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((results / "long_context_cpu.json").read_text())
    by = {(r["variant"], r["length"]): r for r in report["rows"]}
    for length in (512, 1024):
        assert by[("none", length)]["device_gb"] > by[("checkpointed", length)]["device_gb"] >= \
            by[("all", length)]["device_gb"]
    summary = report["summary"]
    assert summary["all"]["device_bytes_per_token"] <= summary["checkpointed"]["device_bytes_per_token"] < \
        summary["none"]["device_bytes_per_token"]
    assert (results / "long_context_cpu.png").stat().st_size > 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "long_context.py"), "--grow", "tiny",
                           "--methods", "sftmix", "--start", "64", "--deadline", "95", "--results", str(results)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((results / "long_context_cpu_tiny.json").read_text())
    assert [r["length"] for r in rows if r["result"] == "ok"][:2] == [64, 128]
    assert all(r["tokens"] == 2 * r["length"] for r in rows if r["result"] == "ok")
