//! Diffusion adapter tests: samplers against DDIM's own update, exact gradients through sampling
//! (vs backprop and finite differences), AdjointDPM's convergence.

use adjoint_dpm::diffusion::{EpsModel, NoiseLevels, NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::TensorData;

mod parity;
mod stochastic;
mod weights;

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
        // Seeded: the convolutions' initial weights otherwise change with each process, and a
        // rare draw (CI, 2026-11-27) was still pre-asymptotic at N = 10 for the 1/N test.
        B::seed(device, 0);
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
        let abar = schedule.alphas_cumprod(t as usize);
        let abar_prev = if i + 1 < ts.len() {
            schedule.alphas_cumprod(ts[i + 1] as usize)
        } else {
            1.0
        };
        let t_tensor = Tensor::<F64, 1>::from_data(TensorData::from([t]), &device);
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
    // 16 DPM-Solver++(2M) steps: first-order first and last steps, second order in between;
    // 3M with 12: first, second, then third order, second and first at the end; UniPC's
    // corrector of first, then second order; PLMS: its trapezoid first step, then Adams–Bashforth
    // of orders 2, 3 and 4.
    // Heun: three Heun steps and a last Euler step, two engine solves; Karras' levels with
    // fractional timesteps; exponential levels with truncated ones.
    for sampler in [
        Sampler::ddim(8),
        Sampler::heun(4),
        Sampler::heun(5).karras_sigmas(true),
        Sampler::euler(6).noise_levels(NoiseLevels::Exponential),
        Sampler::dpm_solver_pp_2m(16),
        Sampler::dpm_solver_pp_3m(12),
        Sampler::dpm_solver_pp_3m(12).second_order(adjoint_dpm::diffusion::SecondOrder::Heun),
        Sampler::unipc(10),
        Sampler::unipc_bh1(10),
        Sampler::unipc_third_order(10),
        Sampler::plms(7),
        Sampler::lms(7).karras_sigmas(true),
        // DEIS: first order, then 2 (and 3), lower again at the last steps.
        Sampler::deis(7),
        Sampler::deis_third_order(16),
        // DPM2: two network calls a step in one step map, an Euler step last.
        Sampler::dpm2(5),
        Sampler::dpm2(5).karras_sigmas(true),
    ] {
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
    for sampler in [
        Sampler::ddim(5),
        Sampler::euler(5),
        Sampler::heun(4),
        Sampler::dpm_solver_pp_2m(6),
        Sampler::dpm_solver_pp_3m(6),
        Sampler::unipc(6),
        Sampler::unipc_bh1(6),
        Sampler::unipc_third_order(6),
        Sampler::plms(6),
        Sampler::lms(6),
        Sampler::deis(6),
        Sampler::deis_third_order(6),
        Sampler::dpm2(5),
    ] {
        conditioning_gradient_matches_finite_differences(sampler);
    }
}

fn conditioning_gradient_matches_finite_differences(sampler: Sampler) {
    let device = Default::default();
    let mut model = TinyEps::<Ad>::new(2, &device);
    model.conv_in = model.conv_in.no_grad();
    model.conv_out = model.conv_out.no_grad();
    let schedule = NoiseSchedule::sd_scaled_linear();
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
            "{:?} dL/dx_T[{i}]: FD {fd} vs {}",
            sampler.kind,
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
            "{:?} dL/dc[{i}]: FD {fd} vs {}",
            sampler.kind,
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
fn adjointdpm_with_heun_converges_at_second_order() {
    // Heun's run is two engine solves (Heun steps, then the last step in Euler), each
    // continuous-adjointed on its own; the adjoint's gap to the exact gradient of the sampler
    // is the sampler's own error, second order (measured: 2.3e-3, 2.3e-4, 2.6e-5).
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let errors: Vec<f64> = [10, 20, 40]
        .iter()
        .map(|&n| {
            let exact = grads(&model, &schedule, Sampler::heun(n));
            let bs = BacksolveOptions::default();
            let adjoint = grads(
                &model,
                &schedule,
                Sampler::heun(n).gradient(GradientMode::Backsolve(bs)),
            );
            rel_err(&adjoint.x_t, &exact.x_t).max(rel_err(&adjoint.cond, &exact.cond))
        })
        .collect();
    for w in errors.windows(2) {
        assert!(
            w[1] < 0.3 * w[0],
            "AdjointDPM with Heun should gain a factor 4 as N doubles: {errors:?}"
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
    for strength in [f64::NAN, 0.0, -0.5, 1.5, 0.05] {
        let e = Sampler::ddim(10)
            .strength(strength)
            .sample_inference(&model, &schedule, x.clone())
            .unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, adjoint_dpm::diffusion::DiffusionError::BadStrength { steps: 10, .. })
                && message.contains(&strength.to_string()),
            "{message}"
        );
    }
    let e = Sampler::ddim(10)
        .strength(0.5)
        .noised(&schedule, x.clone(), Tensor::zeros([2, 2, 4, 5], &device))
        .unwrap_err();
    assert!(e.to_string().contains("[2, 2, 4, 5]"), "{e}");
}

/// Rows of the batch's first half see `uncond`, the second half `cond`: the contract of `Cfg`.
#[derive(Module, Debug)]
struct TwoEmbeddings<B: Backend> {
    net: TinyEps<B>,
    cond: Param<Tensor<B, 1>>,
    uncond: Param<Tensor<B, 1>>,
}

impl<B: Backend> EpsModel<B, 4> for TwoEmbeddings<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let half = x.dims()[0] / 2;
        let base = self.net.eps(x, t);
        let shift = Tensor::cat(
            vec![
                self.uncond.val().reshape([1, 1, 1, 1]).repeat_dim(0, half),
                self.cond.val().reshape([1, 1, 1, 1]).repeat_dim(0, half),
            ],
            0,
        );
        base + shift
    }
}

#[test]
fn cfg_combines_both_halves_of_one_batched_call() {
    use adjoint_dpm::diffusion::Cfg;
    let device = Default::default();
    let scalar = |v: f64| Param::from_tensor(Tensor::<F64, 1>::from_data(TensorData::from([v]), &device));
    let model = TwoEmbeddings {
        net: TinyEps::new(2, &device),
        cond: scalar(1.0),
        uncond: scalar(-0.5),
    };
    let x = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 4), SHAPE), &device);
    let t = Tensor::<F64, 1>::from_data(TensorData::from([500.0]), &device);
    let base = values(model.net.eps(x.clone(), t.clone()));
    for s in [0.0, 1.0, 7.5] {
        let eps = values(Cfg::new(model.clone(), s).unwrap().eps(x.clone(), t.clone()));
        // ε_u + s(ε_c − ε_u) with ε_c = base + 1, ε_u = base − 0.5.
        let expected: Vec<f64> = base.iter().map(|b| b - 0.5 + s * 1.5).collect();
        assert!(rel_err(&eps, &expected) < 1e-12, "scale {s}");
    }
    assert!(Cfg::new(model, f64::NAN).is_err());
}

#[test]
fn guidance_rescale_gradients_match_backprop_and_finite_differences() {
    use adjoint_dpm::diffusion::{Cfg, RescaleSpace};
    let device = Default::default();
    let schedule = NoiseSchedule::sd_scaled_linear();
    let guided = |cond: f64| {
        let scalar = |v: f64| Param::from_tensor(Tensor::<Ad, 1>::from_data(TensorData::from([v]), &device));
        let model = TwoEmbeddings {
            net: TinyEps::new(2, &device),
            cond: scalar(cond),
            uncond: scalar(-0.5),
        };
        Cfg::new(model, 4.0)
            .unwrap()
            .guidance_rescale(0.7, RescaleSpace::V(schedule.clone()))
            .unwrap()
    };
    // dL/d(cond) of L = Σ w ⊙ x_0 + 0.1 Σ x_0² through 4 DDIM steps, and L itself.
    let run = |model: &Cfg<Ad, TwoEmbeddings<Ad>>, mode| {
        let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device);
        let x0 = Sampler::ddim(4).gradient(mode).sample(model, &schedule, x_t).unwrap();
        let w = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 2), SHAPE), &device);
        let loss = (x0.clone() * w).sum() + x0.powi_scalar(2).sum().mul_scalar(0.1);
        let value = values(loss.clone())[0];
        let g = loss.backward();
        (value, values(model.model.cond.val().grad(&g).unwrap())[0])
    };
    let model = guided(1.0);
    let (_, exact) = run(&model, GradientMode::Checkpointed(Schedule::All));
    let (_, backprop) = run(&model, GradientMode::Backprop);
    assert!(
        (exact - backprop).abs() < 1e-10 * backprop.abs(),
        "{exact} vs {backprop}"
    );
    let h = 1e-6;
    let fd =
        (run(&guided(1.0 + h), GradientMode::Backprop).0 - run(&guided(1.0 - h), GradientMode::Backprop).0) / (2.0 * h);
    assert!(
        (fd - exact).abs() < 1e-6 * exact.abs().max(1e-3),
        "fd {fd}, adjoint {exact}"
    );
}

#[test]
fn guidance_needs_an_unconditional_embedding_of_the_same_shape() {
    use adjoint_dpm::diffusion::{DiffusionError, GuidanceEmbeddings};
    let device = Default::default();
    let cond = Tensor::<F64, 3>::zeros([1, 77, 8], &device);
    assert!(GuidanceEmbeddings::new(cond.clone(), None, 1.0).is_ok());
    assert!(matches!(
        GuidanceEmbeddings::new(cond.clone(), None, 7.5),
        Err(DiffusionError::BadGuidance { .. })
    ));
    let wrong = Tensor::<F64, 3>::zeros([1, 76, 8], &device);
    assert!(matches!(
        GuidanceEmbeddings::new(cond.clone(), Some(wrong), 7.5),
        Err(DiffusionError::ConditioningShape { got, .. }) if got == vec![1, 76, 8]
    ));
    let pair = GuidanceEmbeddings::new(cond.clone(), Some(cond.clone().add_scalar(1.0)), 7.5).unwrap();
    assert_eq!(pair.doubled().dims(), [2, 77, 8]);
}

/// A "network" that predicts v or x̂_0 exactly as TinyEps's ε implies, through the schedule.
#[derive(Module, Debug)]
struct Reparam<B: Backend> {
    net: TinyEps<B>,
    #[module(skip)]
    schedule: NoiseSchedule,
    #[module(skip)]
    v: bool,
}

impl<B: Backend> adjoint_dpm::diffusion::Predictor<B, 4> for Reparam<B> {
    fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        use burn::tensor::ElementConversion;
        let tv: f64 = t.clone().into_scalar().elem();
        let (a, s) = (self.schedule.alpha(tv), self.schedule.sigma(tv));
        let eps = self.net.eps(x.clone(), t);
        let x0 = (x - eps.clone().mul_scalar(s)).div_scalar(a);
        if self.v {
            eps.mul_scalar(a) - x0.mul_scalar(s)
        } else {
            x0
        }
    }
}

#[test]
fn v_and_x0_prediction_adapters_recover_eps() {
    use adjoint_dpm::diffusion::{SamplePrediction, VPrediction};
    let device = Default::default();
    let net = TinyEps::<F64>::new(2, &device);
    let schedule = NoiseSchedule::cosine();
    let x = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 5), SHAPE), &device);
    let t = Tensor::<F64, 1>::from_data(TensorData::from([321.25]), &device);
    let eps = values(net.eps(x.clone(), t.clone()));
    let reparam = |v| Reparam {
        net: net.clone(),
        schedule: schedule.clone(),
        v,
    };
    let via_v = values(VPrediction::new(reparam(true), schedule.clone()).eps(x.clone(), t.clone()));
    let via_x0 = values(SamplePrediction::new(reparam(false), schedule.clone()).eps(x, t));
    assert!(rel_err(&via_v, &eps) < 1e-12 && rel_err(&via_x0, &eps) < 1e-10);
}

/// Returns NaN from the third network call on.
#[derive(Module, Debug)]
struct Poisoned<B: Backend> {
    net: TinyEps<B>,
}

impl<B: Backend> EpsModel<B, 4> for Poisoned<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        use burn::tensor::ElementConversion;
        let tv: f64 = t.clone().into_scalar().elem();
        let out = self.net.eps(x, t);
        if tv < 500.0 {
            out.mul_scalar(f64::NAN)
        } else {
            out
        }
    }
}

#[test]
fn a_non_finite_network_output_names_the_step_and_time() {
    use adjoint_dpm::diffusion::DiffusionError;
    let device = Default::default();
    let model = Poisoned {
        net: TinyEps::<F64>::new(2, &device),
    };
    let schedule = NoiseSchedule::ddpm_linear();
    let x = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 6), SHAPE), &device);
    for sampler in [Sampler::ddim(10), Sampler::dpm_solver_pp_2m(10)] {
        let ts = sampler.timesteps(&schedule).unwrap();
        let first_bad = ts.iter().position(|&t| t < 500.0).unwrap();
        let e = sampler.sample_inference(&model, &schedule, x.clone()).unwrap_err();
        match e {
            DiffusionError::NonFiniteEps { step, t } => {
                assert_eq!(step, first_bad, "{:?}", sampler.kind);
                assert!((t - ts[first_bad]).abs() < 1e-6, "{:?}: t = {t}", sampler.kind);
            }
            other => panic!("{:?}: {other:?}", sampler.kind),
        }
    }
}

#[test]
fn dpm_solver_pp_is_better_than_ddim_and_refuses_backsolve() {
    let device = Default::default();
    let model = TinyEps::<F64>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let x = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 7), SHAPE), &device);
    // Reference: DDIM with many steps on the same "linspace" grid family.
    let mut fine = Sampler::ddim(500);
    fine.spacing = adjoint_dpm::diffusion::TimestepSpacing::Trailing;
    let reference = values(fine.sample_inference(&model, &schedule, x.clone()).unwrap());
    let err = |s: Sampler| {
        rel_err(
            &values(s.sample_inference(&model, &schedule, x.clone()).unwrap()),
            &reference,
        )
    };
    let (dpm, ddim) = (err(Sampler::dpm_solver_pp_2m(20)), err(Sampler::ddim(20)));
    assert!(
        dpm < ddim / 3.0,
        "DPM-Solver++(2M) {dpm:e} vs DDIM {ddim:e} at 20 steps"
    );

    let model = TinyEps::<Ad>::new(2, &device);
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 7), SHAPE), &device).require_grad();
    for sampler in [
        Sampler::dpm_solver_pp_2m(10),
        Sampler::dpm_solver_pp_3m(10),
        Sampler::unipc(10),
    ] {
        let refused = sampler
            .gradient(GradientMode::Backsolve(BacksolveOptions::default()))
            .sample(&model, &schedule, x_t.clone());
        assert!(matches!(
            refused,
            Err(adjoint_dpm::diffusion::DiffusionError::UnsupportedGradient { .. })
        ));
    }
}

#[test]
fn adjoint_diagnostic_shrinks_with_the_number_of_steps() {
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 8), SHAPE), &device);
    let reports: Vec<_> = [10, 40]
        .iter()
        .map(|&n| {
            Sampler::ddim(n)
                .adjoint_diagnostic(
                    &model,
                    &schedule,
                    x_t.clone(),
                    |x0| x0.powi_scalar(2).sum(),
                    BacksolveOptions::default(),
                )
                .unwrap()
        })
        .collect();
    for r in &reports {
        assert!(r.gradient_rel_diff > 0.0 && r.reconstruction_rel_err > 0.0, "{r:?}");
    }
    assert!(
        reports[1].gradient_rel_diff < 0.5 * reports[0].gradient_rel_diff,
        "{reports:?}"
    );
    assert!(
        reports[1].reconstruction_rel_err < 0.5 * reports[0].reconstruction_rel_err,
        "{reports:?}"
    );
}

#[test]
fn img2img_gradients_reach_the_clean_sample_and_the_noise() {
    // x_0 → noised to the first of the last 3 of 5 steps → sampled; dL/dx_0 and dL/dε against
    // central differences of the inference path, in the exact modes and (to its tolerance)
    // AdjointDPM.
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let inner = model.valid();
    let schedule = NoiseSchedule::sd_scaled_linear();
    let w = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 2), SHAPE), &device);
    let loss_of =
        |x0: Tensor<F64, 4>| values((x0.clone() * w.clone()).sum() + x0.powi_scalar(2).sum().mul_scalar(0.1))[0];
    // Measured: 1.3e-9 exact (the differences' own error); AdjointDPM 6.7e-2, the error of its
    // reverse integration over 3 Euler steps.
    let modes = [
        (GradientMode::Checkpointed(Schedule::All), 1e-7),
        (GradientMode::Backprop, 1e-7),
        (GradientMode::Backsolve(BacksolveOptions::default()), 0.15),
    ];
    for base in [
        Sampler::ddim(5),
        Sampler::dpm_solver_pp_2m(5).karras_sigmas(true),
        Sampler::unipc(5),
    ] {
        let sampler = base.strength(0.6);
        assert_eq!(sampler.timesteps(&schedule).unwrap().len(), 3);
        let at = |clean: Vec<f64>, eps: Vec<f64>| {
            let clean = Tensor::<F64, 4>::from_data(TensorData::new(clean, SHAPE), &device);
            let eps = Tensor::<F64, 4>::from_data(TensorData::new(eps, SHAPE), &device);
            let x_t = sampler.noised(&schedule, clean, eps).unwrap();
            loss_of(sampler.sample_inference(&inner, &schedule, x_t).unwrap())
        };
        let h = 1e-6;
        let fd = |which: usize, i: usize| {
            let nudged = |d: f64| {
                let (mut clean, mut eps) = (noise(SHAPE, 3), noise(SHAPE, 1));
                [&mut clean, &mut eps][which][i] += d;
                at(clean, eps)
            };
            (nudged(h) - nudged(-h)) / (2.0 * h)
        };
        for (mode, tol) in modes {
            if sampler.kind.is_multistep() && matches!(mode, GradientMode::Backsolve(_)) {
                continue;
            }
            let clean = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 3), SHAPE), &device).require_grad();
            let eps = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device).require_grad();
            let x_t = sampler.noised(&schedule, clean.clone(), eps.clone()).unwrap();
            let x0 = sampler.gradient(mode).sample(&model, &schedule, x_t).unwrap();
            let w = Tensor::<Ad, 4>::from_inner(w.clone());
            let grads = ((x0.clone() * w).sum() + x0.powi_scalar(2).sum().mul_scalar(0.1)).backward();
            let (d_clean, d_eps) = (values(clean.grad(&grads).unwrap()), values(eps.grad(&grads).unwrap()));
            for i in [0, 9, 22, 31] {
                for (which, got) in [(0, d_clean[i]), (1, d_eps[i])] {
                    let want = fd(which, i);
                    assert!(
                        (got - want).abs() < tol * want.abs().max(1.0),
                        "{:?} {mode:?} d/d{}[{i}]: {got} vs FD {want}",
                        sampler.kind,
                        ["x_0", "ε"][which]
                    );
                }
            }
        }
    }
}

/// img2img keeping only the step from t = 0 with `set_alpha_to_one` off: that step starts and
/// ends on ᾱ_0, and the sample comes back as it went in (diffusers' scheduler steps to the same
/// level), for a one-step and a multistep sampler, with and without a graph.
#[test]
fn a_zero_step_leaves_the_sample_as_it_is() {
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    for mut sampler in [Sampler::ddim(2), Sampler::plms(2)] {
        sampler.final_alpha_one = false;
        let sampler = sampler.strength(0.5);
        assert_eq!(sampler.rho_grid(&schedule).unwrap(), [schedule.rho(0.0)]);
        let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device).require_grad();
        let x_0 = sampler.sample(&model, &schedule, x_t.clone()).unwrap();
        assert_eq!(values(x_0.clone()), values(x_t.clone()));
        let grads = x_0.sum().backward();
        assert!(values(x_t.grad(&grads).unwrap()).iter().all(|g| *g == 1.0));
        let inner = model.valid();
        let trajectory = sampler.trajectory_inference(&inner, &schedule, x_t.inner()).unwrap();
        assert_eq!(trajectory.len(), 1);
    }
}
