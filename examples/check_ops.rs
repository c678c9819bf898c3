//! Each kind of op the UNet runs, at Stable Diffusion 1.5 shapes, forward and gradients to its
//! inputs, on a backend and float dtype against ndarray in f32 on the same seeded data. Prints one
//! JSON line per op: whether its output and gradients are finite, and their relative
//! differences ‖a − b‖ / ‖b‖ from ndarray's f32 (a CPU implementation apart from flex, whose
//! default dtype cannot change once it has run).
//!
//! ```text
//! cargo run --release --example check_ops -- --dtype f16               # flex itself in f16
//! cargo run --release --features cuda-untuned --example check_ops -- --backend cuda --dtype f16
//! ```
//! It was written to find which kernel made the UNet's ε and VJP non-finite in f16 on CUDA (H100,
//! 2026-11-27), where flex and wgpu/lavapipe stayed finite. Every op alone was right; the cases
//! with a bias found it (cubek's implicit-GEMM convolution adding an f16 bias, burn-cubecl's
//! patch 3), and their f32 weight gradients a second fault (4 input channels, patch 4). Cases
//! with `scale` > 1 multiply their input, to see the range of f16 (largest finite value 65504)
//! as well as its rounding.

use std::time::Instant;

use adjoint_dpm_models::activation::{gelu_exact, silu_exact};
use adjoint_dpm_models::norm::{group_norm, layer_norm};
use burn::backend::{Autodiff, NdArray};
use burn::nn::{GroupNormConfig, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::module::{attention, conv2d};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{activation::softmax, TensorData};
use clap::Parser;

mod common;
use common::{rel_diff, set_precision, BackendName, Precision};

#[derive(Parser, Debug)]
#[command(about = "UNet ops against ndarray f32; one JSON line per op")]
struct Args {
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendName,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: Precision,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

/// One op with the shapes of its inputs; `scale` multiplies the first input.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// 3×3 convolution, padding 1, weights scaled by 1/√fan_in; with `bias`, a third input of
    /// shape `[1, 1, 1, out]` is the bias (the UNet's convolutions all have one).
    Conv3x3 { stride: usize, bias: bool },
    /// 1×1 convolution (ResNet shortcuts, `proj_in`/`proj_out` as convolutions).
    Conv1x1,
    /// A linear layer's product (attention projections, feed-forward).
    Matmul,
    /// burn's attention (the backend's native kernel), heads on axis 1.
    Attention,
    /// The models' GroupNorm (32 groups, affine at its initial γ = 1, β = 0).
    GroupNorm,
    /// The models' LayerNorm (burn's, widened to f32 for half precision) over the last axis.
    LayerNorm,
    /// Softmax over the last axis.
    Softmax,
    /// `mean(x²)` over the last axis: a bare reduction, as the norms' statistics are.
    MeanSquare,
    /// The models' exact GELU (erf).
    Gelu,
    /// The models' SiLU, `x / (1 + e^(−x))` written as `x · recip(1 + exp(−x))`.
    Silu,
}

struct Case {
    name: &'static str,
    op: Op,
    shapes: &'static [[usize; 4]],
    scale: f64,
}

const fn case(name: &'static str, op: Op, shapes: &'static [[usize; 4]], scale: f64) -> Case {
    Case {
        name,
        op,
        shapes,
        scale,
    }
}

// One case a line: a table reads better unwrapped.
#[rustfmt::skip]
const CASES: &[Case] = &[
    // With a bias: in f16 on CUDA these were 0.70 to 5.6 off (H100, 2026-11-28; the UNet's
    // conv_in held NaN) until burn-cubecl's patch 3 added the bias after the convolution.
    case("conv3x3 4→320 64×64 + bias (conv_in)", Op::Conv3x3 { stride: 1, bias: true }, &[[1, 4, 64, 64], [320, 4, 3, 3], [1, 1, 1, 320]], 1.0),
    case("conv3x3 4→32 32×32 + bias (tiny conv_in)", Op::Conv3x3 { stride: 1, bias: true }, &[[1, 4, 32, 32], [32, 4, 3, 3], [1, 1, 1, 32]], 1.0),
    case("conv3x3 320→320 64×64 + bias", Op::Conv3x3 { stride: 1, bias: true }, &[[1, 320, 64, 64], [320, 320, 3, 3], [1, 1, 1, 320]], 1.0),
    case("conv3x3 320→320 64×64", Op::Conv3x3 { stride: 1, bias: false }, &[[1, 320, 64, 64], [320, 320, 3, 3]], 1.0),
    case("conv3x3 4→320 64×64 (conv_in)", Op::Conv3x3 { stride: 1, bias: false }, &[[1, 4, 64, 64], [320, 4, 3, 3]], 1.0),
    case("conv3x3 stride 2 320→320 64×64", Op::Conv3x3 { stride: 2, bias: false }, &[[1, 320, 64, 64], [320, 320, 3, 3]], 1.0),
    case("conv3x3 1280→1280 8×8", Op::Conv3x3 { stride: 1, bias: false }, &[[1, 1280, 8, 8], [1280, 1280, 3, 3]], 1.0),
    case("conv1x1 640→320 32×32", Op::Conv1x1, &[[1, 640, 32, 32], [320, 640, 1, 1]], 1.0),
    case("matmul 4096×320 · 320×1280", Op::Matmul, &[[1, 1, 4096, 320], [1, 1, 320, 1280]], 1.0),
    // Batched with k = 8 or 40: cubek's double-buffered unit matmul got these wrong (vendor/README.md).
    case("batched matmul 4×1024×8 · 8×8", Op::Matmul, &[[1, 4, 1024, 8], [1, 4, 8, 8]], 1.0),
    case("batched matmul 8×4096×40 · 40×77", Op::Matmul, &[[1, 8, 4096, 40], [1, 8, 40, 77]], 1.0),
    case("self-attention 8 heads 4096×40", Op::Attention, &[[1, 8, 4096, 40], [1, 8, 4096, 40], [1, 8, 4096, 40]], 1.0),
    case("self-attention 8 heads 1600×40", Op::Attention, &[[1, 8, 1600, 40], [1, 8, 1600, 40], [1, 8, 1600, 40]], 1.0),
    case("cross-attention 8 heads 4096×40, 77 keys", Op::Attention, &[[1, 8, 4096, 40], [1, 8, 77, 40], [1, 8, 77, 40]], 1.0),
    case("self-attention, scores ×8", Op::Attention, &[[1, 8, 1024, 40], [1, 8, 1024, 40], [1, 8, 1024, 40]], 8.0),
    case("group norm 320 ch 64×64", Op::GroupNorm, &[[1, 320, 64, 64]], 1.0),
    case("group norm 320 ch 64×64, x×100", Op::GroupNorm, &[[1, 320, 64, 64]], 100.0),
    case("group norm 320 ch 64×64, x×300", Op::GroupNorm, &[[1, 320, 64, 64]], 300.0),
    case("layer norm 4096×320", Op::LayerNorm, &[[1, 1, 4096, 320]], 1.0),
    case("layer norm 4096×320, x×300", Op::LayerNorm, &[[1, 1, 4096, 320]], 300.0),
    case("softmax 8×4096×77", Op::Softmax, &[[1, 8, 4096, 77]], 1.0),
    // A row past 65 535 loop iterations of one unit (lavapipe cut it there: README, On a GPU).
    case("mean square over 655 360", Op::MeanSquare, &[[1, 1, 1, 655_360]], 1.0),
    case("mean square over 40 960", Op::MeanSquare, &[[1, 32, 1, 40_960]], 1.0),
    case("gelu 320×64×64", Op::Gelu, &[[1, 320, 64, 64]], 1.0),
    case("silu 320×64×64", Op::Silu, &[[1, 320, 64, 64]], 1.0),
    case("silu 320×64×64, x×20", Op::Silu, &[[1, 320, 64, 64]], 20.0),
];

impl Op {
    fn apply<B: Backend>(self, mut x: Vec<Tensor<B, 4>>, device: &B::Device) -> Tensor<B, 4> {
        let first = x.remove(0);
        match self {
            Op::Conv3x3 { stride, bias } => {
                let weight = x.remove(0);
                let bias = bias.then(|| x.remove(0).flatten::<1>(0, 3));
                conv2d(first, weight, bias, ConvOptions::new([stride; 2], [1, 1], [1, 1], 1))
            }
            Op::Conv1x1 => conv2d(first, x.remove(0), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1)),
            Op::Matmul => first.matmul(x.remove(0)),
            Op::Attention => {
                let (k, v) = (x.remove(0), x.remove(0));
                attention(first, k, v, None, None, AttentionModuleOptions::default())
            }
            Op::GroupNorm => {
                let channels = first.dims()[1];
                group_norm(&GroupNormConfig::new(32, channels).init(device), first)
            }
            Op::LayerNorm => layer_norm(&LayerNormConfig::new(first.dims()[3]).init(device), first),
            Op::Softmax => softmax(first, 3),
            Op::MeanSquare => first.square().mean_dim(3),
            Op::Gelu => gelu_exact(first),
            Op::Silu => silu_exact(first),
        }
    }

    /// Weights (every input after the first of a convolution or matmul) are scaled by 1/√fan_in,
    /// as a layer's initialisation does, so outputs stay of order one.
    fn input_scale(self, index: usize, shape: [usize; 4], scale: f64) -> f64 {
        match (self, index) {
            (_, 0) => scale,
            (Op::Conv3x3 { .. } | Op::Conv1x1, 1) => 1.0 / ((shape[1] * shape[2] * shape[3]) as f64).sqrt(),
            (Op::Matmul, _) => 1.0 / (shape[2] as f64).sqrt(),
            _ => 1.0,
        }
    }
}

/// Output and the gradient of ⟨output, w⟩ to every input, as f32 on the host.
struct Outcome {
    out: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

/// Seeded normal values made on ndarray, so every backend and dtype gets the same data (and the
/// flex device is untouched until its dtype is set).
fn seeded_normal(shape: [usize; 4], seed: u64, scale: f64) -> TensorData {
    let device = Default::default();
    NdArray::<f32>::seed(&device, seed);
    Tensor::<NdArray<f32>, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device)
        .mul_scalar(scale)
        .into_data()
}

fn evaluate<B: Backend>(case: &Case, device: &B::Device) -> Result<Outcome, String> {
    let inputs: Vec<Tensor<Autodiff<B>, 4>> = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, &shape)| {
            let data = seeded_normal(shape, 10 + i as u64, case.op.input_scale(i, shape, case.scale));
            Tensor::from_data(data, device).require_grad()
        })
        .collect();
    let out = case.op.apply(inputs.clone(), device);
    let w = Tensor::<Autodiff<B>, 4>::from_data(seeded_normal(out.dims(), 99, 1.0), device);
    let grads = (out.clone() * w).sum().backward();
    let host = |d: TensorData| d.convert::<f32>().to_vec::<f32>().map_err(|e| format!("{e:?}"));
    let grads = inputs
        .iter()
        .map(|x| host(x.grad(&grads).ok_or("an input got no gradient")?.into_data()))
        .collect::<Result<_, _>>()?;
    Ok(Outcome {
        out: host(out.into_data())?,
        grads,
    })
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

fn main() {
    let args = Args::parse();
    common::run_on!(args.backend, run, &args);
}

fn run<B: Backend>(args: &Args) -> Result<(), String> {
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| args.only.as_ref().is_none_or(|s| c.name.contains(s.as_str())))
        .collect();
    let cpu = Default::default();
    let references = cases
        .iter()
        .map(|c| evaluate::<NdArray<f32>>(c, &cpu))
        .collect::<Result<Vec<_>, _>>()?;
    let device = B::Device::default();
    set_precision::<B>(&device, args.dtype)?;
    for (case, reference) in cases.iter().zip(&references) {
        let start = Instant::now();
        let got = evaluate::<B>(case, &device)?;
        let line = serde_json::json!({
            "op": case.name, "backend": format!("{:?}", args.backend).to_lowercase(),
            "dtype": format!("{:?}", args.dtype).to_lowercase(),
            "finite": finite(&got.out), "grads_finite": got.grads.iter().map(|g| finite(g)).collect::<Vec<_>>(),
            "rel_diff": rel_diff(&got.out, &reference.out)?,
            "grad_rel_diffs": got.grads.iter().zip(&reference.grads).map(|(g, r)| rel_diff(g, r)).collect::<Result<Vec<_>, _>>()?,
            "reference_finite": finite(&reference.out) && reference.grads.iter().all(|g| finite(g)),
            "seconds_with_warmup": start.elapsed().as_secs_f64(),
        });
        println!("{line}");
    }
    Ok(())
}
