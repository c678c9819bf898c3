//! Gradients through sampling w.r.t. a chosen subset of a real UNet's weights: low-rank adapters
//! on a frozen network, or a named subset.

use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use adjoint_dpm::tasks::UnetEps;
use adjoint_dpm_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use burn::module::AutodiffModule;
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
    let grads = ddim3_loss(m, mode, [1, 2, 8, 8], 12).backward();
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

/// Σ x₀² after 3 DDIM steps (gradient `mode`) from the seeded noise `seed` of `shape`.
fn ddim3_loss(m: &UnetEps<Ad>, mode: GradientMode, shape: [usize; 4], seed: u64) -> Tensor<Ad, 1> {
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise(shape, seed), shape), &Default::default());
    let x0 = Sampler::ddim(3)
        .gradient(mode)
        .sample(m, &NoiseSchedule::sd_scaled_linear(), x_t)
        .unwrap();
    x0.powi_scalar(2).sum()
}

/// dL/d(context) through 3 DDIM steps of a frozen UNet, and the loss, for `mode`.
fn context_grad(m: &UnetEps<Ad>, mode: GradientMode) -> (Vec<f64>, f64) {
    let loss = ddim3_loss(m, mode, [2, 2, 8, 8], 13);
    let value = values(loss.clone())[0];
    let grads = loss.backward();
    (values(m.context.val().grad(&grads).unwrap()), value)
}

#[test]
fn trainable_tokens_restrict_the_context_gradient() {
    // Embedding inversion of a prompt's tokens: only context rows 1..2 learn.
    let frozen = unet().no_grad();
    let mut m = model(frozen);
    m.context = m.context.set_require_grad(true);
    let full = m.clone();
    let masked = m.with_trainable_tokens(1, 2);
    let (g_full, loss) = context_grad(&full, GradientMode::Backprop);
    for mode in [GradientMode::Backprop, GradientMode::default()] {
        let (g, l) = context_grad(&masked, mode);
        assert!(
            (l - loss).abs() < 1e-12 * loss.abs(),
            "the mask changed the forward pass"
        );
        for token in 0..3 {
            let row = &g[token * 8..(token + 1) * 8];
            if token == 1 {
                let e = rel_err(row, &g_full[8..16]);
                assert!(e < 1e-10, "{mode:?}: learned token's gradient off by {e:e}");
            } else {
                assert!(
                    row.iter().all(|v| *v == 0.0),
                    "{mode:?}: frozen token {token} got {row:?}"
                );
            }
        }
    }
    // And the learned token's gradient is the loss's derivative (central differences). The
    // step is 1e-2 and the tolerance 1%: the UNet's GELU goes through burn's erf, a polynomial
    // approximation good to ~1e-7, whose wiggles (~1e-4 on this loss of ~1e3) drown the
    // differences of smaller steps. Exactness itself is the Checkpointed == Backprop check above.
    let inner = masked.valid();
    let device = Default::default();
    let loss_at = |delta: f64, i: usize| {
        let mut c = values(inner.context.val());
        c[8 + i] += delta;
        let mut m = inner.clone();
        m.context = burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(c, [1, 3, 8]), &device));
        let shape = [2, 2, 8, 8];
        let x_t = Tensor::from_data(TensorData::new(noise(shape, 13), shape), &device);
        let x0 = Sampler::ddim(3)
            .sample_inference(&m, &NoiseSchedule::sd_scaled_linear(), x_t)
            .unwrap();
        values(x0.powi_scalar(2).sum())[0]
    };
    let (g, _) = context_grad(&masked, GradientMode::default());
    for i in [0, 3, 7] {
        let fd = (loss_at(1e-2, i) - loss_at(-1e-2, i)) / 2e-2;
        assert!(
            (fd - g[8 + i]).abs() < 1e-2 * fd.abs().max(1.0),
            "dL/dc[1][{i}]: FD {fd} vs {}",
            g[8 + i]
        );
    }
}

#[test]
fn unet_gradient_wrt_the_text_embedding_matches_finite_differences() {
    // One UNet evaluation in f64, through cross-attention, GEGLU, LayerNorm and GroupNorm.
    let device = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&device, 21);
    let m = model(unet().no_grad());
    let shape = [2, 2, 8, 8];
    let x = Tensor::<Ad, 4>::from_data(TensorData::new(noise(shape, 13), shape), &device);
    let t = Tensor::<Ad, 1>::from_data(TensorData::from([500.0f64, 500.0]), &device);
    let w = Tensor::<Ad, 4>::from_data(TensorData::new(noise(shape, 14), shape), &device);
    let c0 = noise([1, 1, 3, 8], 5);
    let loss = |c: Tensor<Ad, 3>| (m.unet.forward(x.clone(), t.clone(), c.repeat_dim(0, 2), None) * w.clone()).sum();
    let ctx = Tensor::<Ad, 3>::from_data(TensorData::new(c0.clone(), [1, 3, 8]), &device).require_grad();
    let g = values(ctx.grad(&loss(ctx.clone()).backward()).unwrap());
    let at = |d: f64, i: usize| {
        let mut c = c0.clone();
        c[i] += d;
        values(loss(Tensor::from_data(TensorData::new(c, [1, 3, 8]), &device)))[0]
    };
    // Steps 2e-3 and 1e-3 with Richardson extrapolation: the f64 UNet forward carries a ~1e-8
    // relative wobble (below 1e-5 steps the differences are noise), so small steps cannot be
    // used. What remains is a 2.6e-3 relative difference whose source (outside the transformer
    // blocks, which agree to 1e-9 below) is not found yet: this guards against gross errors only.
    let central = |h: f64, i: usize| (at(h, i) - at(-h, i)) / (2.0 * h);
    let fd: Vec<f64> = (0..24)
        .map(|i| (4.0 * central(1e-3, i) - central(2e-3, i)) / 3.0)
        .collect();
    let e = rel_err(&g, &fd);
    assert!(e < 1e-7, "dL/d(context) off by {e:e} from central differences");
}

#[test]
fn transformer_block_gradient_wrt_the_context_is_exact() {
    // Cross-attention, LayerNorm and the GEGLU feed-forward of one UNet transformer block, in
    // f64, against central differences. With burn 0.21's own GELU (its ndarray/CUDA backward
    // differentiates the tanh approximation of an erf forward) this is off by ~6e-5.
    let device = Default::default();
    let m = model(unet().no_grad());
    let block = m.unet.down_blocks[0].attentions[0].transformer_blocks[0].clone();
    let c0 = noise([1, 1, 3, 8], 5);
    let x = Tensor::<Ad, 3>::from_data(TensorData::new(noise([1, 2, 16, 8], 7), [2, 16, 8]), &device);
    let loss = |c: Tensor<Ad, 3>| block.forward(x.clone(), c.repeat_dim(0, 2)).powi_scalar(2).sum();
    let ctx = Tensor::<Ad, 3>::from_data(TensorData::new(c0.clone(), [1, 3, 8]), &device).require_grad();
    let g = values(ctx.grad(&loss(ctx.clone()).backward()).unwrap());
    let at = |d: f64, i: usize| {
        let mut c = c0.clone();
        c[i] += d;
        values(loss(Tensor::from_data(TensorData::new(c, [1, 3, 8]), &device)))[0]
    };
    let fd: Vec<f64> = (0..24).map(|i| (at(1e-5, i) - at(-1e-5, i)) / 2e-5).collect();
    let e = rel_err(&g, &fd);
    assert!(e < 1e-7, "dL/d(context) off by {e:e}");
}

#[test]
fn a_batch_the_context_does_not_fit_is_a_typed_error() {
    let device = Default::default();
    let context = Tensor::<Ad, 3>::from_data(TensorData::new(noise([1, 2, 3, 8], 13), [2, 3, 8]), &device);
    let m = UnetEps::new(unet(), context);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let sample = |m: &UnetEps<Ad>, batch: usize| {
        let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise([batch, 2, 8, 8], 14), [batch, 2, 8, 8]), &device);
        Sampler::ddim(2).sample(m, &schedule, x_t)
    };
    // Two context rows split a batch into two groups: 3 samples do not split.
    let err = sample(&m, 3).unwrap_err();
    assert!(
        matches!(
            err,
            adjoint_dpm::diffusion::DiffusionError::BatchMismatch { batch: 3, .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2 rows"), "{err}");
    assert_eq!(sample(&m, 4).unwrap().dims(), [4, 2, 8, 8]);
    // Under guidance the network sees the batch doubled, which two rows always split.
    let guided = adjoint_dpm::diffusion::Cfg::new(m.clone(), 2.0).unwrap();
    let x_t = Tensor::<Ad, 4>::from_data(TensorData::new(noise([1, 2, 8, 8], 15), [1, 2, 8, 8]), &device);
    assert!(Sampler::ddim(2).sample(&guided, &schedule, x_t).is_ok());
}

/// An SDXL-style UNet (`addition_embed_type: "text_time"`): the pooled text embedding joins
/// the time embedding. Its gradient through 3 DDIM steps, with two conditioning rows each
/// spread over two samples: the checkpointed adjoint equals Backprop, and both equal central
/// differences of the loss.
#[test]
fn pooled_text_embedding_gradient_through_sampling_is_exact() {
    const SDXL: &str = r#"{
      "block_out_channels": [8, 16], "layers_per_block": 1, "in_channels": 2, "out_channels": 2,
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": true,
      "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 8,
      "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
      "projection_class_embeddings_input_dim": 30
    }"#;
    let device = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&device, 23);
    let config: UNet2DConditionConfig = serde_json::from_str(SDXL).unwrap();
    let unet = config.init::<Ad>(&device).unwrap().no_grad();
    let context = Tensor::<Ad, 3>::from_data(TensorData::new(noise([1, 2, 3, 8], 16), [2, 3, 8]), &device);
    let pooled0 = noise([1, 1, 2, 6], 17);
    let with_pooled = |pooled: Vec<f64>| {
        let pooled = Tensor::<Ad, 2>::from_data(TensorData::new(pooled, [2, 6]), &device);
        let m = UnetEps::new(unet.clone(), context.clone())
            .with_added_conditions(pooled, [64.0, 48.0, 0.0, 8.0, 64.0, 64.0]);
        let mut m = adjoint_dpm::ode::materialized(m);
        m.context = m.context.set_require_grad(false);
        m
    };
    let m = with_pooled(pooled0.clone());
    let grad = |mode| {
        let grads = ddim3_loss(&m, mode, [4, 2, 8, 8], 18).backward();
        values(m.text_embeds.as_ref().unwrap().val().grad(&grads).unwrap())
    };
    let backprop = grad(GradientMode::Backprop);
    let exact = grad(GradientMode::default());
    let e = rel_err(&exact, &backprop);
    assert!(e < 1e-10, "checkpointed off backprop by {e:e}");
    assert!(backprop.iter().all(|g| *g != 0.0), "{backprop:?}");
    // Central differences (the step and tolerance of the context's check above: burn's erf).
    let loss_at = |delta: f64, i: usize| {
        let mut p = pooled0.clone();
        p[i] += delta;
        values(ddim3_loss(&with_pooled(p), GradientMode::Backprop, [4, 2, 8, 8], 18))[0]
    };
    for i in [0, 5, 7, 11] {
        let fd = (loss_at(1e-2, i) - loss_at(-1e-2, i)) / 2e-2;
        assert!(
            (fd - exact[i]).abs() < 1e-2 * fd.abs().max(1.0),
            "dL/d(text_embeds)[{i}]: FD {fd} vs {}",
            exact[i]
        );
    }
    // Two rows over four samples are each row over its own two: the same as the rows given
    // per sample.
    let spread = |rows: Vec<f64>, width: usize| {
        let mut out = Vec::new();
        for row in rows.chunks(width) {
            out.extend_from_slice(row);
            out.extend_from_slice(row);
        }
        out
    };
    let per_sample = UnetEps::new(
        unet.clone(),
        Tensor::from_data(TensorData::new(spread(values(context.clone()), 24), [4, 3, 8]), &device),
    )
    .with_added_conditions(
        Tensor::from_data(TensorData::new(spread(pooled0.clone(), 6), [4, 6]), &device),
        [64.0, 48.0, 0.0, 8.0, 64.0, 64.0],
    );
    let x = Tensor::<Ad, 4>::from_data(TensorData::new(noise([4, 2, 8, 8], 19), [4, 2, 8, 8]), &device);
    let t = Tensor::<Ad, 1>::from_data(TensorData::from([300.0f64]), &device);
    use adjoint_dpm::diffusion::EpsModel;
    let e = rel_err(&values(m.eps(x.clone(), t.clone())), &values(per_sample.eps(x, t)));
    assert!(e < 1e-14, "grouped rows off per-sample rows by {e:e}");
    // Without its pooled embedding the model is a typed error before the first step.
    let mut bare = m.clone();
    bare.text_embeds = None;
    let err = ddim3_sample_err(&bare);
    assert!(err.contains("text_embeds") && err.contains("[2, 6]"), "{err}");
}

fn ddim3_sample_err(m: &UnetEps<Ad>) -> String {
    let x_t = Tensor::<Ad, 4>::zeros([2, 2, 8, 8], &Default::default());
    Sampler::ddim(3)
        .sample(m, &NoiseSchedule::sd_scaled_linear(), x_t)
        .unwrap_err()
        .to_string()
}

/// An inpainting UNet (its input the latent, the mask and the masked image's latents): the
/// gradient w.r.t. the masked image's latents through 3 DDIM steps (what an attack on an image
/// to be inpainted, PhotoGuard's, trains), with one row tiled over two samples. The checkpointed
/// adjoint equals Backprop, both equal central differences, and the tiled row equals the row
/// given per sample.
#[test]
fn masked_image_latents_gradient_through_inpainting_is_exact() {
    const INPAINT: &str = r#"{
      "block_out_channels": [8, 16], "layers_per_block": 1, "in_channels": 5, "out_channels": 2,
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
      "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 8
    }"#;
    let device = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&device, 29);
    let config: UNet2DConditionConfig = serde_json::from_str(INPAINT).unwrap();
    let unet = config.init::<Ad>(&device).unwrap().no_grad();
    let mask: Vec<f64> = (0..64)
        .map(|i| f64::from(u8::from((i % 8) >= 3 && i / 8 < 5)))
        .collect();
    let mask = Tensor::<Ad, 4>::from_data(TensorData::new(mask, [1, 1, 8, 8]), &device);
    let masked0 = noise([1, 2, 8, 8], 24);
    let with_masked = |masked: Vec<f64>| {
        let masked = Tensor::<Ad, 4>::from_data(TensorData::new(masked, [1, 2, 8, 8]), &device);
        model(unet.clone()).with_inpainting(mask.clone(), masked)
    };
    let m = with_masked(masked0.clone());
    let grad = |mode| {
        let grads = ddim3_loss(&m, mode, [2, 2, 8, 8], 25).backward();
        values(m.inpaint.as_ref().unwrap().val().grad(&grads).unwrap())
    };
    let backprop = grad(GradientMode::Backprop);
    let exact = grad(GradientMode::default());
    let e = rel_err(&exact, &backprop);
    assert!(e < 1e-10, "checkpointed off backprop by {e:e}");
    // [mask; masked latents]: the latents' part (channels 1 and 2) all receive a gradient.
    assert!(backprop[64..].iter().all(|g| *g != 0.0));
    let loss_at = |delta: f64, i: usize| {
        let mut p = masked0.clone();
        p[i] += delta;
        values(ddim3_loss(&with_masked(p), GradientMode::Backprop, [2, 2, 8, 8], 25))[0]
    };
    for i in [0, 9, 70, 127] {
        let fd = (loss_at(1e-2, i) - loss_at(-1e-2, i)) / 2e-2;
        let g = exact[64 + i];
        assert!(
            (fd - g).abs() < 1e-2 * fd.abs().max(1.0),
            "dL/d(masked latents)[{i}]: FD {fd} vs {g}"
        );
    }
    // One row tiled over the batch is that row given per sample.
    let twice = |v: Vec<f64>| [v.clone(), v].concat();
    let per_sample = model(unet.clone()).with_inpainting(
        Tensor::from_data(TensorData::new(twice(values(mask.clone())), [2, 1, 8, 8]), &device),
        Tensor::from_data(TensorData::new(twice(masked0.clone()), [2, 2, 8, 8]), &device),
    );
    let x = Tensor::<Ad, 4>::from_data(TensorData::new(noise([2, 2, 8, 8], 26), [2, 2, 8, 8]), &device);
    let t = Tensor::<Ad, 1>::from_data(TensorData::from([300.0f64]), &device);
    use adjoint_dpm::diffusion::EpsModel;
    let e = rel_err(&values(m.eps(x.clone(), t.clone())), &values(per_sample.eps(x, t)));
    assert!(e < 1e-14, "tiled row off per-sample rows by {e:e}");
}

/// A ControlNet on the UNet (its residuals added to the skips and the mid block): the
/// gradients w.r.t. the control image (one row tiled over two samples) and a ControlNet weight
/// through 3 DDIM steps. The checkpointed adjoint equals Backprop, and both equal central
/// differences.
#[test]
fn control_image_and_controlnet_gradients_are_exact() {
    use adjoint_dpm_models::controlnet::{ControlNetConfig, ControlNetModel};
    let device = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&device, 31);
    let config: ControlNetConfig = serde_json::from_str(
        r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "in_channels": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4,
            "conditioning_embedding_out_channels": [4, 8]}"#,
    )
    .unwrap();
    let controlnet = adjoint_dpm::ode::materialized(config.init::<Ad>(&device).unwrap());
    let unet = unet().no_grad();
    let image0: Vec<f64> = noise([1, 3, 16, 16], 32).iter().map(|v| 0.5 + 0.5 * v).collect();
    let with = |net: ControlNetModel<Ad>, image: Vec<f64>| {
        let image = Tensor::<Ad, 4>::from_data(TensorData::new(image, [1, 3, 16, 16]), &device);
        model(unet.clone()).with_control(net, image, 0.7)
    };
    let m = with(controlnet.clone(), image0.clone());
    let grads = |mode| {
        let grads = ddim3_loss(&m, mode, [2, 2, 8, 8], 33).backward();
        let control = &m.control[0];
        (
            values(control.image.val().grad(&grads).unwrap()),
            values(control.net.controlnet_mid_block.weight.val().grad(&grads).unwrap()),
        )
    };
    let (image_bp, weight_bp) = grads(GradientMode::Backprop);
    let (image_exact, weight_exact) = grads(GradientMode::default());
    for (name, a, b) in [
        ("control image", &image_exact, &image_bp),
        ("controlnet_mid_block", &weight_exact, &weight_bp),
    ] {
        assert!(
            b.iter().filter(|g| **g != 0.0).count() > b.len() / 2,
            "{name}: mostly zero"
        );
        let e = rel_err(a, b);
        assert!(e < 1e-10, "{name}: checkpointed off backprop by {e:e}");
    }
    let loss = |m: &UnetEps<Ad>| values(ddim3_loss(m, GradientMode::Backprop, [2, 2, 8, 8], 33))[0];
    let h = 1e-5;
    let check = |name: &str, fd: f64, g: f64| {
        assert!((fd - g).abs() < 1e-6 * fd.abs().max(1e-2), "{name}: FD {fd} vs {g}");
    };
    for i in [0, 100, 517, 767] {
        let at = |delta: f64| {
            let mut p = image0.clone();
            p[i] += delta;
            loss(&with(controlnet.clone(), p))
        };
        check(
            &format!("dL/d(image)[{i}]"),
            (at(h) - at(-h)) / (2.0 * h),
            image_exact[i],
        );
    }
    let weight0 = values(controlnet.controlnet_mid_block.weight.val());
    for i in [0, 37, 255] {
        let at = |delta: f64| {
            let mut w = weight0.clone();
            w[i] += delta;
            let mut net = controlnet.clone();
            let weight = Tensor::<Ad, 4>::from_data(TensorData::new(w, [16, 16, 1, 1]), &device);
            net.controlnet_mid_block.weight = burn::module::Param::from_tensor(weight);
            loss(&with(net, image0.clone()))
        };
        check(
            &format!("dL/d(mid weight)[{i}]"),
            (at(h) - at(-h)) / (2.0 * h),
            weight_exact[i],
        );
    }
    // A ControlNet of another UNet is a typed error before the first step.
    let other: ControlNetConfig = serde_json::from_str(
        r#"{"block_out_channels": [8, 16], "layers_per_block": 2, "in_channels": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4,
            "conditioning_embedding_out_channels": [4, 8]}"#,
    )
    .unwrap();
    let err = ddim3_sample_err(&with(other.init::<Ad>(&device).unwrap(), image0.clone()));
    assert!(err.contains("ControlNet"), "{err}");
}
