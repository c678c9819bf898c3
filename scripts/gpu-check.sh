#!/usr/bin/env bash
# GPU smoke test and bench of the engine, for a lent CUDA machine (which has no Rust toolchain).
#
#   scripts/gpu-check.sh build   # here: stripped release binaries with --features cuda into .gpu-bin/
#   scripts/gpu-check.sh run     # there: run them (carry .gpu-bin); CUDA toolkit from $CUDA_PATH
#
# Prints JSON lines: P2 (RK4-100 and Dopri5) with every gradient mode, each with its relative
# difference from Backprop's gradient; then the Stable Diffusion 1.5 UNet (random weights, 64×64×4
# latent, 77×768 context) forward and VJP. The first call of each shape includes fusion JIT +
# autotune (tens of seconds): it is reported as *warmup_s, apart from the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    # Stripped: the device tool carries at most 64 MiB.
    CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --features cuda --example bench_ode --example bench_unet
    mkdir -p .gpu-bin
    cp target/release/examples/bench_ode target/release/examples/bench_unet .gpu-bin/
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
    .gpu-bin/bench_unet --config sd15 --backend cuda --reps 10
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
