#!/usr/bin/env bash
# The benchmark suite in one command: builds, runs `tensorbus bench all`, writes
# bench-results/results.{md,json} and the plot bench-results/throughput.png.
# `--smoke` runs the reduced suite (as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
nice cargo build --release --locked --bin tensorbus
./target/release/tensorbus bench all --out bench-results "$@"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q matplotlib
.venv/bin/python scripts/plot_bench.py bench-results/results.json bench-results/throughput.png
# The Python rows (torch tensors from Python next to Rust and memcpy): needs torch in .venv.
if .venv/bin/python -c "import torch, tensorbus" 2>/dev/null; then
  TENSORBUS_BIN="$PWD/target/release/tensorbus" .venv/bin/python scripts/bench_python.py --out bench-results/python.md "$@"
fi
echo "results: bench-results/results.md, bench-results/python.md, bench-results/throughput.png"
