//! DDIM, DPM-Solver++(2M, 3M), UniPC, Euler, Heun, PLMS, LMS, DEIS and DPM2 (also on Karras', exponential and Lu's noise
//! levels, and img2img's last steps) step by step against diffusers' own schedulers (fixtures from
//! scripts/make_sampler_fixtures.py).

use adjoint_dpm::diffusion::{
    Cfg, EpsModel, NoiseLevels, NoiseSchedule, RescaleSpace, Sampler, SamplerKind, SecondOrder, TimestepSpacing,
};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::{rel_err, values, F64};

/// ε(x, t) = x Aᵀ + c t/1000: the fixed noise prediction of the fixtures.
#[derive(Module, Debug)]
struct LinearEps<B: Backend> {
    a_t: Param<Tensor<B, 2>>,
    c: Param<Tensor<B, 1>>,
}

impl<B: Backend> EpsModel<B, 2> for LinearEps<B> {
    fn eps(&self, x: Tensor<B, 2>, t: Tensor<B, 1>) -> Tensor<B, 2> {
        x.matmul(self.a_t.val()) + (self.c.val() * t.div_scalar(1000.0)).unsqueeze::<2>()
    }
}

fn read(st: &safetensors::SafeTensors, name: &str) -> (Vec<f64>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

/// The fixtures' bytes and their metadata.
fn fixtures() -> (Vec<u8>, serde_json::Value) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let bytes = std::fs::read(format!("{dir}samplers.safetensors")).unwrap();
    let meta = serde_json::from_str(&std::fs::read_to_string(format!("{dir}samplers.json")).unwrap()).unwrap();
    (bytes, meta)
}

/// The fixtures' ε-model, x_T and x_0.
fn fixture_model(st: &safetensors::SafeTensors) -> (LinearEps<F64>, Tensor<F64, 2>, Tensor<F64, 2>) {
    let device = Default::default();
    let a = Tensor::<F64, 2>::from_data(TensorData::new(read(st, "A").0, [4, 4]), &device).transpose();
    let model = LinearEps {
        a_t: Param::from_tensor(a),
        c: Param::from_tensor(Tensor::from_data(TensorData::new(read(st, "c").0, [4]), &device)),
    };
    let x_t = Tensor::<F64, 2>::from_data(TensorData::new(read(st, "x_T").0, [2, 4]), &device);
    let x_0 = Tensor::<F64, 2>::from_data(TensorData::new(read(st, "x_0").0, [2, 4]), &device);
    (model, x_t, x_0)
}

/// Asserts that `sampler`'s timesteps are those of fixture case `name` (Euler's and Heun's
/// fractional ones are float32 in diffusers).
fn assert_timesteps(name: &str, sampler: &Sampler, schedule: &NoiseSchedule, meta: &serde_json::Value) {
    let expected: Vec<f64> = meta["cases"][name]["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let ts = sampler.timesteps(schedule).unwrap();
    assert_eq!(ts.len(), expected.len(), "{name}: number of timesteps");
    for (t, expected) in ts.iter().zip(&expected) {
        assert!(
            (t - expected).abs() <= 1e-4,
            "{name}: timestep {t} against diffusers' {expected}"
        );
    }
}

/// Asserts that a trajectory is fixture case `name`'s to 1e-6.
fn assert_trajectory(name: &str, trajectory: Vec<Tensor<F64, 2>>, st: &safetensors::SafeTensors) {
    let (reference, shape) = read(st, name);
    assert_eq!(trajectory.len(), shape[0], "{name}: number of samples");
    for (k, x) in trajectory.into_iter().enumerate() {
        let e = rel_err(&values(x), &reference[k * 8..(k + 1) * 8]);
        assert!(e <= 1e-6, "{name}: sample after step {k} off by {e:e}");
    }
}

#[test]
fn samplers_match_diffusers_schedulers_step_by_step() {
    let (bytes, meta) = fixtures();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (model, x_t, x_0) = fixture_model(&st);

    let sd = NoiseSchedule::sd_scaled_linear();
    let linear = NoiseSchedule::ddpm_linear();
    let zsnr = sd.rescale_zero_terminal_snr().unwrap();
    let with = |mut s: Sampler, spacing, offset, final_one| {
        s.spacing = spacing;
        s.steps_offset = offset;
        s.final_alpha_one = final_one;
        s
    };
    let cases = [
        (
            "ddim_sd",
            &sd,
            with(Sampler::ddim(10), TimestepSpacing::Leading, 1, false),
        ),
        (
            "ddim_linear_trailing",
            &linear,
            with(Sampler::ddim(8), TimestepSpacing::Trailing, 0, true),
        ),
        ("dpmpp2m_sd", &sd, Sampler::dpm_solver_pp_2m(10)),
        (
            "dpmpp2m_linear_leading",
            &linear,
            with(Sampler::dpm_solver_pp_2m(20), TimestepSpacing::Leading, 1, true),
        ),
        (
            "dpmpp2m_sd_karras",
            &sd,
            Sampler::dpm_solver_pp_2m(10).karras_sigmas(true),
        ),
        (
            "dpmpp2m_linear_karras",
            &linear,
            Sampler::dpm_solver_pp_2m(25).karras_sigmas(true),
        ),
        (
            "ddim_sd_img2img",
            &sd,
            with(Sampler::ddim(10), TimestepSpacing::Leading, 1, false).strength(0.6),
        ),
        (
            "dpmpp2m_sd_karras_img2img",
            &sd,
            Sampler::dpm_solver_pp_2m(20).karras_sigmas(true).strength(0.55),
        ),
        (
            "dpmpp2m_sd_img2img_sigma_min",
            &sd,
            with(Sampler::dpm_solver_pp_2m(20), TimestepSpacing::Linspace, 0, false).strength(0.6),
        ),
        ("dpmpp3m_sd", &sd, Sampler::dpm_solver_pp_3m(10)),
        ("dpmpp3m_sd_20", &sd, Sampler::dpm_solver_pp_3m(20)),
        (
            "dpmpp3m_linear_karras",
            &linear,
            Sampler::dpm_solver_pp_3m(25).karras_sigmas(true),
        ),
        (
            "dpmpp3m_sd_img2img_sigma_min",
            &sd,
            with(Sampler::dpm_solver_pp_3m(20), TimestepSpacing::Linspace, 0, false).strength(0.6),
        ),
        ("unipc_sd", &sd, Sampler::unipc(10)),
        ("unipc_linear_20", &linear, Sampler::unipc(20)),
        ("unipc_sd_karras", &sd, Sampler::unipc(12).karras_sigmas(true)),
        ("unipc_sd_img2img", &sd, Sampler::unipc(20).strength(0.6)),
        // Ending on sigma_min: diffusers' bh1 returns NaN on a last step to 0 (B(h) = −∞ times 0).
        (
            "unipc_bh1_sd_8",
            &sd,
            with(Sampler::unipc_bh1(8), TimestepSpacing::Linspace, 0, false),
        ),
        (
            "unipc_bh1_linear_20",
            &linear,
            with(Sampler::unipc_bh1(20), TimestepSpacing::Linspace, 0, false),
        ),
        ("unipc3_sd", &sd, Sampler::unipc_third_order(10)),
        ("unipc3_linear_20", &linear, Sampler::unipc_third_order(20)),
        (
            "unipc3_bh1_sd_8",
            &sd,
            with(
                Sampler {
                    kind: SamplerKind::UniPc {
                        bh1: true,
                        third_order: true,
                    },
                    ..Sampler::unipc(8)
                },
                TimestepSpacing::Linspace,
                0,
                false,
            ),
        ),
        (
            "unipc3_sd_karras",
            &sd,
            Sampler::unipc_third_order(12).karras_sigmas(true),
        ),
        ("unipc3_sd_img2img", &sd, Sampler::unipc_third_order(20).strength(0.6)),
        (
            "dpmpp2m_sd_exponential",
            &sd,
            Sampler::dpm_solver_pp_2m(12).noise_levels(NoiseLevels::Exponential),
        ),
        (
            "dpmpp2m_sd_lu",
            &sd,
            Sampler::dpm_solver_pp_2m(12).noise_levels(NoiseLevels::LuLambdas),
        ),
        (
            "unipc_linear_exponential",
            &linear,
            Sampler::unipc(15).noise_levels(NoiseLevels::Exponential),
        ),
        ("euler_sd_10", &sd, Sampler::euler(10)),
        ("euler_sd_20", &sd, Sampler::euler(20)),
        (
            "euler_linear_leading",
            &linear,
            with(Sampler::euler(25), TimestepSpacing::Leading, 1, true),
        ),
        ("euler_sd_karras", &sd, Sampler::euler(15).karras_sigmas(true)),
        (
            "euler_sd_leading_karras",
            &sd,
            with(Sampler::euler(12), TimestepSpacing::Leading, 1, true).karras_sigmas(true),
        ),
        (
            "euler_sd_exponential",
            &sd,
            Sampler::euler(12).noise_levels(NoiseLevels::Exponential),
        ),
        (
            "euler_sd_sigma_min",
            &sd,
            with(Sampler::euler(14), TimestepSpacing::Leading, 1, false),
        ),
        ("euler_sd_img2img", &sd, Sampler::euler(20).strength(0.6)),
        ("heun_sd_10", &sd, Sampler::heun(10)),
        ("heun_linear_15", &linear, Sampler::heun(15)),
        (
            "heun_sd_trailing_8",
            &sd,
            with(Sampler::heun(8), TimestepSpacing::Trailing, 0, true),
        ),
        ("heun_sd_karras", &sd, Sampler::heun(12).karras_sigmas(true)),
        ("heun_sd_img2img", &sd, Sampler::heun(20).strength(0.55)),
        (
            "euler_sd_zsnr_trailing",
            &zsnr,
            with(Sampler::euler(10), TimestepSpacing::Trailing, 0, true),
        ),
        (
            "dpmpp2m_sd_zsnr_trailing",
            &zsnr,
            with(Sampler::dpm_solver_pp_2m(12), TimestepSpacing::Trailing, 0, true),
        ),
        (
            "plms_sd",
            &sd,
            with(Sampler::plms(10), TimestepSpacing::Leading, 1, false),
        ),
        (
            "plms_linear_20",
            &linear,
            with(Sampler::plms(20), TimestepSpacing::Leading, 0, true),
        ),
        (
            "dpmpp2m_sd_heun",
            &sd,
            Sampler::dpm_solver_pp_2m(10).second_order(SecondOrder::Heun),
        ),
        (
            "dpmpp3m_sd_heun_20",
            &sd,
            Sampler::dpm_solver_pp_3m(20).second_order(SecondOrder::Heun),
        ),
        ("lms_sd", &sd, Sampler::lms(10)),
        ("lms_linear_20", &linear, Sampler::lms(20)),
        ("deis_sd_10", &sd, Sampler::deis(10)),
        ("deis3_sd_10", &sd, Sampler::deis_third_order(10)),
        ("deis3_linear_20", &linear, Sampler::deis_third_order(20)),
        ("deis_sd_img2img", &sd, Sampler::deis(20).strength(0.6)),
        ("kdpm2_sd_10", &sd, Sampler::dpm2(10)),
        ("kdpm2_linear_15", &linear, Sampler::dpm2(15)),
        ("kdpm2_sd_karras_12", &sd, Sampler::dpm2(12).karras_sigmas(true)),
    ];
    for (name, schedule, sampler) in cases {
        assert_timesteps(name, &sampler, schedule, &meta);
        // img2img cases start from x_0 noised to their first timestep with x_T as the noise.
        let start = match sampler.strength < 1.0 {
            true => sampler.noised(schedule, x_0.clone(), x_t.clone()).unwrap(),
            false => x_t.clone(),
        };
        assert_trajectory(
            name,
            sampler.trajectory_inference(&model, schedule, start).unwrap(),
            &st,
        );
    }
}

#[test]
fn stochastic_samplers_match_diffusers_with_the_same_noise() {
    let (bytes, meta) = fixtures();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (model, x_t, _) = fixture_model(&st);
    let (sd, linear) = (NoiseSchedule::sd_scaled_linear(), NoiseSchedule::ddpm_linear());
    let mut ddim_sd = Sampler::ddim(10).eta(1.0);
    (ddim_sd.steps_offset, ddim_sd.final_alpha_one) = (1, false);
    let mut ddim_trailing = Sampler::ddim(8).eta(0.5);
    ddim_trailing.spacing = TimestepSpacing::Trailing;
    let mut euler_a_leading = Sampler::euler_ancestral(10);
    (euler_a_leading.spacing, euler_a_leading.steps_offset) = (TimestepSpacing::Leading, 1);
    let cases = [
        ("ddim_sd_eta1", &sd, ddim_sd),
        ("ddim_linear_trailing_eta05", &linear, ddim_trailing),
        ("euler_ancestral_sd", &sd, Sampler::euler_ancestral(12)),
        ("dpmpp2m_sde_sd", &sd, Sampler::dpm_solver_pp_2m_sde(10)),
        (
            "dpmpp2m_sde_sd_karras",
            &sd,
            Sampler::dpm_solver_pp_2m_sde(20).karras_sigmas(true),
        ),
        ("dpmpp3m_sde_sd", &sd, Sampler::dpm_solver_pp_3m_sde(10)),
        (
            "dpmpp3m_sde_sd_karras",
            &sd,
            Sampler::dpm_solver_pp_3m_sde(20).karras_sigmas(true),
        ),
        ("euler_ancestral_linear_leading", &linear, euler_a_leading),
        (
            "dpmpp2m_sde_sd_heun",
            &sd,
            Sampler::dpm_solver_pp_2m_sde(10).second_order(SecondOrder::Heun),
        ),
        ("kdpm2_a_sd_10", &sd, Sampler::dpm2_ancestral(10)),
        (
            "kdpm2_a_sd_karras_12",
            &sd,
            Sampler::dpm2_ancestral(12).karras_sigmas(true),
        ),
    ];
    for (name, schedule, sampler) in cases {
        assert_timesteps(name, &sampler, schedule, &meta);
        let (noise, shape) = read(&st, &format!("{name}_noise"));
        assert_eq!(sampler.noise_count(schedule).unwrap(), shape[0], "{name}");
        let noise = noise
            .chunks(8)
            .map(|n| Tensor::<F64, 2>::from_data(TensorData::new(n.to_vec(), [2, 4]), &x_t.device()))
            .collect();
        let trajectory = sampler
            .trajectory_inference_with_noise(&model, schedule, x_t.clone(), noise)
            .unwrap();
        assert_trajectory(name, trajectory, &st);
    }
}

#[test]
fn lcm_and_tcd_match_diffusers_with_the_same_noise() {
    let (bytes, meta) = fixtures();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (model, x_t, x_0) = fixture_model(&st);
    let (sd, linear) = (NoiseSchedule::sd_scaled_linear(), NoiseSchedule::ddpm_linear());
    let mut long = Sampler::lcm(8);
    long.lcm.original_steps = 100;
    let cases = [
        ("lcm_sd_4", &sd, Sampler::lcm(4)),
        ("lcm_sd_1", &sd, Sampler::lcm(1)),
        ("lcm_linear_8_orig100", &linear, long),
        ("lcm_sd_img2img", &sd, Sampler::lcm(6).strength(0.5)),
        ("tcd_sd_4", &sd, Sampler::tcd(4)),
        ("tcd_sd_8_gamma0", &sd, Sampler::tcd(8).eta(0.0)),
        ("tcd_linear_6_gamma07", &linear, Sampler::tcd(6).eta(0.7)),
        ("tcd_sd_img2img", &sd, Sampler::tcd(6).strength(0.5)),
    ];
    for (name, schedule, sampler) in cases {
        assert_timesteps(name, &sampler, schedule, &meta);
        let noise: Vec<_> = match st.tensor(&format!("{name}_noise")) {
            Ok(_) => read(&st, &format!("{name}_noise"))
                .0
                .chunks(8)
                .map(|n| Tensor::<F64, 2>::from_data(TensorData::new(n.to_vec(), [2, 4]), &x_t.device()))
                .collect(),
            Err(_) => Vec::new(),
        };
        assert_eq!(sampler.noise_count(schedule).unwrap(), noise.len(), "{name}");
        let start = match sampler.strength < 1.0 {
            true => {
                let strength = meta["cases"][name]["strength"].as_f64().unwrap();
                assert_eq!(strength, sampler.strength, "{name}");
                sampler.noised(schedule, x_0.clone(), x_t.clone()).unwrap()
            }
            false => x_t.clone(),
        };
        let trajectory = sampler
            .trajectory_inference_with_noise(&model, schedule, start, noise)
            .unwrap();
        assert_trajectory(name, trajectory, &st);
    }
    // At these timesteps the boundary scalings are almost (c_skip, c_out) = (0, 1) (c_skip is
    // 3.7e-6 at t = 259); with timestep_scaling 0.01 they are not (0.036 there), and the run
    // leaves diffusers': the option reaches the step.
    let mut scaled = Sampler::lcm(4);
    scaled.lcm.timestep_scaling = 0.01;
    let noise: Vec<_> = read(&st, "lcm_sd_4_noise")
        .0
        .chunks(8)
        .map(|n| Tensor::<F64, 2>::from_data(TensorData::new(n.to_vec(), [2, 4]), &x_t.device()))
        .collect();
    let last = scaled
        .sample_inference_with_noise(&model, &sd, x_t.clone(), noise)
        .unwrap();
    let (reference, _) = read(&st, "lcm_sd_4");
    let e = rel_err(&values(last), &reference[4 * 8..]);
    assert!(e > 1e-3, "timestep_scaling 0.01 changed nothing ({e:e})");
}

#[test]
fn karras_levels_reach_the_network_as_rounded_timesteps() {
    // DDIM is Euler in ρ: y ← y + (ρ_{i+1} − ρ_i) ε(α_i y, t_i), with t_i the rounded timestep
    // of Karras level i (fractional t(ρ_i) would move c·t/1000 by up to 5e-4).
    let device = Default::default();
    let a: Vec<f64> = (0..16).map(|i| 0.05 * ((i * 7 % 11) as f64 - 5.0)).collect();
    let model = LinearEps {
        a_t: Param::from_tensor(Tensor::<F64, 2>::from_data(TensorData::new(a.clone(), [4, 4]), &device)),
        c: Param::from_tensor(Tensor::from_data(TensorData::from([0.5, -0.3, 0.2, 0.9]), &device)),
    };
    let x_t = Tensor::<F64, 2>::from_data(
        TensorData::new((0..8).map(|i| (i as f64 * 0.37).sin()).collect(), [2, 4]),
        &device,
    );
    let schedule = NoiseSchedule::sd_scaled_linear();
    let sampler = Sampler::ddim(8).karras_sigmas(true);
    let rhos = sampler.rho_grid(&schedule).unwrap();
    let ts = sampler.timesteps(&schedule).unwrap();
    assert_eq!((rhos.len(), ts.len(), ts[0], ts[7]), (9, 8, 999.0, 0.0));
    let mut y = values(x_t.clone())
        .into_iter()
        .map(|x| x / NoiseSchedule::alpha_of_rho(rhos[0]))
        .collect::<Vec<_>>();
    for i in 0..8 {
        let alpha = NoiseSchedule::alpha_of_rho(rhos[i]);
        let eps: Vec<f64> = (0..8)
            .map(|j| {
                let (row, col) = (j / 4, j % 4);
                let xa: f64 = (0..4).map(|k| alpha * y[row * 4 + k] * a[k * 4 + col]).sum();
                xa + [0.5, -0.3, 0.2, 0.9][col] * ts[i] / 1000.0
            })
            .collect();
        y = y
            .iter()
            .zip(&eps)
            .map(|(y, e)| y + (rhos[i + 1] - rhos[i]) * e)
            .collect();
    }
    let x0 = values(sampler.sample_inference(&model, &schedule, x_t).unwrap());
    let e = rel_err(&x0, &y);
    assert!(e < 1e-12, "{x0:?} vs {y:?} ({e:e})");
}

/// Returns fixed outputs for the two halves of the batch it is given: `[uncond; cond]`.
#[derive(Module, Debug)]
struct FixedHalves<B: Backend> {
    both: Param<Tensor<B, 2>>,
}

impl<B: Backend> EpsModel<B, 2> for FixedHalves<B> {
    fn eps(&self, _x: Tensor<B, 2>, _t: Tensor<B, 1>) -> Tensor<B, 2> {
        self.both.val()
    }
}

#[test]
fn guidance_rescale_matches_diffusers_in_eps_and_v() {
    let (bytes, meta) = fixtures();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let device = Default::default();
    let tensor = |name: &str| Tensor::<F64, 2>::from_data(TensorData::new(read(&st, name).0, [2, 4]), &device);
    let (x, uncond, cond) = (tensor("cfg_x"), tensor("cfg_uncond"), tensor("cfg_cond"));
    let number = |key: &str| meta["cfg"][key].as_f64().unwrap();
    let (scale, phi, t) = (number("scale"), number("phi"), number("t"));
    let schedule = NoiseSchedule::sd_scaled_linear();
    let (alpha, sigma) = (schedule.alpha(t), schedule.sigma(t));
    let time = Tensor::<F64, 1>::from_data(TensorData::from([t]), &device);
    let guided = |outputs: [Tensor<F64, 2>; 2], space: RescaleSpace| {
        let model = FixedHalves {
            both: Param::from_tensor(Tensor::cat(outputs.to_vec(), 0)),
        };
        let cfg = Cfg::new(model, scale).unwrap().guidance_rescale(phi, space).unwrap();
        values(cfg.eps(x.clone(), time.clone()))
    };
    // ε-prediction: the outputs are ε.
    let e = rel_err(
        &guided([uncond.clone(), cond.clone()], RescaleSpace::Epsilon),
        &read(&st, "cfg_rescaled").0,
    );
    assert!(e < 1e-12, "ε-space rescale off by {e:e}");
    // v-prediction: the outputs are v, seen as ε = α v + σ x; the rescale acts on v.
    let as_eps = |v: Tensor<F64, 2>| v.mul_scalar(alpha) + x.clone().mul_scalar(sigma);
    let e = rel_err(
        &guided([as_eps(uncond), as_eps(cond)], RescaleSpace::V(schedule)),
        &read(&st, "cfg_rescaled_v_eps").0,
    );
    assert!(e < 1e-12, "v-space rescale off by {e:e}");
    assert!(Cfg::new(
        FixedHalves {
            both: Param::from_tensor(tensor("cfg_x"))
        },
        1.0
    )
    .unwrap()
    .guidance_rescale(1.5, RescaleSpace::Epsilon)
    .is_err());
}
