//! Time of a differentiated DDIM sampling (loss on x_0 back to x_T, the conditioning and the
//! network's weights) per gradient mode and step count, on a small convolutional ε-network.
//! Peak memory per configuration: the `bench_diffusion` example (one process per run).

use adjoint_dpm::diffusion::{EpsModel, NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

type B = Autodiff<Flex>;

/// conv-tanh-conv with a time shift and a conditioning vector on the hidden channels.
#[derive(Module, Debug)]
struct ConvEps<B: Backend> {
    conv_in: Conv2d<B>,
    conv_out: Conv2d<B>,
    cond: Param<Tensor<B, 1>>,
}

impl<B: Backend> EpsModel<B, 4> for ConvEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let hidden = self.cond.dims()[0];
        let h = self.conv_in.forward(x) + self.cond.val().reshape([1, hidden, 1, 1]);
        let h = h + t.div_scalar(1000.0).reshape([1, 1, 1, 1]);
        self.conv_out.forward(h.tanh())
    }
}

fn diffusion_grad(c: &mut Criterion) {
    let device = Default::default();
    let conv = |i, o| {
        Conv2dConfig::new([i, o], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .init(&device)
    };
    let model = adjoint_dpm::ode::materialized(ConvEps::<B> {
        conv_in: conv(4, 32),
        conv_out: conv(32, 4),
        cond: Param::from_tensor(Tensor::zeros([32], &device)),
    });
    let schedule = NoiseSchedule::sd_scaled_linear();
    let x_t = Tensor::<B, 4>::random([1, 4, 32, 32], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let mut group = c.benchmark_group("diffusion_grad");
    group.sample_size(10);
    for steps in [5, 20, 50] {
        for (name, mode) in [
            ("backprop", GradientMode::Backprop),
            ("checkpointed", GradientMode::Checkpointed(Schedule::All)),
            ("adjointdpm", GradientMode::Backsolve(BacksolveOptions::default())),
        ] {
            let sampler = Sampler::ddim(steps).gradient(mode);
            group.bench_function(BenchmarkId::new(name, steps), |b| {
                b.iter(|| {
                    let leaf = x_t.clone().require_grad();
                    let x0 = sampler.sample(&model, &schedule, leaf.clone()).expect("sampling");
                    let grads = x0.powi_scalar(2).mean().backward();
                    leaf.grad(&grads).expect("gradient").sum().into_scalar()
                })
            });
        }
        group.bench_function(BenchmarkId::new("sampling_only", steps), |b| {
            let sampler = Sampler::ddim(steps);
            let inner = burn::module::AutodiffModule::valid(&model);
            b.iter(|| {
                sampler
                    .sample_inference(&inner, &schedule, x_t.clone().inner())
                    .expect("sampling")
                    .sum()
                    .into_scalar()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, diffusion_grad);
criterion_main!(benches);
