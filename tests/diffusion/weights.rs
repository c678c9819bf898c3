//! Gradients through sampling w.r.t. a chosen subset of a real UNet's weights: low-rank adapters
//! on a frozen network, or a named subset.

use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use adjoint_dpm::tasks::UnetEps;
use adjoint_dpm_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::{noise, rel_err, values, Ad};

const CONFIG: &str = r#"{
  "block_out_channels": [8, 16], "layers_per_block": 1, "in_channels": 2, "out_channels": 2,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 8
}"#;

fn unet() -> UNet2DConditionModel<Ad> {
    let config: UNet2DConditionConfig = serde_json::from_str(CONFIG).unwrap();
    config.init::<Ad>(&Default::default()).unwrap()
}

fn model(unet: UNet2DConditionModel<Ad>) -> UnetEps<Ad> {
    let device = Default::default();
    let context = Tensor::<Ad, 3>::from_data(TensorData::new(noise([1, 1, 3, 8], 11), [1, 3, 8]), &device);
    let mut model = UnetEps::new(unet, context);
    model.context = model.context.set_require_grad(false);
    adjoint_dpm::ode::materialized(model)
}

/// dL/d(each listed weight) through 3 DDIM steps, for `mode`.
fn weight_grads(
    m: &UnetEps<Ad>,
    mode: GradientMode,
    pick: &dyn Fn(&UnetEps<Ad>) -> Vec<Tensor<Ad, 2>>,
) -> Vec<Option<Vec<f64>>> {
    let device = Default::default();
    let shape = [1, 2, 8, 8];
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(shape, 12), shape), &device);
    let x0 = Sampler::ddim(3)
        .gradient(mode)
        .sample(m, &NoiseSchedule::sd_scaled_linear(), x_t)
        .unwrap();
    let grads = x0.powi_scalar(2).sum().backward();
    pick(m).into_iter().map(|w| w.grad(&grads).map(values)).collect()
}

#[test]
fn lora_adapters_on_a_frozen_unet_are_the_only_weights_that_train() {
    let m = model(unet().no_grad().with_lora(2, 4.0));
    let attn = |m: &UnetEps<Ad>| m.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.clone();
    let pick = |m: &UnetEps<Ad>| {
        let a = attn(m);
        let lora = a.lora.unwrap();
        vec![
            lora.q.up.weight.val(),
            lora.v.up.weight.val(),
            lora.out.up.weight.val(),
            a.to_q.weight.val(),
        ]
    };
    let exact = weight_grads(&m, GradientMode::Checkpointed(Schedule::All), &pick);
    let reference = weight_grads(&m, GradientMode::Backprop, &pick);
    assert!(
        exact[3].is_none() && reference[3].is_none(),
        "the frozen projection received a gradient"
    );
    for k in 0..3 {
        let (a, b) = (exact[k].as_ref().unwrap(), reference[k].as_ref().unwrap());
        assert!(b.iter().any(|v| *v != 0.0), "adapter {k} got a zero gradient");
        assert!(
            rel_err(a, b) < 1e-10,
            "adapter {k}: checkpointed off backprop by {:e}",
            rel_err(a, b)
        );
    }
}

#[test]
fn a_named_subset_of_weights_trains_alone() {
    let m = model(adjoint_dpm::ode::train_only(unet(), |path| path.contains("attn2")));
    let pick = |m: &UnetEps<Ad>| {
        let block = &m.unet.down_blocks[0].attentions[0].transformer_blocks[0];
        vec![
            block.attn2.to_k.weight.val(),
            block.attn1.to_k.weight.val(),
            m.unet.time_embedding.linear_1.weight.val(),
        ]
    };
    let exact = weight_grads(&m, GradientMode::Checkpointed(Schedule::Recursive), &pick);
    let reference = weight_grads(&m, GradientMode::Backprop, &pick);
    assert!(
        exact[1].is_none() && exact[2].is_none(),
        "weights outside the subset received gradients"
    );
    let (a, b) = (exact[0].as_ref().unwrap(), reference[0].as_ref().unwrap());
    assert!(
        rel_err(a, b) < 1e-10,
        "attn2.to_k: checkpointed off backprop by {:e}",
        rel_err(a, b)
    );
}
