//! Forward and VJP time of a diffusers UNet (random weights) at a given config: the per-step cost
//! floor of every sampler gradient. Prints one JSON line.
//!
//! ```text
//! cargo run --release --example bench_unet -- --config tiny
//! # Stable Diffusion 1.5 size on a GPU (64×64×4 latent, 77×768 context):
//! cargo run --release --features cuda --example bench_unet -- --config sd15 --backend cuda
//! ```
//! The VJP is one forward with a graph plus one backward of ⟨ε, w⟩ to the latent and every weight,
//! as the adjoint needs per step. The first call of a new shape on CUDA JIT-compiles and
//! autotunes: it is reported as `warmup_s`, apart from the medians.
//!
//! `--dtype f16` makes f16 the device's float dtype (weights, activations, gradients). To see what
//! f16 costs in accuracy, run f32 with `--save-dir D` (writes the random weights, ε and the VJP to
//! the latent), then f16 with `--compare-dir D`: it loads the same weights through the checkpoint
//! loader (f32 → f16 cast) and reports `rel_diff_vs_f32` = ‖ε₁₆ − ε₃₂‖ / ‖ε₃₂‖,
//! `grad_rel_diff_vs_f32`, the same for the VJP to the latent, and `weight_grad_rel_diffs_vs_f32`
//! for the gradients of five weights (`conv_in`'s and `conv_out`'s weight and bias, the time
//! MLP's first layer). The same compares two backends on the same dtype. Inputs are seeded, so
//! both runs see the same latent, timestep, context and cotangent.

use std::time::Instant;

use std::path::PathBuf;

use adjoint_dpm_models::load::{load_safetensors, save_safetensors, KeyMap};
use adjoint_dpm_models::unet::{AddedConditions, UnetConditions};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorData;
use clap::Parser;

mod common;
use common::{finish, rel_diff, set_precision, BackendName, Precision, UnetSize};

#[derive(Parser, Debug)]
#[command(about = "UNet forward and VJP timing; prints one JSON line")]
struct Args {
    #[arg(long, value_enum, default_value = "tiny")]
    config: UnetSize,
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendName,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Latent height = width (default: 16 for tiny, 64 for sd15, 128 for sdxl).
    #[arg(long)]
    size: Option<usize>,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Float dtype of weights and activations.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Write the weights (`unet.safetensors`), and ε and the latent's VJP on the seeded inputs
    /// (`outputs.json`), here.
    #[arg(long)]
    save_dir: Option<PathBuf>,
    /// Load the weights from a `--save-dir` folder and report the difference from its ε and VJP.
    #[arg(long)]
    compare_dir: Option<PathBuf>,
    /// Before the summary, one JSON line per layer of one more forward (`forward_observed`):
    /// its largest finite |value| and how many values are not finite, to see where activations
    /// outgrow the dtype or turn NaN.
    #[arg(long)]
    trace: bool,
}

fn main() {
    let args = Args::parse();
    common::run_on!(args.backend, run, &args);
}

/// Seeded standard-normal values made on the CPU, so every backend and dtype gets the same inputs.
fn seeded_normal<const D: usize>(shape: [usize; D], seed: u64) -> TensorData {
    let device = Default::default();
    Flex::seed(&device, seed);
    Tensor::<Flex, D>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device).into_data()
}

fn run<B: Backend>(args: &Args) -> Result<(), String> {
    let device = B::Device::default();
    set_precision::<B>(&device, args.dtype)?;
    let (config, size, context_dim) = args.config.config()?;
    let size = args.size.unwrap_or(size);
    let tokens = match args.config {
        UnetSize::Tiny => 8,
        UnetSize::Sd15 | UnetSize::Sdxl => 77,
    };
    // Progress on stderr, so that a run stopped by a time limit still says where its time went
    // (on CUDA the first forward and VJP JIT-compile and autotune every kernel shape).
    let start = Instant::now();
    let phase = |what: &str| eprintln!("[{:7.1} s] {what}", start.elapsed().as_secs_f64());
    phase("initialising the UNet");
    let unet = config.init::<Autodiff<B>>(&device).map_err(|e| e.to_string())?;
    let unet = adjoint_dpm::ode::materialized(unet);
    let unet = match &args.compare_dir {
        Some(dir) => load_safetensors(unet, dir.join("unet.safetensors"), &KeyMap::new()).map_err(|e| e.to_string())?,
        None => unet,
    };
    let params = burn::module::Module::num_params(&unet);
    let batch = args.batch;
    let sample = Tensor::<Autodiff<B>, 4>::from_data(seeded_normal([batch, 4, size, size], 1), &device);
    let context = Tensor::<Autodiff<B>, 3>::from_data(seeded_normal([batch, tokens, context_dim], 2), &device);
    let t = Tensor::<Autodiff<B>, 1>::from_data(vec![500.0f32; batch].as_slice(), &device);
    let w = Tensor::<Autodiff<B>, 4>::from_data(seeded_normal([batch, 4, size, size], 3), &device);
    // SDXL's added conditions: a pooled embedding and the sizes of an uncropped 1024² image.
    let added = unet.takes_added_conditions().map(|width| AddedConditions {
        text_embeds: Tensor::<Autodiff<B>, 2>::from_data(seeded_normal([batch, width], 4), &device),
        time_ids: Tensor::from_data(
            TensorData::new([1024.0f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0].repeat(batch), [batch, 6]),
            &device,
        ),
    });
    let inner_added = || {
        added.clone().map(|a| AddedConditions {
            text_embeds: a.text_embeds.inner(),
            time_ids: a.time_ids.inner(),
        })
    };
    let inner = burn::module::AutodiffModule::valid(&unet);
    phase("initialised; first forward (warm-up)");

    let forward = || {
        let start = Instant::now();
        let out = inner.forward_added(
            sample.clone().inner(),
            t.clone().inner(),
            context.clone().inner(),
            None,
            inner_added(),
        );
        finish("forward", out)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let vjp = || {
        let start = Instant::now();
        let x = sample.clone().require_grad();
        let out = unet.forward_added(x.clone(), t.clone(), context.clone(), None, added.clone());
        let grads = (out * w.clone()).sum().backward();
        if let Some(g) = x.grad(&grads) {
            finish("VJP", g)?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let timed = |f: &dyn Fn() -> Result<f64, String>| -> Result<(f64, f64), String> {
        let warmup = f()?;
        let mut v = (0..args.reps.max(1))
            .map(|_| f())
            .collect::<Result<Vec<f64>, String>>()?;
        v.sort_by(f64::total_cmp);
        Ok((v[v.len() / 2], warmup))
    };
    let (forward_s, forward_warmup_s) = timed(&forward)?;
    phase("forward timed; first VJP (warm-up)");
    let (vjp_s, vjp_warmup_s) = timed(&vjp)?;
    phase("VJP timed");

    // ε and the latent's VJP ∂⟨ε, w⟩/∂x on the seeded inputs, to compare across dtypes.
    let to_vec = |d: TensorData| d.convert::<f32>().to_vec::<f32>().map_err(|e| format!("{e:?}"));
    let x = sample.clone().require_grad();
    let out = unet.forward_added(x.clone(), t.clone(), context.clone(), None, added.clone());
    let eps = to_vec(out.clone().into_data())?;
    let grads = (out * w.clone()).sum().backward();
    let grad_x = to_vec(x.grad(&grads).ok_or("no gradient reached the latent")?.into_data())?;
    // A few weights' gradients too: the latent's does not pass through a weight gradient, and
    // conv_in's was wrong in f32 on CUDA unnoticed (H100, 2026-11-28, burn-cubecl's patch 4).
    let weight_grad = |name: &str, g: Option<TensorData>| -> Result<(String, Vec<f32>), String> {
        Ok((
            name.to_string(),
            to_vec(g.ok_or(format!("no gradient reached {name}"))?)?,
        ))
    };
    let (ci, co, te) = (&unet.conv_in, &unet.conv_out, &unet.time_embedding.linear_1);
    let bias_grad = |b: &Option<burn::module::Param<Tensor<Autodiff<B>, 1>>>| {
        b.as_ref().and_then(|b| b.val().grad(&grads)).map(|g| g.into_data())
    };
    let weight_grads = vec![
        weight_grad("conv_in.weight", ci.weight.val().grad(&grads).map(|g| g.into_data()))?,
        weight_grad("conv_in.bias", bias_grad(&ci.bias))?,
        weight_grad("conv_out.weight", co.weight.val().grad(&grads).map(|g| g.into_data()))?,
        weight_grad("conv_out.bias", bias_grad(&co.bias))?,
        weight_grad(
            "time_embedding.linear_1.weight",
            te.weight.val().grad(&grads).map(|g| g.into_data()),
        )?,
    ];
    let outputs = Outputs {
        eps,
        grad_x,
        weight_grads,
    };
    let finite = outputs.eps.iter().chain(&outputs.grad_x).all(|v| v.is_finite())
        && outputs
            .weight_grads
            .iter()
            .all(|(_, g)| g.iter().all(|v| v.is_finite()));
    if args.trace {
        let (x, t, c) = (sample.clone().inner(), t.clone().inner(), context.clone().inner());
        let conditions = UnetConditions {
            added: inner_added(),
            ..Default::default()
        };
        inner.forward_observed(x, t, c, conditions, &mut |site, h| {
            let values = h
                .clone()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default();
            let max_abs = values
                .iter()
                .filter(|v| v.is_finite())
                .fold(0f32, |m, v| m.max(v.abs()));
            let non_finite = values.iter().filter(|v| !v.is_finite()).count();
            let line = serde_json::json!({
                "layer": site.to_string(), "max_abs_finite": max_abs, "non_finite": non_finite, "of": values.len(),
            });
            println!("{line}");
        });
        conv_in_probe(&inner, sample.clone().inner())?;
    }
    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        save_safetensors(&inner, dir.join("unet.safetensors")).map_err(|e| e.to_string())?;
        let path = dir.join("outputs.json");
        let text = serde_json::to_string(&outputs).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let (rel_diff_vs_f32, grad_rel_diff_vs_f32, weight_grad_rel_diffs) = match &args.compare_dir {
        Some(dir) => {
            let path = dir.join("outputs.json");
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let saved: Outputs = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            // Per weight, as the reference has them (a reference saved before it kept none).
            let mut by_weight = serde_json::Map::new();
            for (name, reference) in &saved.weight_grads {
                if let Some((_, got)) = outputs.weight_grads.iter().find(|(n, _)| n == name) {
                    by_weight.insert(name.clone(), rel_diff(got, reference)?.into());
                }
            }
            (
                Some(rel_diff(&outputs.eps, &saved.eps)?),
                Some(rel_diff(&outputs.grad_x, &saved.grad_x)?),
                Some(by_weight),
            )
        }
        None => (None, None, None),
    };
    let line = serde_json::json!({
        "config": format!("{:?}", args.config).to_lowercase(), "backend": format!("{:?}", args.backend).to_lowercase(),
        "dtype": format!("{:?}", args.dtype).to_lowercase(), "finite": finite,
        "rel_diff_vs_f32": rel_diff_vs_f32, "grad_rel_diff_vs_f32": grad_rel_diff_vs_f32,
        "weight_grad_rel_diffs_vs_f32": weight_grad_rel_diffs,
        "params": params, "batch": args.batch, "latent": [4, size, size], "context": [tokens, context_dim],
        "forward_s": forward_s, "vjp_s": vjp_s, "forward_warmup_s": forward_warmup_s, "vjp_warmup_s": vjp_warmup_s,
        "peak_rss_mib": adjoint_dpm::bench::peak_rss_mib(),
        "autotune": cfg!(any(feature = "cuda", feature = "wgpu")),
        "fusion": !matches!(args.backend, BackendName::Flex) && cfg!(any(feature = "cuda-untuned", feature = "wgpu-untuned")),
    });
    println!("{line}");
    Ok(())
}

/// `conv_in` three ways on the same tensors: as the module runs it, without its bias and the
/// bias added after, and on ndarray in f32 from the same values; plus how many of its weights
/// and bias values are not finite. One JSON line. (The UNet's first layer held NaN in f16 on
/// CUDA, H100 2026-11-28: cubek's convolution added an f16 bias wrongly, and burn-cubecl's
/// patch 3 now adds it after the convolution itself, so the first two agree.)
fn conv_in_probe<B: Backend>(
    unet: &adjoint_dpm_models::unet::UNet2DConditionModel<B>,
    x: Tensor<B, 4>,
) -> Result<(), String> {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    let conv = &unet.conv_in;
    let (w, b) = (conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
    let pad = w.dims()[2] / 2;
    let options = ConvOptions::new([1, 1], [pad, pad], [1, 1], 1);
    let host = |d: TensorData| d.convert::<f32>().to_vec::<f32>().map_err(|e| format!("{e:?}"));
    let non_finite = |v: &[f32]| v.iter().filter(|v| !v.is_finite()).count();
    let module = host(conv.forward(x.clone()).into_data())?;
    let split = {
        let y = conv2d(x.clone(), w.clone(), None, options.clone());
        let y = match &b {
            Some(b) => y + b.clone().reshape([1, -1, 1, 1]),
            None => y,
        };
        host(y.into_data())?
    };
    let cpu = Default::default();
    let reference = {
        type Cpu = burn::backend::NdArray<f32>;
        let wc = Tensor::<Cpu, 4>::from_data(w.to_data().convert::<f32>(), &cpu);
        let xc = Tensor::<Cpu, 4>::from_data(x.to_data().convert::<f32>(), &cpu);
        let bc = b
            .as_ref()
            .map(|b| Tensor::<Cpu, 1>::from_data(b.to_data().convert::<f32>(), &cpu));
        host(conv2d(xc, wc, bc, options).into_data())?
    };
    let weights = host(w.into_data())?;
    let bias = match b {
        Some(b) => host(b.into_data())?,
        None => Vec::new(),
    };
    let line = serde_json::json!({
        "conv_in_probe": {
            "weight_non_finite": non_finite(&weights), "bias_non_finite": non_finite(&bias),
            "module_non_finite": non_finite(&module), "module_rel_diff": rel_diff(&module, &reference)?,
            "bias_after_non_finite": non_finite(&split), "bias_after_rel_diff": rel_diff(&split, &reference)?,
            "reference_non_finite": non_finite(&reference), "of": reference.len(),
        }
    });
    println!("{line}");
    Ok(())
}

/// What `--save-dir` keeps besides the weights.
#[derive(serde::Serialize, serde::Deserialize)]
struct Outputs {
    eps: Vec<f32>,
    grad_x: Vec<f32>,
    /// Gradients of ⟨ε, w⟩ to a few weights, by checkpoint key.
    #[serde(default)]
    weight_grads: Vec<(String, Vec<f32>)>,
}
