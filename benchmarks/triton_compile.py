"""Compile every Triton kernel variant of the fused loss for real GPUs, on a machine without one.

Triton's compiler lowers a kernel to PTX and a cubin with its bundled ptxas and needs no GPU,
while the interpreter the CPU tests run the kernels in is plain Python and cannot see what the
compiler refuses. The variants are the launches `triton_kernels` makes for one chunk (paired and
unpaired rows, with and without a soft cap) in each dtype the chunk's logits can have, at
vocabularies whose sizes give every alignment the launcher can pass; each launch is specialised
as Triton's own launcher would specialise it (its binder, with the CUDA backend), then compiled
for sm_80 (A100) and sm_90 (H100/H200). Reports registers, shared memory and local memory (spills
and stack) per variant; exits 1 if any variant fails to compile or uses local memory.
Compiled kernels land in Triton's cache (~/.triton/cache), so a second run takes seconds.

    python benchmarks/triton_compile.py [--out benchmarks/results/triton_compile.md]
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud (it warns otherwise)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sftmix_ds.losses import triton_kernels  # noqa: E402

ARCHS = {80: "A100", 90: "H100/H200"}
# Vocabulary sizes by their alignment: 16-divisible with a full last block (SmolLM2, Gemma-3),
# 16-divisible with a ragged one (Llama-3), odd (GPT-2: the row stride is not 16-divisible either).
VOCABS = {"SmolLM2": 49152, "Llama-3": 128256, "Gemma-3": 262144, "GPT-2": 50257}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def chunk_launches(vocab: int, dtype: torch.dtype, cap: float, pairs: int) -> list:
    """(kernel, arguments, options) of every launch chunk_lse and chunk_grad_ make for a chunk of
    `pairs` pairs and one unpaired row (a small stand-in: only shapes, strides and dtypes matter)."""
    recorded = []

    def record(kernel, z, n_pairs, cap, *args):
        recorded.extend((kernel, a, o) for _, a, o in triton_kernels.launches(kernel, z, n_pairs, cap, *args))

    rows = 2 * pairs + 1
    z = torch.empty(rows, vocab, dtype=dtype)
    y = torch.zeros(rows, dtype=torch.long)
    lam = torch.full((pairs,), 0.5)
    real_launch = triton_kernels._launch
    triton_kernels._launch = record
    try:
        lse, lse_mix = triton_kernels.chunk_lse(z, pairs, lam, cap)
        triton_kernels.chunk_grad_(z, pairs, y, torch.ones(rows), lse, lam, lse_mix, lam, lam, cap)
    finally:
        triton_kernels._launch = real_launch
    return recorded


def specialise(kernel, arguments: tuple, options: dict, target: GPUTarget):
    """The ASTSource and compile options Triton's launcher would build for this call on `target`."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*arguments, **options)
    kwargs = dict(options, debug=False)
    compile_options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, kwargs)
    return ASTSource(kernel, signature, constexprs, attrs), compile_options


def resource_usage(cubin: bytes) -> dict:
    """REG, SHARED, LOCAL, STACK of the cubin's one function, as cuobjdump reports them."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", report)}


def variant_rows() -> list:
    """One row per distinct compiled variant: its description, resource usage or error."""
    rows = {}
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        for vocab_name, vocab in VOCABS.items():
            for dtype in DTYPES:
                for cap, pairs in itertools.product((0.0, 30.0), (1, 16)):
                    for kernel, arguments, options in chunk_launches(vocab, dtype, cap, pairs):
                        source, compile_options = specialise(kernel, arguments, options, target)
                        key = (arch, source.hash())
                        if key in rows:
                            rows[key]["vocabs"][vocab_name] = None
                            continue
                        row = dict(arch=arch, kernel=kernel.__name__, paired=options["PAIRED"],
                                   capped=options["CAPPED"], dtype=str(dtype).replace("torch.", ""),
                                   aligned=_aligned_arguments(kernel, source), vocabs={vocab_name: None})
                        try:
                            compiled = triton.compile(source, target=target, options=compile_options.__dict__)
                            row.update(resource_usage(compiled.asm["cubin"]))
                        except Exception as e:  # noqa: BLE001 (the report names every failure)
                            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"[:300]
                        rows[key] = row
    return list(rows.values())


def _aligned_arguments(kernel, source: ASTSource) -> str:
    """The arguments Triton specialised as 16-divisible (pointers: 16-byte aligned)."""
    names = [kernel.arg_names[path[0]] for path, attrs in source.attrs.items()
             if any(name == "tt.divisibility" for name, _ in attrs)]
    return ",".join(names)


def bad(row: dict) -> bool:
    return "error" in row or row.get("LOCAL", 0) > 0 or row.get("STACK", 0) > 0


def report(rows: list) -> str:
    lines = [f"# Triton kernels compiled for sm_80 and sm_90 (triton {triton.__version__}, torch {torch.__version__})",
             "",
             "`python benchmarks/triton_compile.py`: every launch of `sftmix_ds/losses/triton_kernels.py`,",
             "specialised as Triton's launcher specialises it, compiled to a cubin with Triton's bundled ptxas.",
             "LOCAL/STACK > 0 would mean spills. `aligned`: arguments specialised as 16-divisible.",
             "",
             "| arch | kernel | paired | capped | dtype | aligned | vocabularies | registers | shared | local | stack |"
             " result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = r.get("error", "spills" if bad(r) else "ok")
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['paired']} | {r['capped']} | {r['dtype']} "
                     f"| {r['aligned']} | {', '.join(r['vocabs'])} | {r.get('REG', '')} | {r.get('SHARED', '')} "
                     f"| {r.get('LOCAL', '')} | {r.get('STACK', '')} | {result} |")
    failed = sum(map(bad, rows))
    lines += ["", f"{len(rows)} variants, {failed} failed."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the report here as well as to stdout")
    args = parser.parse_args(argv)
    rows = variant_rows()
    text = report(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if any(map(bad, rows)) else 0


if __name__ == "__main__":
    sys.exit(main())
