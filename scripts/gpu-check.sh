#!/usr/bin/env bash
# GPU smoke test and bench, for a lent CUDA machine (which has no Rust toolchain).
#
#   scripts/gpu-check.sh build            # here: stripped release binaries (bench_ode and
#                                         # bench_unet with --features cuda; bench_unet,
#                                         # bench_diffusion and check_ops with --features
#                                         # cuda-untuned; bench_unet with --features cuda-base,
#                                         # for unfused) in one xz archive in .gpu-bin/: xz -9
#                                         # keeps a 64 MiB window, so what the six binaries
#                                         # share (most of their code) is stored once, 225 MB
#                                         # in about 22 MiB, where gzip made five of them
#                                         # 44 MiB (the device tool carries 64 MiB, the tree
#                                         # 16 of them)
#   scripts/gpu-check.sh run [STEP...]    # there (carry .gpu-bin): the steps named, or all
#
# .gpu-bin and .gpu-cache are git-ignored, and a session's checkout starts without them: a
# session lent a GPU runs `build` first (three release builds, about 25 minutes on the 2-core machine),
# before its first device call.
#
# Steps, in the order `run` takes them, each under its own time limit (a failure or a timeout
# does not stop the rest), each followed by its peak device memory and wall time:
#   op-check    each kind of op the UNet runs (convolutions, matmul, attention, GroupNorm,
#               LayerNorm, softmax, GELU, SiLU, long mean reductions) at SD-1.5 shapes on CUDA
#               without autotune, f16 then f32, forward and input gradients against ndarray's
#               f32: to find which kernel made the UNet non-finite in f16 on CUDA (H100,
#               2026-11-27), where flex and lavapipe were not. Every op was right alone; the
#               fault was a convolution's bias in f16 (bias-check, burn-cubecl's patch 3)
#   attn-check  the small UNet at a 64×64 and a 40×40 latent on flex (this machine's CPU path),
#               then on CUDA without autotune against it (convolutions, matmuls and attention,
#               forward, VJP to the latent and five weights' gradients: every `--compare-dir`
#               reports them), to check CUDA's kernels before trusting any UNet figure
#               (H100, 2026-11-27: 9.7e-4 / 1.3e-3 at 64×64, 8.6e-4 / 1.4e-3 at 40×40)
#   unet-untuned  the Stable Diffusion 1.5 UNet (random weights, 64×64×4 latent, 77×768 context),
#               forward and VJP, f32 then f16 (with its difference from f32 and, layer by
#               layer, its largest activation and count of non-finite values: `--trace`), built
#               without autotune (`cuda-untuned`): kernels are only JIT-compiled, a warm-up of
#               17–36 s
#   unfused     the small UNet at a 32×32 latent in f16 on CUDA against flex's f32, with fusion
#               (`cuda-untuned`) and without (`cuda-base`: every op its own kernel), then the
#               SD-1.5 UNet in f16 without fusion (against unet-untuned's f32): if op-check
#               finds every op finite and accurate but the UNet is not, this tells whether
#               burn's fused kernels are the fault
#   bias-check  op-check's convolutions with a bias alone: in f32 and f16 on this build (patches
#               3 and 4), then in f32 on check_ops_nofix when the archive has one (a build without
#               them: the 4-channel weight gradient patch 4 mends)
#   unet-sdxl   the SDXL UNet (2.57B parameters, 128×128×4 latent, 77×2048 context, its added
#               conditions) forward and VJP without autotune, f32 then f16 against it; not in
#               the default steps (torch's counterpart: bench_unet_torch.py --config sdxl)
#   op-check-f32  op-check in f32 only: on an H200 (2026-11-28) the f16 half stopped making
#               progress at its 1 600-token attention and left no time for f32
#   op-check-f16, unfused-tiny, unet-f16-trace  the f16 halves alone: op-check in f16 only,
#               unfused's tiny UNet only, and unet-untuned's f16 SD-1.5 run without its f32
#               reference (each layer's largest activation and non-finite count), for a short call
#   p2          P2 (RK4-100 and Dopri5) in every gradient mode, each with its relative difference
#               from Backprop's gradient
#   p2-backsolve  P2's Backsolve rows alone (RK4-100 and Dopri5, with --check), the mode whose
#               augmented dynamics changed after the last full p2 run
#   ddim        the exact discrete adjoint of 20 DDIM steps on the SD-1.5 UNet without autotune,
#               gradient to x_T (DESIGN.md §7: PyTorch 1.84 s)
#   unet-f32    the SD-1.5 UNet forward and VJP in f32 with autotune; keeps its weights and
#               outputs for unet-f16 (its first forward took over 6 minutes to tune: carry the
#               cache and give it the whole run)
#   unet-f16    the same in f16, with its relative difference from f32 (ε and the VJP)
#   torch       PyTorch + diffusers on the same card (scripts/bench_unet_torch.py); diffusers is
#               not in the device image: download its wheel and importlib_metadata's into a
#               git-ignored .whl/ (see /work/.library/device/README.md) and carry it too
#   unet-tiny   the small UNet's forward/VJP with autotune at 64×64 and 40×40, against flex:
#               how long its warm-up takes, and whether autotune's kernels agree
#
# Warm-up: burn's CUDA backend compiles every kernel at first use and autotunes every new matmul,
# convolution and reduction shape, reported as *warmup_s apart from the medians. For a UNet that is
# minutes (H100, 2026-11-27: the SD-1.5 UNet's first forward autotuned ~60 shapes and compiled
# ~350 matmul kernels in 6 minutes without finishing). So this script defaults
# CUBECL_AUTOTUNE_LEVEL to `minimal` (set it to `balanced` for cubecl's default), logs every
# compilation and autotune choice to $OUT, and keeps cubecl's kernel (PTX) and autotune caches
# after every step in $OUT/cubecl-cache.tar.gz. Copy that file to .gpu-cache/ here and carry
# `.gpu-cache` in the session's next call (with `.gpu-bin`): `run` unpacks it first, so the next
# run starts where this one stopped. A kernel cache is only valid for the binaries that built it.
#
# GPU_CHECK_SECONDS (default 540): the time the whole run may take, the device call's timeout_s
# less a little. A step's limit is cut to what is left of it, minus 20 s to save the caches, and
# a step is skipped when under 30 s are left: a step killed by the device call's own timeout
# would lose what it tuned.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    mkdir -p .gpu-bin
    CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --features cuda-untuned \
      --example bench_unet --example bench_diffusion --example check_ops
    cp target/release/examples/bench_unet .gpu-bin/bench_unet_untuned
    cp target/release/examples/bench_diffusion .gpu-bin/bench_diffusion_untuned
    cp target/release/examples/check_ops .gpu-bin/check_ops_untuned
    CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --features cuda-base --example bench_unet
    cp target/release/examples/bench_unet .gpu-bin/bench_unet_unfused
    CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --features cuda \
      --example bench_ode --example bench_unet
    cp target/release/examples/bench_ode target/release/examples/bench_unet .gpu-bin/
    # Like binaries side by side, so that each finds the last in xz's window.
    bins=(bench_unet_untuned bench_unet bench_unet_unfused bench_diffusion_untuned check_ops_untuned bench_ode)
    (cd .gpu-bin && rm -f bins.tar.gz)
    # A check_ops built before a patch, put here by hand for a before/after, goes in too and
    # stays beside the archive for the next build (a session's checkout starts without either:
    # take it out of the last archive, `tar xJf .gpu-bin/bins.tar.xz -C .gpu-bin check_ops_nofix`).
    extra=()
    if [ -f .gpu-bin/check_ops_nofix ]; then extra=(check_ops_nofix); fi
    tar cf - -C .gpu-bin "${bins[@]}" "${extra[@]}" | xz -9 -T1 >.gpu-bin/bins.tar.xz
    (cd .gpu-bin && rm -f "${bins[@]}")
    # What they were built from: rebuild when the sources have changed since.
    git log -1 --format='%h %cd' --date=iso >.gpu-bin/built-from
    git status --porcelain -- src models examples vendor Cargo.toml Cargo.lock >>.gpu-bin/built-from
    ls -la .gpu-bin
    exit 0
    ;;
  run) shift ;;
  *)
    echo "usage: $0 build | run [op-check op-check-f16 op-check-f32 bias-check attn-check unet-untuned unet-f16-trace unet-sdxl unfused unfused-tiny p2 p2-backsolve ddim unet-f32 unet-f16 torch unet-tiny]" >&2
    exit 2
    ;;
esac

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(bias-check op-check attn-check unet-untuned unfused p2 ddim unet-f32 unet-f16 torch unet-tiny)

export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
if [ ! -d "$CUDA_PATH" ] && command -v nvcc >/dev/null; then
  CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")")
fi
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "{\"steps\": \"${steps[*]}\", \"autotune_level\": \"$CUBECL_AUTOTUNE_LEVEL\"}"
echo "binaries built from: $(cat .gpu-bin/built-from 2>/dev/null || echo unknown)"
# The device image may lack xz; Python's tarfile reads the archive too.
if command -v xz >/dev/null; then
  tar xJf .gpu-bin/bins.tar.xz -C .gpu-bin
else
  python3 -m tarfile -e .gpu-bin/bins.tar.xz .gpu-bin
fi
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
if [ -f .gpu-cache/cubecl-cache.tar.gz ]; then
  tar xzf .gpu-cache/cubecl-cache.tar.gz
  echo "{\"cache\": \"unpacked .gpu-cache/cubecl-cache.tar.gz\"}"
fi

# cubecl reads cubecl.toml from the working directory (git-ignored): compiled kernels and
# autotune results go to .gpu-cache/cubecl, each compilation and autotune choice to a log.
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

# Runs a command under a time limit, sampling device memory every 20 ms: prints the peak minus
# what was in use before (the CUDA context and the allocator's pool included, as PyTorch's
# reserved figure includes its pool) and the wall time.
# The time a step may take: its own limit cut to what is left of GPU_CHECK_SECONDS less 20 s to
# save the caches; 0 (skip it) when under 30 s would be left.
budget() {
  local left=$((deadline - SECONDS - 20))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$1" -le "$left" ]; then echo "$1"; else echo "$left"; fi
}
skipped() { echo "{\"skipped\": \"$*\", \"why\": \"under 30 s left of GPU_CHECK_SECONDS\"}"; }

peak() {
  local limit
  limit=$(budget "$1")
  shift
  if [ "$limit" -eq 0 ]; then
    skipped "$@"
    return 0
  fi
  local base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >/tmp/mem.txt &
  local poll=$!
  local t0=$SECONDS
  timeout "$limit" "$@" || echo "{\"failed\": \"$1\", \"rc\": $?}"
  kill "$poll" 2>/dev/null || true
  echo "{\"peak_device_mib\": $(($(sort -n /tmp/mem.txt | tail -1) - base)), \"wall_s\": $((SECONDS - t0)), \"of\": \"$*\"}"
  save_cache
}

# The tiny UNet's weights, ε and VJP on flex (this machine's CPU path) at a $1×$1 latent, saved
# once per run in /tmp/tiny-ref-$1 for --compare-dir; status 1 when there is no time left.
tiny_ref() {
  local ref=/tmp/tiny-ref-$1 limit
  [ -d "$ref" ] && return 0
  limit=$(budget 120)
  if [ "$limit" -eq 0 ]; then
    skipped "flex reference at $1×$1"
    return 1
  fi
  timeout "$limit" .gpu-bin/bench_unet_untuned --config tiny --size "$1" --reps 1 --save-dir "$ref" ||
    { rm -rf "$ref"; return 1; }
}

sd=/tmp/sd15
for step in "${steps[@]}"; do
  case $step in
    # Op by op against ndarray's f32 on the same seeded data: the UNet's ε and VJP are not
    # finite in f16 on CUDA, but are on flex and lavapipe (README, On a GPU).
    # The convolutions with a bias, in f16 and f32, on this build and (when the archive has it)
    # on `check_ops_nofix`, built without burn-cubecl's patch 3 (vendor/README.md): the bias
    # inside cubek's implicit GEMM made conv_in NaN in f16 on CUDA (H100, 2026-11-28).
    # After both patches first (patch 4 is the f32 weight gradient of the 4-channel cases), then
    # before them in f32 for the before/after on the same card (the f16 before is in the README).
    bias-check)
      for run in "check_ops_untuned f32" "check_ops_untuned f16" "check_ops_nofix f32"; do
        set -- $run
        [ -x .gpu-bin/$1 ] || continue
        peak 75 .gpu-bin/$1 --backend cuda --dtype $2 --only bias
      done
      ;;
    op-check | op-check-f16 | op-check-f32)
      case $step in
        op-check) dtypes=(f16 f32) ;;
        *) dtypes=("${step#op-check-}") ;;
      esac
      for dtype in "${dtypes[@]}"; do
        peak 150 .gpu-bin/check_ops_untuned --backend cuda --dtype $dtype
      done
      ;;
    # The tiny UNet at a 64×64 latent (4096-token self-attention) and at 40×40 (1600 tokens,
    # not a multiple of a kernel tile) on CUDA against flex on the same weights, ε and VJP:
    # the CUDA timings mean nothing until this agrees. Without autotune, attention on CUDA is
    # burn-cubecl's composed fallback, in the VJP's forward too.
    attn-check)
      for size in 64 40; do
        tiny_ref $size && peak 180 .gpu-bin/bench_unet_untuned --config tiny --size $size \
          --backend cuda --reps 1 --compare-dir /tmp/tiny-ref-$size
      done
      ;;
    # f16 on CUDA held NaN or Inf in the tiny UNet at 32×32 and the SD-1.5 UNet (H100,
    # 2026-11-27, with fusion). The same binary set, with and without burn's fusion.
    unfused | unfused-tiny)
      if tiny_ref 32; then
        for bin in bench_unet_untuned bench_unet_unfused; do
          peak 120 .gpu-bin/$bin --config tiny --size 32 --backend cuda --reps 3 --dtype f16 \
            --compare-dir /tmp/tiny-ref-32 --trace
        done
      fi
      [ "$step" = unfused ] || continue
      # With unet-untuned's f32 run before it, also its difference from f32.
      sd_ref=()
      if [ -d $sd-untuned ]; then sd_ref=(--compare-dir $sd-untuned); fi
      peak 200 .gpu-bin/bench_unet_unfused --config sd15 --backend cuda --reps 2 --dtype f16 --trace \
        "${sd_ref[@]}"
      ;;
    # Autotuned, against flex on the same weights: through wgpu/lavapipe, autotune's pick of
    # cubek's double-buffered unit matmul made the tiny UNet 15% wrong at 40×40 until the vendored
    # burn-cubecl stopped offering it (README, Benchmarks); CUDA's autotuned kernels unchecked.
    unet-tiny)
      for size in 64 40; do
        tiny_ref $size && peak 120 .gpu-bin/bench_unet --config tiny --backend cuda --size $size \
          --reps 10 --compare-dir /tmp/tiny-ref-$size
      done
      ;;
    unet-untuned)
      peak 150 .gpu-bin/bench_unet_untuned --config sd15 --backend cuda --reps 10 --save-dir $sd-untuned
      peak 150 .gpu-bin/bench_unet_untuned --config sd15 --backend cuda --reps 10 --dtype f16 \
        --compare-dir $sd-untuned --trace
      ;;
    unet-f16-trace)
      peak 150 .gpu-bin/bench_unet_untuned --config sd15 --backend cuda --reps 3 --dtype f16 --trace
      ;;
    unet-sdxl)
      peak 150 .gpu-bin/bench_unet_untuned --config sdxl --backend cuda --reps 5 --save-dir $sd-sdxl
      peak 150 .gpu-bin/bench_unet_untuned --config sdxl --backend cuda --reps 5 --dtype f16 --compare-dir $sd-sdxl
      ;;
    unet-f32) peak 540 .gpu-bin/bench_unet --config sd15 --backend cuda --reps 10 --save-dir $sd ;;
    unet-f16)
      if [ -d $sd ]; then
        peak 540 .gpu-bin/bench_unet --config sd15 --backend cuda --reps 10 --dtype f16 --compare-dir $sd
      else
        peak 540 .gpu-bin/bench_unet --config sd15 --backend cuda --reps 10 --dtype f16
      fi
      ;;
    torch)
      if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
          PYTHONPATH=/tmp/site peak 120 python3 scripts/bench_unet_torch.py --config sd15 --dtype f32 f16
      else
        echo '{"skipped": "torch: no .whl folder with the diffusers wheel"}'
      fi
      ;;
    ddim)
      peak 300 .gpu-bin/bench_diffusion_untuned --config sd15 --backend cuda --size 64 --steps 20 \
        --gradient checkpointed --frozen-weights --reps 2
      ;;
    p2)
      p2="--widths 64,256,256,64 --batch 256 --backend cuda --check --reps 10"
      for mode in backprop checkpointed backsolve; do
        peak 90 .gpu-bin/bench_ode $p2 --solver rk4 --steps 100 --gradient $mode
        peak 90 .gpu-bin/bench_ode $p2 --solver dopri5 --rtol 1e-6 --atol 1e-6 --gradient $mode
      done
      ;;
    p2-backsolve)
      p2="--widths 64,256,256,64 --batch 256 --backend cuda --check --reps 10 --gradient backsolve"
      peak 90 .gpu-bin/bench_ode $p2 --solver rk4 --steps 100
      peak 90 .gpu-bin/bench_ode $p2 --solver dopri5 --rtol 1e-6 --atol 1e-6
      ;;
    *) echo "{\"unknown_step\": \"$step\"}" ;;
  esac
done
