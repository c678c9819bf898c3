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

use std::time::Instant;

use adjoint_dpm_models::unet::UNet2DConditionConfig;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Config {
    /// block_out_channels [32, 64], 16×16 latent, 8×32 context.
    Tiny,
    /// Stable Diffusion 1.5, 64×64 latent, 77×768 context.
    Sd15,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendName {
    Flex,
    /// Needs `--features cuda`.
    Cuda,
}

#[derive(Parser, Debug)]
#[command(about = "UNet forward and VJP timing; prints one JSON line")]
struct Args {
    #[arg(long, value_enum, default_value = "tiny")]
    config: Config,
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendName,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

const TINY: &str = r#"{
  "block_out_channels": [32, 64], "layers_per_block": 1, "in_channels": 4, "out_channels": 4,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 16
}"#;

fn main() {
    let args = Args::parse();
    let result = match args.backend {
        BackendName::Flex => run::<Flex>(&args),
        #[cfg(feature = "cuda")]
        BackendName::Cuda => run::<burn::backend::Cuda>(&args),
        #[cfg(not(feature = "cuda"))]
        BackendName::Cuda => Err("cuda needs --features cuda".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run<B: Backend>(args: &Args) -> Result<(), String> {
    let device = B::Device::default();
    let (config, size, tokens) = match args.config {
        Config::Tiny => (
            serde_json::from_str::<UNet2DConditionConfig>(TINY).map_err(|e| e.to_string())?,
            16,
            8,
        ),
        Config::Sd15 => (UNet2DConditionConfig::sd15(), 64, 77),
    };
    let unet = config.init::<Autodiff<B>>(&device).map_err(|e| e.to_string())?;
    let unet = adjoint_dpm::ode::materialized(unet);
    let params = burn::module::Module::num_params(&unet);
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let sample = Tensor::<Autodiff<B>, 4>::random([args.batch, 4, size, size], normal, &device);
    let context_dim = config
        .cross_attention_dim
        .get(0, 1, "cross_attention_dim")
        .map_err(|e| e.to_string())?;
    let context = Tensor::<Autodiff<B>, 3>::random([args.batch, tokens, context_dim], normal, &device);
    let t = Tensor::<Autodiff<B>, 1>::from_data(vec![500.0f32; args.batch].as_slice(), &device);
    let w = Tensor::<Autodiff<B>, 4>::random([args.batch, 4, size, size], normal, &device);
    let inner = burn::module::AutodiffModule::valid(&unet);

    let forward = || {
        let start = Instant::now();
        let out = inner.forward(sample.clone().inner(), t.clone().inner(), context.clone().inner(), None);
        let _ = out.sum().into_scalar();
        start.elapsed().as_secs_f64()
    };
    let vjp = || {
        let start = Instant::now();
        let x = sample.clone().require_grad();
        let out = unet.forward(x.clone(), t.clone(), context.clone(), None);
        let grads = (out * w.clone()).sum().backward();
        let _ = x.grad(&grads).map(|g| g.sum().into_scalar());
        start.elapsed().as_secs_f64()
    };
    let timed = |f: &dyn Fn() -> f64| {
        let warmup = f();
        let mut v: Vec<f64> = (0..args.reps.max(1)).map(|_| f()).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], warmup)
    };
    let (forward_s, forward_warmup_s) = timed(&forward);
    let (vjp_s, vjp_warmup_s) = timed(&vjp);
    let line = serde_json::json!({
        "config": format!("{:?}", args.config).to_lowercase(), "backend": format!("{:?}", args.backend).to_lowercase(),
        "params": params, "batch": args.batch, "latent": [4, size, size], "context": [tokens, context_dim],
        "forward_s": forward_s, "vjp_s": vjp_s, "forward_warmup_s": forward_warmup_s, "vjp_warmup_s": vjp_warmup_s,
        "peak_rss_mib": adjoint_dpm::bench::peak_rss_mib(),
    });
    println!("{line}");
    Ok(())
}
