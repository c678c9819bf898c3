//! DDIM and DPM-Solver++(2M) step by step against diffusers' own schedulers
//! (fixtures from scripts/make_sampler_fixtures.py).

use adjoint_dpm::diffusion::{EpsModel, NoiseSchedule, Sampler, TimestepSpacing};
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
    ];
    for (name, schedule, sampler) in cases {
        let case = &meta["cases"][name];
        let expected_ts: Vec<usize> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(sampler.timesteps(schedule).unwrap(), expected_ts, "{name}: timesteps");
        let (reference, shape) = read(&st, name);
        let trajectory = sampler.trajectory_inference(&model, schedule, x_t.clone()).unwrap();
        assert_eq!(trajectory.len(), shape[0], "{name}: number of samples");
        for (k, x) in trajectory.into_iter().enumerate() {
            let expected = &reference[k * 8..(k + 1) * 8];
            let e = rel_err(&values(x), expected);
            assert!(e <= 1e-6, "{name}: sample after step {k} off by {e:e}");
        }
    }
}
