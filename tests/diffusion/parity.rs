//! DDIM, DPM-Solver++(2M, 3M), UniPC, Euler and Heun (also on Karras', exponential and Lu's noise
//! levels, and img2img's last steps) step by step against diffusers' own schedulers (fixtures from
//! scripts/make_sampler_fixtures.py).

use adjoint_dpm::diffusion::{EpsModel, NoiseLevels, NoiseSchedule, Sampler, SamplerKind, TimestepSpacing};
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

#[test]
fn samplers_match_diffusers_schedulers_step_by_step() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let bytes = std::fs::read(format!("{dir}samplers.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}samplers.json")).unwrap()).unwrap();
    let device = Default::default();
    let (a, _) = read(&st, "A");
    let (c, _) = read(&st, "c");
    let (x_t, _) = read(&st, "x_T");
    let a = Tensor::<F64, 2>::from_data(TensorData::new(a, [4, 4]), &device).transpose();
    let model = LinearEps {
        a_t: Param::from_tensor(a),
        c: Param::from_tensor(Tensor::from_data(TensorData::new(c, [4]), &device)),
    };
    let x_t = Tensor::<F64, 2>::from_data(TensorData::new(x_t, [2, 4]), &device);
    let x_0 = Tensor::<F64, 2>::from_data(TensorData::new(read(&st, "x_0").0, [2, 4]), &device);

    let sd = NoiseSchedule::sd_scaled_linear();
    let linear = NoiseSchedule::ddpm_linear();
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
    ];
    for (name, schedule, sampler) in cases {
        let case = &meta["cases"][name];
        // Euler's and Heun's fractional timesteps are float32 in diffusers.
        let expected_ts: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        let ts = sampler.timesteps(schedule).unwrap();
        assert_eq!(ts.len(), expected_ts.len(), "{name}: number of timesteps");
        for (t, expected) in ts.iter().zip(&expected_ts) {
            assert!(
                (t - expected).abs() <= 1e-4,
                "{name}: timestep {t} against diffusers' {expected}"
            );
        }
        let (reference, shape) = read(&st, name);
        // img2img cases start from x_0 noised to their first timestep with x_T as the noise.
        let start = match sampler.strength < 1.0 {
            true => sampler.noised(schedule, x_0.clone(), x_t.clone()).unwrap(),
            false => x_t.clone(),
        };
        let trajectory = sampler.trajectory_inference(&model, schedule, start).unwrap();
        assert_eq!(trajectory.len(), shape[0], "{name}: number of samples");
        for (k, x) in trajectory.into_iter().enumerate() {
            let expected = &reference[k * 8..(k + 1) * 8];
            let e = rel_err(&values(x), expected);
            assert!(e <= 1e-6, "{name}: sample after step {k} off by {e:e}");
        }
    }
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
