//! Stochastic samplers (DDIM with η > 0, Euler ancestral, DPM-Solver++(2M) SDE, LCM, TCD): exact
//! gradients w.r.t. x_T, every step's noise, the conditioning and the weights, against backprop
//! and finite differences; their errors; and a property test over every sampler, noise levels,
//! convention, img2img strength and schedule.

use adjoint_dpm::diffusion::{DiffusionError, NoiseLevels, NoiseSchedule, Sampler, SamplerKind};
use adjoint_dpm::prelude::*;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::{noise, rel_err, values, Ad, TinyEps, F64, SHAPE};

/// Gradients of L = Σ w ⊙ x_0 + 0.1 Σ x_0² w.r.t. x_T, each noise tensor, the conditioning and a
/// weight, and L.
struct NoisyGrads {
    x_t: Vec<f64>,
    noise: Vec<Vec<f64>>,
    cond: Vec<f64>,
    weight: Vec<f64>,
    loss: f64,
}

fn noise_tensors<B: Backend>(count: usize, device: &B::Device) -> Vec<Tensor<B, 4>> {
    (0..count)
        .map(|k| Tensor::from_data(TensorData::new(noise(SHAPE, 100 + k as u64), SHAPE), device))
        .collect()
}

fn loss_of<B: Backend>(x0: Tensor<B, 4>) -> Tensor<B, 1> {
    let w = Tensor::<B, 4>::from_data(TensorData::new(noise(SHAPE, 2), SHAPE), &x0.device());
    (x0.clone() * w).sum() + x0.powi_scalar(2).sum().mul_scalar(0.1)
}

fn noisy_grads(model: &TinyEps<Ad>, schedule: &NoiseSchedule, sampler: Sampler) -> NoisyGrads {
    let device = Default::default();
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device).require_grad();
    let xi: Vec<_> = noise_tensors::<Ad>(sampler.noise_count(schedule).unwrap(), &device)
        .into_iter()
        .map(|n| n.require_grad())
        .collect();
    let x0 = sampler
        .sample_with_noise(model, schedule, x_t.clone(), xi.clone())
        .unwrap();
    let loss = loss_of(x0);
    let value = values(loss.clone())[0];
    let g = loss.backward();
    NoisyGrads {
        x_t: values(x_t.grad(&g).unwrap()),
        noise: xi.iter().map(|n| values(n.grad(&g).unwrap())).collect(),
        // None when no step ran (img2img keeping a zero step only: the model is not called).
        cond: model.cond.val().grad(&g).map(values).unwrap_or_default(),
        weight: model.conv_in.weight.val().grad(&g).map(values).unwrap_or_default(),
        loss: value,
    }
}

/// The gradient (x_T, cond, weight or a noise) on which two runs differ most, relatively.
fn widest_gap(a: &NoisyGrads, b: &NoisyGrads) -> (&'static str, f64) {
    let mut pairs = vec![
        ("x_T", &a.x_t, &b.x_t),
        ("cond", &a.cond, &b.cond),
        ("weight", &a.weight, &b.weight),
    ];
    pairs.extend(a.noise.iter().zip(&b.noise).map(|(a, b)| ("noise", a, b)));
    pairs
        .into_iter()
        .map(|(name, a, b)| match a.len() == b.len() {
            true => (name, rel_err(a, b)),
            false => (name, f64::NAN),
        })
        // A NaN gap counts as the widest.
        .fold(("none", 0.0), |worst, gap| if gap.1 <= worst.1 { worst } else { gap })
}

fn samplers() -> [Sampler; 8] {
    [
        Sampler::ddim(6).eta(1.0),
        Sampler::ddim(5).eta(0.4).noise_levels(NoiseLevels::Karras),
        Sampler::euler_ancestral(6),
        // First-order first and last steps, second order between.
        Sampler::dpm_solver_pp_2m_sde(6),
        // Under 15 steps: orders 1, 2, 3, 3, 2, 1.
        Sampler::dpm_solver_pp_3m_sde(6),
        // A noise tensor per step but the last.
        Sampler::lcm(5),
        Sampler::tcd(5).eta(0.5),
        Sampler::dpm2_ancestral(5),
    ]
}

#[test]
fn checkpointed_equals_backprop_through_stochastic_sampling() {
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    for sampler in samplers() {
        let reference = noisy_grads(&model, &schedule, sampler.gradient(GradientMode::Backprop));
        // Every step's noise matters but the last's, which a step to ρ = 0 scales by 0 (LCM
        // and TCD draw none for it).
        let (last, others) = reference.noise.split_last().unwrap();
        assert!(others.iter().all(|g| g.iter().any(|v| *v != 0.0)));
        let none_last = matches!(
            sampler.kind,
            SamplerKind::Lcm | SamplerKind::Tcd | SamplerKind::Dpm2 { .. }
        );
        assert_eq!(last.iter().all(|v| *v == 0.0), !none_last, "{:?}", sampler.kind);
        for kind in [Schedule::All, Schedule::Every(2), Schedule::Recursive] {
            let exact = noisy_grads(&model, &schedule, sampler.gradient(GradientMode::Checkpointed(kind)));
            let (name, e) = widest_gap(&exact, &reference);
            assert!(e < 1e-10, "{:?} {kind:?}: dL/d{name} off by {e:e}", sampler.kind);
        }
    }
}

#[test]
fn noise_and_x_t_gradients_match_finite_differences() {
    let device = Default::default();
    let model = TinyEps::<Ad>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let inner = model.valid();
    for sampler in samplers() {
        let g = noisy_grads(&model, &schedule, sampler);
        let count = sampler.noise_count(&schedule).unwrap();
        // L as a function of x_T and the noises, flattened as [x_T; ξ_0; …].
        let loss_at = |flat: &[f64]| {
            let n = SHAPE.iter().product::<usize>();
            let tensor = |k: usize| {
                Tensor::<F64, 4>::from_data(TensorData::new(flat[k * n..(k + 1) * n].to_vec(), SHAPE), &device)
            };
            let x0 = sampler
                .sample_inference_with_noise(&inner, &schedule, tensor(0), (1..=count).map(tensor).collect())
                .unwrap();
            values(loss_of(x0))[0]
        };
        let mut base = noise(SHAPE, 1);
        for n in noise_tensors::<F64>(count, &device) {
            base.extend(values(n));
        }
        assert!((loss_at(&base) - g.loss).abs() < 1e-10 * g.loss.abs().max(1.0));
        let n = SHAPE.iter().product::<usize>();
        let analytic: Vec<f64> = g.x_t.iter().chain(g.noise.iter().flatten()).copied().collect();
        for i in [0, 7, n + 3, 2 * n + 20, count * n + 31] {
            // At h = 1e-6 the differences' rounding (ε|L|/h) came within a factor of 2 of the
            // tolerance (DPM2 ancestral, 1.6e-6); at 1e-5 it and the O(h²) truncation are far below.
            let h = 1e-5;
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss_at(&p) - loss_at(&m)) / (2.0 * h);
            let e = (fd - analytic[i]).abs() / analytic[i].abs().max(1e-3);
            assert!(
                e < 1e-6,
                "{:?}: entry {i}: fd {fd}, adjoint {} ({e:e})",
                sampler.kind,
                analytic[i]
            );
        }
    }
}

#[test]
fn stochastic_samplers_name_bad_noise_eta_and_modes() {
    let device = Default::default();
    let model = TinyEps::<F64>::new(2, &device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let x_t = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device);
    let run = |sampler: Sampler, noise: Vec<Tensor<F64, 4>>| {
        sampler
            .sample_inference_with_noise(&model, &schedule, x_t.clone(), noise)
            .unwrap_err()
    };
    let ddim = Sampler::ddim(4).eta(1.0);
    assert_eq!(
        run(ddim, noise_tensors(3, &device)),
        DiffusionError::NoiseCount { expected: 4, got: 3 }
    );
    // A deterministic sampler takes no noise; `sample_inference` gives a stochastic one none.
    assert_eq!(
        run(Sampler::ddim(4), noise_tensors(4, &device)),
        DiffusionError::NoiseCount { expected: 0, got: 4 }
    );
    assert_eq!(
        Sampler::euler_ancestral(4)
            .sample_inference(&model, &schedule, x_t.clone())
            .unwrap_err(),
        DiffusionError::NoiseCount { expected: 4, got: 0 }
    );
    let mut wrong = noise_tensors::<F64>(4, &device);
    wrong[2] = Tensor::zeros([1, 2, 4, 4], &device);
    assert!(matches!(
        run(ddim, wrong),
        DiffusionError::ShapeMismatch { got, .. } if got == [1, 2, 4, 4]
    ));
    for bad in [
        Sampler::ddim(4).eta(-0.1),
        Sampler::ddim(4).eta(f64::NAN),
        Sampler::heun(4).eta(0.5),
        Sampler::lcm(4).eta(0.5),
        Sampler::tcd(4).eta(1.5),
    ] {
        assert!(matches!(run(bad, vec![]), DiffusionError::BadEta { .. }), "{bad:?}");
    }
    // LCM: no noise for its last step; its timesteps are those it was distilled on.
    assert_eq!(
        run(Sampler::lcm(4), noise_tensors(4, &device)),
        DiffusionError::NoiseCount { expected: 3, got: 4 }
    );
    let mut no_scaling = Sampler::lcm(4);
    no_scaling.lcm.timestep_scaling = f64::NAN;
    let mut no_original = Sampler::lcm(4);
    no_original.lcm.original_steps = 2000;
    for (bad, says) in [
        (Sampler::lcm(60), "60 steps cannot be picked from the 50 timesteps"),
        (
            Sampler::lcm(30).strength(0.5),
            "leaves 25 timesteps, fewer than the 30 steps",
        ),
        (Sampler::lcm(4).karras_sigmas(true), "not on Karras levels"),
        (no_scaling, "timestep_scaling NaN"),
        (no_original, "original_inference_steps 2000 must be in 1..=1000"),
    ] {
        let e = run(bad, vec![]);
        assert!(
            matches!(e, DiffusionError::SamplerOption { sampler: "LCM", .. }) && e.to_string().contains(says),
            "{bad:?}: {e}"
        );
    }
    // No continuous adjoint through injected noise.
    let model = TinyEps::<Ad>::new(2, &device);
    let backsolve = GradientMode::Backsolve(BacksolveOptions::default());
    for sampler in [
        ddim,
        Sampler::euler_ancestral(4),
        Sampler::dpm_solver_pp_2m_sde(4),
        Sampler::dpm_solver_pp_3m_sde(4),
        Sampler::lcm(4),
        Sampler::tcd(4),
        // Deterministic TCD lands below each level first, DPM2 is a step map: no ODE either.
        Sampler::tcd(4).eta(0.0),
        Sampler::dpm2(4),
        Sampler::dpm2_ancestral(4),
    ] {
        let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device);
        let count = sampler.noise_count(&schedule).unwrap();
        let e = sampler
            .gradient(backsolve)
            .sample_with_noise(&model, &schedule, x_t, noise_tensors(count, &device))
            .unwrap_err();
        assert!(matches!(e, DiffusionError::UnsupportedGradient { .. }), "{e:?}");
    }
}

/// One of every sampler, from an index.
fn sampler_of(kind: usize, steps: usize) -> Sampler {
    match kind {
        0 => Sampler::ddim(steps),
        1 => Sampler::ddim(steps).eta(0.7),
        2 => Sampler::euler(steps),
        3 => Sampler::euler_ancestral(steps),
        4 => Sampler::heun(steps),
        5 => Sampler::dpm_solver_pp_2m(steps),
        6 => Sampler::dpm_solver_pp_3m(steps),
        7 => Sampler::dpm_solver_pp_2m_sde(steps),
        8 => Sampler::dpm_solver_pp_3m_sde(steps),
        9 => Sampler::unipc(steps),
        10 => Sampler::unipc_third_order(steps),
        11 => Sampler::plms(steps),
        12 => Sampler::lms(steps),
        13 => Sampler::lcm(steps),
        14 => Sampler::tcd(steps),
        15 => Sampler::deis(steps),
        16 => Sampler::deis_third_order(steps),
        17 => Sampler::dpm2(steps),
        _ => Sampler::dpm2_ancestral(steps),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any sampler on any levels, convention, img2img strength and schedule: Checkpointed (every
    /// third state stored) equals Backprop for x_T, every step noise, the conditioning and a
    /// weight.
    #[test]
    fn any_sampler_configuration_is_exact(
        kind in 0usize..19,
        steps in 2usize..7,
        levels in 0usize..4,
        fractional in proptest::bool::ANY,
        strength in 0.5f64..=1.0,
        cosine in proptest::bool::ANY,
    ) {
        let mut sampler = sampler_of(kind, steps).strength(strength).noise_levels(
            [NoiseLevels::Spaced, NoiseLevels::Karras, NoiseLevels::Exponential, NoiseLevels::LuLambdas][levels],
        );
        if fractional {
            sampler.convention = adjoint_dpm::diffusion::TimestepConvention::Fractional;
        }
        if matches!(sampler.kind, SamplerKind::Lcm | SamplerKind::Tcd) {
            // LCM and TCD run on their distillation timesteps alone (other levels are a typed
            // error).
            sampler.noise_levels = NoiseLevels::Spaced;
            sampler.convention = adjoint_dpm::diffusion::TimestepConvention::Integer;
        }
        let schedule = match cosine {
            true => NoiseSchedule::cosine(),
            false => NoiseSchedule::sd_scaled_linear(),
        };
        let device = Default::default();
        let model = TinyEps::<Ad>::new(2, &device);
        let reference = noisy_grads(&model, &schedule, sampler.gradient(GradientMode::Backprop));
        proptest::prop_assert!(reference.loss.is_finite());
        let exact = noisy_grads(&model, &schedule, sampler.gradient(GradientMode::Checkpointed(Schedule::Every(3))));
        let (name, e) = widest_gap(&exact, &reference);
        proptest::prop_assert!(e < 1e-9, "{sampler:?}: dL/d{name} off by {e:e}");
        // Graph-free: the last sample, stepped interval by interval, is the trajectory's last.
        let inner = model.valid();
        let x_t = Tensor::<F64, 4>::from_data(TensorData::new(noise(SHAPE, 1), SHAPE), &device);
        let xi = noise_tensors::<F64>(sampler.noise_count(&schedule).unwrap(), &device);
        let last = values(sampler.sample_inference_with_noise(&inner, &schedule, x_t.clone(), xi.clone()).unwrap());
        let trajectory = sampler.trajectory_inference_with_noise(&inner, &schedule, x_t, xi).unwrap();
        let e = rel_err(&last, &values(trajectory[trajectory.len() - 1].clone()));
        proptest::prop_assert!(e < 1e-12, "{sampler:?}: sample_inference off the trajectory by {e:e}");
    }
}
