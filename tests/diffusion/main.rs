//! Diffusion adapter tests: samplers against DDIM's own update, exact gradients through sampling
//! (vs backprop and finite differences), AdjointDPM's convergence.

use adjoint_dpm::diffusion::{EpsModel, NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::TensorData;

type F64 = NdArray<f64>;
type Ad = Autodiff<F64>;

/// A small convolutional ε-network with a class-embedding-like conditioning vector.
#[derive(Module, Debug)]
struct TinyEps<B: Backend> {
    conv_in: Conv2d<B>,
    conv_out: Conv2d<B>,
    /// Conditioning: added to the hidden channels (a class embedding row).
    cond: Param<Tensor<B, 1>>,
    time_scale: Param<Tensor<B, 1>>,
}

impl<B: Backend> TinyEps<B> {
    fn new(channels: usize, device: &B::Device) -> Self {
        let conv = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        let data = |v: Vec<f64>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
        adjoint_dpm::ode::materialized(Self {
            conv_in: conv(channels, 6),
            conv_out: conv(6, channels),
            cond: Param::from_tensor(data(vec![0.3, -0.2, 0.1, 0.5, -0.4, 0.2])),
            time_scale: Param::from_tensor(data(vec![1.5])),
        })
    }
}

impl<B: Backend> EpsModel<B, 4> for TinyEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let h = self.conv_in.forward(x);
        let temb = (t.div_scalar(1000.0) * self.time_scale.val()).sin();
        let h = h + self.cond.val().reshape([1, 6, 1, 1]) + temb.reshape([1, 1, 1, 1]);
        self.conv_out.forward(h.tanh())
    }
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec().unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    num / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300)
}

fn noise(shape: [usize; 4], seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..shape.iter().product::<usize>())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s as f64 / u64::MAX as f64) * 2.0 - 1.0
        })
        .collect()
}

const SHAPE: [usize; 4] = [2, 2, 4, 4];

struct Grads {
    x_t: Vec<f64>,
    cond: Vec<f64>,
    weight: Vec<f64>,
    loss: f64,
}

/// L = Σ w ⊙ x_0 + 0.1 Σ x_0², differentiated w.r.t. x_T, the conditioning and a weight.
fn grads(model: &TinyEps<Ad>, schedule: &NoiseSchedule, sampler: Sampler) -> Grads {
    let device = Default::default();
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device).require_grad();
    let x0 = sampler.sample(model, schedule, x_t.clone()).unwrap();
    let w = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 2), SHAPE), &device);
    let loss = (x0.clone() * w).sum() + x0.powi_scalar(2).sum().mul_scalar(0.1);
    let value = values(loss.clone())[0];
    let g = loss.backward();
    Grads {
        x_t: values(x_t.grad(&g).unwrap()),
        cond: values(model.cond.val().grad(&g).unwrap()),
        weight: model.conv_in.weight.val().grad(&g).map(values).unwrap_or_default(),
        loss: value,
    }
}

#[test]
fn euler_in_rho_is_ddim() {
    // DDIM's own update in x (Song et al. 2021, eq. 12 with η = 0; diffusers DDIMScheduler.step):
    // x̂0 = (x − √(1−ᾱ_t) ε)/√ᾱ_t, x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev) ε.
    let device = Default::default();
    let model = TinyEps::<F64>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let sampler = Sampler::ddim(10);
    let x_t = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 3), SHAPE), &device);
    let ours = values(sampler.sample_inference(&model, &schedule, x_t.clone()).unwrap());
    let ts = sampler.timesteps(&schedule).unwrap();
    let mut x = x_t;
    for (i, &t) in ts.iter().enumerate() {
        let abar = schedule.alphas_cumprod(t);
        let abar_prev = if i + 1 < ts.len() {
            schedule.alphas_cumprod(ts[i + 1])
        } else {
            1.0
        };
        let t_tensor = Tensor::<F64, 1>::from_data(TensorData::from([t as f64]), &device);
        let eps = model.eps(x.clone(), t_tensor);
        let x0 = (x - eps.clone().mul_scalar((1.0 - abar).sqrt())).div_scalar(abar.sqrt());
        x = x0.mul_scalar(abar_prev.sqrt()) + eps.mul_scalar((1.0 - abar_prev).sqrt());
    }
    let reference = values(x);
    assert!(
        rel_err(&ours, &reference) < 1e-10,
        "off by {:e}",
        rel_err(&ours, &reference)
    );
}

#[test]
fn checkpointed_equals_backprop_through_sampling() {
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::ddpm_linear();
    for sampler in [Sampler::ddim(8), Sampler::heun(4)] {
        let reference = grads(&model, &schedule, sampler.gradient(GradientMode::Backprop));
        for schedule_kind in [Schedule::All, Schedule::Every(3), Schedule::Recursive] {
            let exact = grads(
                &model,
                &schedule,
                sampler.gradient(GradientMode::Checkpointed(schedule_kind)),
            );
            for (name, a, b) in [
                ("x_T", &exact.x_t, &reference.x_t),
                ("cond", &exact.cond, &reference.cond),
                ("weight", &exact.weight, &reference.weight),
            ] {
                let e = rel_err(a, b);
                assert!(
                    e < 1e-10,
                    "{:?} {schedule_kind:?}: dL/d{name} off by {e:e}",
                    sampler.kind
                );
            }
        }
    }
}

#[test]
fn conditioning_gradient_with_frozen_network_matches_finite_differences() {
    let device = Default::default();
    let mut model = TinyEps::<Ad>::new(2, &device);
    model.conv_in = model.conv_in.no_grad();
    model.conv_out = model.conv_out.no_grad();
    let schedule = NoiseSchedule::sd_scaled_linear();
    let sampler = Sampler::ddim(5);
    let g = grads(&model, &schedule, sampler);
    assert!(g.weight.is_empty(), "a frozen weight received a gradient");
    let inner = model.valid();
    let loss_at = |m: &TinyEps<F64>, x_t: Vec<f64>| {
        let x_t = Tensor::<F64, 4>::from_data(TensorData::new(x_t, SHAPE), &device);
        let x0 = sampler.sample_inference(m, &schedule, x_t).unwrap();
        let w = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 2), SHAPE), &device);
        values((x0.clone() * w).sum() + x0.powi_scalar(2).sum().mul_scalar(0.1))[0]
    };
    assert!((loss_at(&inner, noise(SHAPE, 1)) - g.loss).abs() < 1e-10 * g.loss.abs().max(1.0));
    let eps = 1e-6;
    for i in [0, 5, 17, 31] {
        let fd = {
            let mut p = noise(SHAPE, 1);
            p[i] += eps;
            let mut m = noise(SHAPE, 1);
            m[i] -= eps;
            (loss_at(&inner, p) - loss_at(&inner, m)) / (2.0 * eps)
        };
        assert!(
            (fd - g.x_t[i]).abs() < 1e-6 * g.x_t[i].abs().max(1.0),
            "dL/dx_T[{i}]: FD {fd} vs {}",
            g.x_t[i]
        );
    }
    for i in 0..6 {
        let nudge = |e: f64| {
            let mut m = inner.clone();
            let mut c = values(m.cond.val());
            c[i] += e;
            m.cond = Param::from_tensor(Tensor::from_data(TensorData::new(c, [6]), &device));
            loss_at(&m, noise(SHAPE, 1))
        };
        let fd = (nudge(eps) - nudge(-eps)) / (2.0 * eps);
        assert!(
            (fd - g.cond[i]).abs() < 1e-6 * g.cond[i].abs().max(1.0),
            "dL/dc[{i}]: FD {fd} vs {}",
            g.cond[i]
        );
    }
}

#[test]
fn adjointdpm_converges_to_the_exact_gradient_like_one_over_n() {
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let errors: Vec<f64> = [10, 20, 40, 80]
        .iter()
        .map(|&n| {
            let exact = grads(&model, &schedule, Sampler::ddim(n));
            let bs = BacksolveOptions::default();
            let adjoint = grads(
                &model,
                &schedule,
                Sampler::ddim(n).gradient(GradientMode::Backsolve(bs)),
            );
            rel_err(&adjoint.x_t, &exact.x_t).max(rel_err(&adjoint.cond, &exact.cond))
        })
        .collect();
    for w in errors.windows(2) {
        let ratio = w[1] / w[0];
        assert!(
            (0.3..0.7).contains(&ratio),
            "AdjointDPM error should halve as N doubles: {errors:?}"
        );
    }
}

#[test]
fn bad_step_counts_are_errors() {
    let device = Default::default();
    let model = TinyEps::<F64>::new(2, &device);
    let x = Tensor::<F64, 4>::zeros(SHAPE, &device);
    let schedule = NoiseSchedule::ddpm_linear();
    for steps in [0, 1001] {
        let e = Sampler::ddim(steps)
            .sample_inference(&model, &schedule, x.clone())
            .unwrap_err();
        assert_eq!(
            e,
            adjoint_dpm::diffusion::DiffusionError::BadStepCount {
                steps,
                train_steps: 1000
            }
        );
    }
}
