"""Every Triton kernel variant the fused loss can launch compiles for A100 and H100 (sm_80, sm_90)
with no spills: the interpreter the other loss tests use cannot see compile errors."""
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.e2e  # every test here launches processes


def test_every_triton_kernel_variant_compiles_for_real_gpus(tmp_path):
    triton = pytest.importorskip("triton")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip(f"this triton has no CUDA compiler tools ({cuobjdump} is missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "triton_compile.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_compile.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| sm_")]
    assert [r for r in rows if r[-1] != "ok |"] == []  # none failed or spilled
    compiled = {(r[0], r[1], r[2], r[3], r[4]) for r in rows}
    expected = {(f"| sm_{arch}", kernel, paired, capped, dtype)
                for arch in (80, 90) for kernel in ("_lse_kernel", "_grad_kernel") for paired in ("True", "False")
                for capped in ("True", "False") for dtype in ("bfloat16", "float16", "float32")}
    assert compiled >= expected
