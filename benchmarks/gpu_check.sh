#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and no internet, in under 5 minutes, images/s of the lab's `ft` and
# `flyp` steps in bf16 against a bare loop (benchmarks/bench_throughput.py: open_clip ViT-B-16 with random weights,
# 224 px, fabricated JPEGs of ImageNet size), the peak GPU memory of each, and the data loader's images/s with 0
# workers and with the workers the lab picks by default on this machine (lib.models.default_num_workers).
#
#   benchmarks/gpu_check.sh                    # on the GPU machine, from the repository root or anywhere
#   GPU_CHECK_TINY=1 benchmarks/gpu_check.sh   # the same plumbing on the CPU: tiny sizes, mini-CLIP (seconds)
#
# PYTHON names the interpreter (default: .venv/bin/python when it exists, else python3). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 HF_HUB_OFFLINE=1
start=$(date +%s)
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
    sizes=(--model mini --device cpu --batch-size 4 --steps 3 --repeats 1 --loader-batches 6 --workers 2)
else
    command -v nvidia-smi > /dev/null || { echo "gpu_check: no nvidia-smi here; on a CPU run GPU_CHECK_TINY=1 $0" >&2; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    workers=$("$PYTHON" -c "import os; print(max(1, min(8, len(os.sched_getaffinity(0)) - 1)))")
    sizes=(--device cuda --batch-size 128 --steps 20 --repeats 2 --loader-batches 24 --workers "$workers")
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
timeout 290 "$PYTHON" -u benchmarks/bench_throughput.py --methods ft flyp "${sizes[@]}"
echo "gpu_check: $(( $(date +%s) - start )) s"
