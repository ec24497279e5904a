#!/usr/bin/env bash
# Runs every test of tensorbus on a fresh machine: installs what is missing, then lint, unit,
# property and multi-process tests, then a smoke run of the benchmarks (no timings asserted).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in pkg-config libzmq3-dev iproute2 etcd-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -c "import msgspec, maturin, numpy, pytest, ziglang, lmdb, posix_ipc" 2>/dev/null \
  || .venv/bin/pip install -q msgspec "maturin>=1.5,<2" numpy pytest ziglang lmdb posix-ipc
# torch from PyPI (its CUDA build runs on CPU with gloo): the torch tests, torchrun, the quick start.
.venv/bin/python -c "import torch" 2>/dev/null || { echo "== installing torch into .venv"; .venv/bin/pip install -q torch; }

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
nice cargo clippy --workspace --all-targets --locked -- -D warnings
# The GPU feature is on by default; the build without it must stay clean too.
nice cargo clippy --locked --all-targets --no-default-features -p tensorbus-cli -p tensorbus-python -- -D warnings
echo "== cargo test"
nice cargo test --workspace --locked
echo "== fuzz targets (host commands, payloads, control JSON, TCP frames), ${TENSORBUS_FUZZ_SECS:=20} s each"
TENSORBUS_FUZZ_SECS=$TENSORBUS_FUZZ_SECS nice cargo test --locked -p tensorbus-fuzz --test targets -- --nocapture --test-threads 2 2>&1 \
  | grep -E '^(fuzz |test result)'
nice cargo build --release --locked --bin tensorbus
echo "== Python package: build the portable abi3 wheel (manylinux2014, linked with zig; it carries the CLI), install it, run pytest (a fresh venv with only the wheel too)"
rm -f target/wheels/tensorbus-*.whl
PATH="$PWD/.venv/bin:$PATH" nice .venv/bin/maturin build --release --locked --zig --compatibility manylinux2014 -o target/wheels
.venv/bin/pip install -q --force-reinstall --no-deps target/wheels/tensorbus-*.whl
TENSORBUS_BIN="$PWD/target/release/tensorbus" .venv/bin/python -m pytest -q python/tests

echo "== demo and benchmark smoke runs (Rust and Python)"
./target/release/tensorbus demo --scale 32 --repeat 2 --json >/dev/null
./target/release/tensorbus bench all --smoke --out target/bench-smoke >/dev/null
TENSORBUS_BIN="$PWD/target/release/tensorbus" .venv/bin/python scripts/bench_python.py --smoke >/dev/null
echo "== all tests passed"
