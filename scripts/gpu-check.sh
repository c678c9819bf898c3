#!/usr/bin/env bash
# GPU smoke test and bench of the engine, for a lent CUDA machine (which has no Rust toolchain).
#
#   scripts/gpu-check.sh build   # here: stripped release binaries with --features cuda into .gpu-bin/
#   scripts/gpu-check.sh run     # there: run them (carry .gpu-bin); CUDA toolkit from $CUDA_PATH
#
# The PyTorch baseline (scripts/bench_unet_torch.py) needs diffusers, which the device image lacks:
# download its wheel and importlib_metadata's into a git-ignored .whl/ and carry it too. The run
# leaves cubecl's compilation/autotune logs and its kernel caches (cubecl-cache.tar.gz) in $OUT.
#
# Prints JSON lines: the Stable Diffusion 1.5 UNet (random weights, 64×64×4 latent, 77×768
# context) forward and VJP in f32 and f16 (with f16's difference from f32 on the same weights) and
# PyTorch + diffusers doing the same on the same card; then P2 (RK4-100 and Dopri5) with every
# gradient mode, each with its relative difference from Backprop's gradient. Each is followed by
# its peak device memory. The first call of each shape includes fusion JIT +
# autotune (tens of seconds): it is reported as *warmup_s, apart from the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    # Stripped and gzipped: the device tool carries at most 64 MiB (three ~40 MB binaries).
    CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --features cuda \
      --example bench_ode --example bench_unet --example bench_diffusion
    mkdir -p .gpu-bin
    tar czf .gpu-bin/bins.tar.gz -C target/release/examples bench_ode bench_unet bench_diffusion
    ls -la .gpu-bin
    ;;
  run)
    # Each step runs under its own time limit and a failure does not stop the rest. Budget: the
    # 2026-11-26 H100 run spent its whole 200 s limit in the SD-1.5 UNet's first forward (GPU
    # idle, host compiling/autotuning kernels) and 60 s in the tiny one's, so the UNet gets long
    # limits, a compilation/autotune log, and caches that a later run (or session) can reuse.
    export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
    if [ ! -d "$CUDA_PATH" ] && command -v nvcc >/dev/null; then
      CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")")
    fi
    export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    tar xzf .gpu-bin/bins.tar.gz -C .gpu-bin
    out=${OUT:-/tmp/gpu-check}
    mkdir -p "$out"
    # cubecl reads cubecl.toml from the working directory (git-ignored): keep compiled PTX and
    # autotune results in .gpu-cache/cubecl, log each compilation and each autotune choice.
    # $out/cubecl-cache.tar.gz holds that folder afterwards: unpack it here (tar xzf, in the
    # repository root) and carry .gpu-cache next time to skip most of the warm-up.
    cache="$PWD/.gpu-cache/cubecl"
    mkdir -p "$cache"
    cat >cubecl.toml <<TOML
[compilation]
cache = { file = "$cache" }
[compilation.logger]
level = "basic"
file = "$out/cubecl-compilation.log"
[autotune]
cache = { file = "$cache" }
[autotune.logger]
level = "minimal"
file = "$out/cubecl-autotune.log"
TOML
    save_cache() { tar czf "$out/cubecl-cache.tar.gz" .gpu-cache/cubecl || true; }
    # Peak device memory of one command: nvidia-smi sampled every 20 ms, minus what was in use
    # before (so it counts the CUDA context and the allocator's pool, as PyTorch's reserved does).
    peak() {
      local limit=$1; shift
      local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >/tmp/mem.txt &
      local poll=$!
      local t0=$SECONDS
      timeout "$limit" "$@" || echo "{\"failed\": \"$1\", \"rc\": $?}"
      kill "$poll" 2>/dev/null || true
      echo "{\"peak_device_mib\": $(( $(sort -n /tmp/mem.txt | tail -1) - base )), \"wall_s\": $(( SECONDS - t0 )), \"of\": \"$*\"}"
      save_cache
    }
    peak 120 .gpu-bin/bench_unet --config tiny --backend cuda --reps 10
    sd=/tmp/sd15
    peak 400 .gpu-bin/bench_unet --config sd15 --backend cuda --reps 10 --save-dir $sd
    peak 300 .gpu-bin/bench_unet --config sd15 --backend cuda --reps 10 --dtype f16 --compare-dir $sd
    rm -rf $sd
    if [ -d .whl ]; then  # diffusers is not on the machine: carry its wheel (see notes above)
      export PYTHONPATH=/tmp/site
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        peak 120 python3 scripts/bench_unet_torch.py --config sd15 --dtype f32 f16
    fi
    # The exact discrete adjoint of 20 DDIM steps, gradient to x_T (DESIGN.md §7: PyTorch 1.84 s).
    peak 300 .gpu-bin/bench_diffusion --config sd15 --backend cuda --size 64 --steps 20 \
      --gradient checkpointed --frozen-weights --reps 2
    p2="--widths 64,256,256,64 --batch 256 --backend cuda --check --reps 10"
    for mode in backprop checkpointed backsolve; do
      peak 90 .gpu-bin/bench_ode $p2 --solver rk4 --steps 100 --gradient $mode
      peak 90 .gpu-bin/bench_ode $p2 --solver dopri5 --rtol 1e-6 --atol 1e-6 --gradient $mode
    done
    ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
