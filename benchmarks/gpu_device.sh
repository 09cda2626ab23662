#!/usr/bin/env bash
# `make gpu-check` on a lent GPU machine, in one `run` from the checkout's root with `.devdata` carried
# (`make gpu-carry` prepares it here): the device's Python lacks lmdb (and may hold another protobuf), and
# ../shared does not travel. Installs the carried wheels, runs benchmarks/gpu_check.py on the carried golden
# cases, MNIST and timing net, writes BENCHMARKS.md, and copies the log, gpu.json and BENCHMARKS.md to $OUT
# (what comes back).
# Arguments go to gpu_check.py: a dry run here is `PYTHON=.venv/bin/python bash benchmarks/gpu_device.sh
# --device cpu --quick` (the wheels are installed only where lmdb is missing, as on the device).
set -euo pipefail
out=${OUT:-/tmp/gpu-check-out}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if ! "$python" -c "import lmdb" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devdata/wheels/*.whl
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/nvidia-smi.txt" || true
"$python" benchmarks/gpu_check.py --device cuda --golden .devdata/golden --mnist .devdata/mnist \
    --timing .devdata/timing "$@" 2>&1 | tee "$out/gpu_check.log"
"$python" benchmarks/report.py
cp benchmarks/results/gpu*.json BENCHMARKS.md "$out/"
