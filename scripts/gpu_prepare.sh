#!/usr/bin/env bash
# Builds here what the GPU check runs on a GPU machine that has no Rust toolchain, into .gpu/
# (git-ignored): the release binary, the GPU integration test binary, the Python wheel, and
# pytest's wheels for Python 3.12. Then, with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540)
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
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .gpu pytest iniconfig pluggy packaging
du -sh .gpu
