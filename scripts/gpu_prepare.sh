#!/usr/bin/env bash
# Builds here what the GPU check runs on a GPU machine that has no Rust toolchain, into .gpu/
# (git-ignored): the release binary, the GPU integration test binary and the Python wheel (the GPU
# machine's Python 3.12 has torch, numpy and pytest). Then, with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=560)
# (its steps are capped at about 9 minutes together; device time is 15 minutes a task).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
nice cargo build --release --locked --bin tensorbus
cp target/release/tensorbus .gpu/tensorbus
strip .gpu/tensorbus
test_bin=$(nice cargo test --release --locked -p tensorbus-cli --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and "/gpu-" in m["executable"]][-1])')
cp "$test_bin" .gpu/gpu-test
strip .gpu/gpu-test
rm -f .gpu/*.whl
PATH="$PWD/.venv/bin:$PATH" nice .venv/bin/maturin build --release --locked --zig --compatibility manylinux2014 -o .gpu >/dev/null
du -sh .gpu
