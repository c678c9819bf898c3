//! What the bench examples share: which UNet, backend and float dtype to run, picked on the
//! command line, and how far two results are apart. Not an example itself (cargo builds only
//! `examples/*.rs` and `examples/*/main.rs`); each example uses part of it.
#![allow(dead_code)]

use adjoint_dpm_models::unet::UNet2DConditionConfig;
use clap::ValueEnum;

/// A small diffusers-style UNet: block_out_channels [32, 64], one cross-attention level of
/// width 32, 16×16 latent. `benches/unet.rs` times the same one.
pub const TINY_UNET: &str = r#"{
  "block_out_channels": [32, 64], "layers_per_block": 1, "in_channels": 4, "out_channels": 4,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 16
}"#;

/// Which UNet config.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UnetSize {
    /// [`TINY_UNET`]: block_out_channels [32, 64], context width 32, 16×16 latent.
    Tiny,
    /// Stable Diffusion 1.5: context width 768, 64×64 latent.
    Sd15,
    /// SDXL: context width 2048, 128×128 latent, a 1280-wide pooled embedding and six size
    /// numbers as added conditions.
    Sdxl,
}

impl UnetSize {
    /// The config, its latent side and its context width.
    pub fn config(self) -> Result<(UNet2DConditionConfig, usize, usize), String> {
        let (config, size) = match self {
            Self::Tiny => (serde_json::from_str(TINY_UNET).map_err(|e| e.to_string())?, 16),
            Self::Sd15 => (UNet2DConditionConfig::sd15(), 64),
            Self::Sdxl => (UNet2DConditionConfig::sdxl(), 128),
        };
        let context_dim = config
            .cross_attention_dim
            .get(0, 1, "cross_attention_dim")
            .map_err(|e| e.to_string())?;
        Ok((config, size, context_dim))
    }
}

/// Which burn backend.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackendName {
    Flex,
    /// Needs `--features cuda`.
    Cuda,
    /// Needs `--features wgpu` (Vulkan; Mesa's lavapipe runs it on the CPU).
    Wgpu,
}

/// `$run::<backend>($args)` for the [`BackendName`] given, or an error naming the cargo feature
/// the backend needs; exits with status 1 and the error on stderr when `$run` fails.
macro_rules! run_on {
    ($backend:expr, $run:ident, $args:expr) => {{
        use $crate::common::BackendName;
        let result: Result<(), String> = match $backend {
            BackendName::Flex => $run::<burn::backend::Flex>($args),
            #[cfg(feature = "cuda-base")]
            BackendName::Cuda => $run::<burn::backend::Cuda>($args),
            #[cfg(not(feature = "cuda-base"))]
            BackendName::Cuda => Err("cuda needs --features cuda".into()),
            #[cfg(feature = "wgpu-untuned")]
            BackendName::Wgpu => $run::<burn::backend::Wgpu>($args),
            #[cfg(not(feature = "wgpu-untuned"))]
            BackendName::Wgpu => Err("wgpu needs --features wgpu".into()),
        };
        if let Err(e) = result {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }};
}
pub(crate) use run_on;

/// The device's float dtype for weights, activations and gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    F32,
    F16,
}

/// Makes `precision` the default float dtype of `device`; burn refuses once the device has run
/// anything, so call it first.
pub fn set_precision<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    precision: Precision,
) -> Result<(), String> {
    if precision == Precision::F16 {
        let int: burn::tensor::IntDType = <B::IntElem as burn::tensor::Element>::dtype().into();
        burn::tensor::set_default_dtypes::<B>(device, burn::tensor::FloatDType::F16, int)
            .map_err(|e| format!("f16: {e:?}"))?;
    }
    Ok(())
}

/// Waits for `t` by reading its sum back, so that an asynchronous backend has finished: where a
/// backend's launch failure surfaces (a kernel cubecl cannot compile), reported as an error
/// naming `what` instead of a panic in the read.
pub fn finish<B: burn::tensor::backend::Backend, const D: usize>(
    what: &str,
    t: burn::tensor::Tensor<B, D>,
) -> Result<(), String> {
    t.sum()
        .try_into_scalar()
        .map(|_| ())
        .map_err(|e| format!("{what} failed on the backend: {e}"))
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_diff(a: &[f32], b: &[f32]) -> Result<f64, String> {
    if a.len() != b.len() {
        return Err(format!("{} values here, {} in the reference", a.len(), b.len()));
    }
    let (num, den) = a.iter().zip(b).fold((0.0, 0.0), |(n, d), (&x, &y)| {
        let (x, y) = (f64::from(x), f64::from(y));
        (n + (x - y).powi(2), d + y * y)
    });
    Ok((num / den).sqrt())
}
