#!/usr/bin/env bash
# Every GPU test and benchmark in one run, on a GPU machine, from what scripts/gpu_prepare.sh
# put in .gpu/. Writes its logs and tables under $OUT (default gpu-results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TENSORBUS_BIN=$PWD/.gpu/tensorbus
chmod +x .gpu/tensorbus .gpu/gpu-test
step() { echo "== $*"; }
fail() { echo "FAILED: $*"; echo 1 >"$OUT/.failed"; }
rm -f "$OUT/.failed"
{
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  # Per-process device memory while everything runs (agents should hold no more than a bucket
  # beyond their CUDA context).
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv -lms 500 >"$OUT/smi.csv" 2>&1 &
  smi=$!

  step "doctor: which data paths work on this machine"
  .gpu/tensorbus doctor || fail "doctor"

  step "Rust GPU matrix (IPC handles and virtual-memory pieces), element-exact"
  timeout 120 .gpu/gpu-test --test-threads 1 --nocapture || fail "Rust GPU matrix"

  step "Python: torch CUDA tensors, expandable segments, a thousand tensors"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/tensorbus-*.whl && export PYTHONPATH=/tmp/site
  timeout 150 python3 -m pytest -q -s -p no:cacheprovider python/tests/test_gpu.py python/tests/test_tensorbus.py -k "cuda or thousand or torch" \
    || fail "Python GPU tests"

  step "benchmarks"
  timeout 150 .gpu/tensorbus bench gpu --out "$OUT/gpu-bench.md" || fail "bench gpu"
  # Resharding on 16 cores (the development machine has 2, which caps any parallel speedup).
  timeout 90 .gpu/tensorbus bench reshard --side 2048 | tee "$OUT/reshard-16-cores.md" || fail "bench reshard"
  kill $smi 2>/dev/null
} 2>&1 | tee "$OUT/gpu-check.log"
if [ -e "$OUT/.failed" ]; then echo "== some GPU checks failed"; exit 1; fi
echo "== every GPU check passed"
