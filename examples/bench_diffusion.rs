//! Gradient time and peak memory of sampling, per sampler step count and gradient mode, on a
//! small diffusers-style UNet (random weights). Prints one JSON line per run; run one process
//! per configuration so that peak RSS is that configuration's:
//!
//! ```text
//! for n in 5 20 50 200; do for m in backprop checkpointed backsolve; do
//!   cargo run --release --example bench_diffusion -- --steps $n --gradient $m
//! done; done
//! ```
//!
//! Fields: `sample_s` (sampling without a graph), `grad_s` (sampling + backward of a loss on
//! x_0 to x_T, the conditioning and the weights), their ratio (the floor is about 3: one
//! forward, one recomputation and one VJP per step), and the process's peak RSS in MiB.

use std::time::Instant;

use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use adjoint_dpm::tasks::UnetEps;
use adjoint_dpm_models::unet::UNet2DConditionConfig;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use clap::{Parser, ValueEnum};

type Inner = Flex;
type B = Autodiff<Inner>;

/// The UNet with a fixed (trainable) cross-attention context.

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Backprop,
    Checkpointed,
    Recursive,
    Backsolve,
}

#[derive(Parser, Debug)]
#[command(about = "Sampling-gradient time and memory vs steps; prints one JSON line")]
struct Args {
    /// Sampler steps N.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, value_enum, default_value = "checkpointed")]
    gradient: Mode,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Latent height = width.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

const CONFIG: &str = r#"{
  "block_out_channels": [32, 64], "layers_per_block": 1, "in_channels": 4, "out_channels": 4,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 16
}"#;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse();
    let device = Default::default();
    <Inner as Backend>::seed(&device, 0);
    let config: UNet2DConditionConfig = serde_json::from_str(CONFIG).map_err(|e| e.to_string())?;
    let unet = config.init::<B>(&device).map_err(|e| e.to_string())?;
    let context = Tensor::<B, 3>::random(
        [args.batch, 4, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let model = adjoint_dpm::ode::materialized(UnetEps::new(unet, context));
    let schedule = NoiseSchedule::sd_scaled_linear();
    let mode = match args.gradient {
        Mode::Backprop => GradientMode::Backprop,
        Mode::Checkpointed => GradientMode::Checkpointed(Schedule::All),
        Mode::Recursive => GradientMode::Checkpointed(Schedule::Recursive),
        Mode::Backsolve => GradientMode::Backsolve(BacksolveOptions::default()),
    };
    let sampler = Sampler::ddim(args.steps).gradient(mode);
    let shape = [args.batch, 4, args.size, args.size];
    let x_t = Tensor::<B, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);

    let inner = model.valid();
    let sample = || -> Result<f64, String> {
        let start = Instant::now();
        let x0 = sampler
            .sample_inference(&inner, &schedule, x_t.clone().inner())
            .map_err(|e| e.to_string())?;
        let _: f32 = x0.sum().into_scalar();
        Ok(start.elapsed().as_secs_f64())
    };
    let gradient = || -> Result<f64, String> {
        let start = Instant::now();
        let leaf = x_t.clone().require_grad();
        let x0 = sampler
            .sample(&model, &schedule, leaf.clone())
            .map_err(|e| e.to_string())?;
        let grads = x0.powi_scalar(2).mean().backward();
        let g = leaf.grad(&grads).ok_or("no gradient reached x_T")?;
        let _: f32 = g.sum().into_scalar();
        Ok(start.elapsed().as_secs_f64())
    };
    let median = |f: &dyn Fn() -> Result<f64, String>| -> Result<(f64, f64), String> {
        let warmup = f()?;
        let mut v = (0..args.reps.max(1)).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
        v.sort_by(f64::total_cmp);
        Ok((v[v.len() / 2], warmup))
    };
    let (sample_s, _) = median(&sample)?;
    let (grad_s, warmup_s) = median(&gradient)?;
    let line = serde_json::json!({
        "steps": args.steps, "gradient": format!("{:?}", args.gradient).to_lowercase(),
        "batch": args.batch, "size": args.size, "sample_s": sample_s, "grad_s": grad_s,
        "grad_over_sample": grad_s / sample_s, "warmup_s": warmup_s, "peak_rss_mib": adjoint_dpm::bench::peak_rss_mib(),
    });
    println!("{line}");
    Ok(())
}
