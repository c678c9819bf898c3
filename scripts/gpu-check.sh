#!/usr/bin/env bash
# GPU smoke test and bench of the engine, for a lent CUDA machine (which has no Rust toolchain).
#
#   scripts/gpu-check.sh build   # here: release binaries with --features cuda into .gpu-bin/
#   scripts/gpu-check.sh run     # there: run them (carry .gpu-bin); CUDA toolkit from $CUDA_PATH
#
# Prints JSON lines: P2 (RK4-100 and Dopri5) with every gradient mode, each with its relative
# difference from Backprop's gradient. The first call includes fusion JIT + autotune (tens of
# seconds): it is reported as warmup_s, apart from the median.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    cargo build --release --features cuda --example bench_ode
    mkdir -p .gpu-bin
    cp target/release/examples/bench_ode .gpu-bin/
    ls -la .gpu-bin
    ;;
  run)
    export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
    export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    p2="--widths 64,256,256,64 --batch 256 --backend cuda --check --reps 10"
    for mode in backprop checkpointed backsolve; do
      .gpu-bin/bench_ode $p2 --solver rk4 --steps 100 --gradient $mode
      .gpu-bin/bench_ode $p2 --solver dopri5 --rtol 1e-6 --atol 1e-6 --gradient $mode
    done
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
