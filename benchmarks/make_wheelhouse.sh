#!/usr/bin/env bash
# Wheels for the offline CUDA host (Python 3.12; torch, triton, numpy, pyarrow, pandas, accelerate,
# peft, safetensors, tokenizers, huggingface_hub installed there, an older transformers), at
# requirements.txt's pins, about 21 MB: under the 64 MiB a device call carries.
#   here:   bash benchmarks/make_wheelhouse.sh .whl        (a python with torch: deepspeed's setup imports it)
#   there:  python3 benchmarks/gpu_session.py --out "$OUT" (installs .whl/ itself)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
pin() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
binary=(pydantic pydantic-core annotated-types typing-inspection hjson "$(pin hydra-core)" "$(pin omegaconf)"
        "$(pin transformers)" "$(pin trl)" "$(pin datasets)" dill multiprocess xxhash)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d "$out" "${binary[@]}"
# Published only as source: built here as universal wheels, DeepSpeed with no compiled ops (torch's AdamW runs on GPU).
tmp=$(mktemp -d)
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" antlr4-python3-runtime==4.9.3 "$(pin deepspeed)"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$tmp"/*.tar.gz
rm -rf "$tmp"
ls "$out"
du -sh "$out"
