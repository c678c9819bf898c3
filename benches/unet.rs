//! Forward and VJP of a small diffusers UNet on the CPU (flex, f32): the per-step cost of every
//! sampler and of every step of its adjoint. Larger configs and GPUs: the `bench_unet` example.

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};

type B = Autodiff<Flex>;

// The examples' shared UNet configs (the rest of that module is unused here).
#[path = "../examples/common/mod.rs"]
#[allow(unused_imports, unused_macros)]
mod common;

fn unet(c: &mut Criterion) {
    let device = Default::default();
    let (config, _, _) = common::UnetSize::Tiny.config().expect("config");
    let unet = adjoint_dpm::ode::materialized(config.init::<B>(&device).expect("init"));
    let inner = unet.valid();
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let sample = Tensor::<B, 4>::random([1, 4, 16, 16], normal, &device);
    let context = Tensor::<B, 3>::random([1, 8, 32], normal, &device);
    let t = Tensor::<B, 1>::from_data([500.0f32], &device);
    let mut group = c.benchmark_group("unet_tiny_16x16");
    group.sample_size(20);
    group.bench_function("forward", |b| {
        b.iter(|| {
            inner
                .forward(sample.clone().inner(), t.clone().inner(), context.clone().inner(), None)
                .sum()
                .into_scalar()
        })
    });
    group.bench_function("vjp", |b| {
        b.iter(|| {
            let x = sample.clone().require_grad();
            let grads = unet
                .forward(x.clone(), t.clone(), context.clone(), None)
                .sum()
                .backward();
            x.grad(&grads).expect("gradient").sum().into_scalar()
        })
    });
    group.finish();
}

criterion_group!(benches, unet);
criterion_main!(benches);
