#!/usr/bin/env bash
# The GPU figures of benchmarks/results/*_gpu.md on an offline CUDA host that has
# torch, triton and transformers (see ../shared/gpu/make-wheelhouse.sh):
#   here:  bash ../shared/gpu/make-wheelhouse.sh .whl trl==1.16.0 accelerate==1.15.0 wandb==0.31.0
#   there: bash benchmarks/gpu_run.sh [throughput.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=disabled
python3 -m pytest -q tests/test_losses.py          # the Triton kernels compiled, against the reference
python3 benchmarks/sftmix.py --full                # fused loss memory/time at M=16384, V=128256
python3 benchmarks/throughput.py "$@"              # tokens/s, MFU, memory vs TRL SFTTrainer
