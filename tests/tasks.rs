//! The tasks on tiny random networks: each one moves its metric the way it should.

use adjoint_dpm::diffusion::{EpsModel, NoiseSchedule, Sampler};
use adjoint_dpm::tasks::{guided_sampling, Classifier, GradientChoice, GuidedSampling, PixelSpace, SolverChoice};
use burn::backend::Flex;
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

type B = Flex;

#[derive(Module, Debug)]
struct TinyEps<B: Backend> {
    conv_in: Conv2d<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> EpsModel<B, 4> for TinyEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let h = self.conv_in.forward(x) + t.div_scalar(1000.0).reshape([1, 1, 1, 1]);
        self.conv_out.forward(h.tanh()).mul_scalar(0.5)
    }
}

/// Linear classifier on 4×4-pooled pixels.
#[derive(Module, Debug)]
struct TinyClassifier<B: Backend> {
    fc: Linear<B>,
    _bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Classifier<B> for TinyClassifier<B> {
    fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let pooled = burn::tensor::module::avg_pool2d(images, [2, 2], [2, 2], [0, 0], true, false);
        let [b, c, h, w] = pooled.dims();
        self.fc.forward(pooled.reshape([b, c * h * w]))
    }

    fn features(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        vec![images]
    }
}

fn networks(
    device: &burn::backend::flex::FlexDevice,
) -> (
    TinyEps<burn::backend::Autodiff<B>>,
    TinyClassifier<burn::backend::Autodiff<B>>,
) {
    <B as Backend>::seed(device, 3);
    let conv = |i, o| {
        Conv2dConfig::new([i, o], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .init(device)
    };
    let eps = adjoint_dpm::ode::materialized(TinyEps {
        conv_in: conv(3, 8),
        conv_out: conv(8, 3),
    });
    let classifier = adjoint_dpm::ode::materialized(TinyClassifier {
        fc: LinearConfig::new(3 * 4 * 4, 4).init(device),
        _bias: Param::from_tensor(Tensor::zeros([1], device)),
    });
    (eps, classifier)
}

#[test]
fn guided_sampling_raises_the_target_probability() {
    let device = Default::default();
    let (eps, classifier) = networks(&device);
    let x_t = Tensor::<B, 4>::random([3, 3, 8, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    // Euler ancestral: its step noise drawn once and held fixed, so x_T's optimisation sees one
    // map.
    for (solver, gradient) in [
        (SolverChoice::Ddim, GradientChoice::Exact),
        (SolverChoice::Ddim, GradientChoice::AdjointDpm),
        (SolverChoice::EulerAncestral, GradientChoice::Exact),
    ] {
        let config = GuidedSampling {
            target: 2,
            iters: 8,
            lr: 0.1,
            prior_weight: 0.1,
            sampler: solver.sampler(5, gradient),
            step_noise_seed: 3,
            resume: None,
        };
        let mut seen = 0;
        let run = guided_sampling(
            &eps,
            &classifier,
            &PixelSpace,
            &NoiseSchedule::sd_scaled_linear(),
            x_t.clone(),
            &config,
            &mut |_, _| seen += 1,
        )
        .unwrap();
        let r = &run.report;
        assert_eq!(seen, 8);
        assert!(
            r.losses[7] < r.losses[0],
            "{solver:?} {gradient:?}: loss did not fall: {:?}",
            r.losses
        );
        assert!(
            r.target_prob_after > r.target_prob_before,
            "{solver:?} {gradient:?}: {r:?}"
        );
        assert_eq!(run.after.dims(), [3, 3, 8, 8]);
    }
    let bad = GuidedSampling {
        target: 0,
        iters: 1,
        lr: -1.0,
        prior_weight: 0.0,
        sampler: Sampler::ddim(2),
        step_noise_seed: 0,
        resume: None,
    };
    assert!(guided_sampling(
        &eps,
        &classifier,
        &PixelSpace,
        &NoiseSchedule::sd_scaled_linear(),
        x_t,
        &bad,
        &mut |_, _| {}
    )
    .is_err());
}

#[test]
fn audit_stays_in_the_ball_and_pushes_the_label_away() {
    use adjoint_dpm::tasks::{audit, Audit};
    let device = Default::default();
    let (eps, classifier) = networks(&device);
    let x_t = Tensor::<B, 4>::random([3, 3, 8, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let config = Audit {
        epsilon: 0.3,
        iters: 8,
        lr: 0.1,
        closeness_weight: 0.1,
        sampler: SolverChoice::Ddim.sampler(5, GradientChoice::Exact),
        step_noise_seed: 0,
        resume: None,
    };
    let run = audit(
        &eps,
        &classifier,
        &PixelSpace,
        &NoiseSchedule::sd_scaled_linear(),
        x_t.clone(),
        &config,
        &mut |_, _| {},
    )
    .unwrap();
    let r = &run.report;
    assert!(r.losses[7] < r.losses[0], "{r:?}");
    assert!(r.mean_margin_after < r.mean_margin_before, "{r:?}");
    let moved: f32 = (run.x_t - x_t.clone()).abs().max().into_scalar();
    assert!(moved <= 0.3 + 1e-6, "left the ε-ball: {moved}");
    let bad = Audit { epsilon: 0.0, ..config };
    assert!(audit(
        &eps,
        &classifier,
        &PixelSpace,
        &NoiseSchedule::sd_scaled_linear(),
        x_t,
        &bad,
        &mut |_, _| {}
    )
    .is_err());
}

/// TinyEps with a trainable conditioning vector on its hidden channels.
#[derive(Module, Debug)]
struct CondEps<B: Backend> {
    net: TinyEps<B>,
    cond: Param<Tensor<B, 1>>,
}

impl<B: Backend> EpsModel<B, 4> for CondEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let h = self.net.conv_in.forward(x)
            + self.cond.val().reshape([1, 8, 1, 1])
            + t.div_scalar(1000.0).reshape([1, 1, 1, 1]);
        self.net.conv_out.forward(h.tanh()).mul_scalar(0.5)
    }
}

#[test]
fn tuning_an_embedding_or_the_weights_lowers_their_loss() {
    use adjoint_dpm::tasks::{gram, tune_through_sampling, Tuning};
    let device = Default::default();
    let (eps, classifier) = networks(&device);
    let schedule = NoiseSchedule::sd_scaled_linear();
    let noise = |i: usize| {
        <B as Backend>::seed(&Default::default(), i as u64);
        Tensor::<B, 4>::random(
            [2, 3, 8, 8],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &Default::default(),
        )
    };
    let config = Tuning {
        iters: 10,
        lr: 0.05,
        sampler: SolverChoice::Ddim.sampler(4, GradientChoice::Exact),
        step_noise_seed: 0,
        resume: None,
    };
    // Inversion: only the embedding moves, towards a reference image.
    let model = CondEps {
        net: eps.clone().no_grad(),
        cond: Param::from_tensor(Tensor::zeros([8], &device)),
    };
    let reference = Tensor::<burn::backend::Autodiff<B>, 4>::ones([1, 3, 8, 8], &device).mul_scalar(0.5);
    let mse = |images: Tensor<burn::backend::Autodiff<B>, 4>| (images - reference.clone()).powi_scalar(2).mean();
    let (tuned, losses) = tune_through_sampling(
        model,
        &PixelSpace,
        &schedule,
        &config,
        &mut |_| noise(0),
        &mse,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(losses[9] < losses[0], "inversion: {losses:?}");
    let weights = |m: &TinyEps<burn::backend::Autodiff<B>>| m.conv_in.weight.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(weights(&tuned.net), weights(&eps), "the frozen network moved");
    assert_ne!(
        tuned.cond.val().abs().sum().into_scalar(),
        0.0,
        "the embedding did not move"
    );
    // Stylisation: all weights move, towards the Gram statistics of a style image.
    let style = Tensor::<burn::backend::Autodiff<B>, 4>::random(
        [1, 3, 8, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let target = gram(classifier.features(style)[0].clone()).detach();
    let classifier_frozen = classifier.clone().no_grad();
    let style_loss = |images: Tensor<burn::backend::Autodiff<B>, 4>| {
        let g = gram(classifier_frozen.features(images)[0].clone());
        let [b, c, _] = g.dims();
        (g - target.clone().repeat_dim(0, b))
            .powi_scalar(2)
            .sum()
            .div_scalar((b * c) as f64)
    };
    let (_, losses) = tune_through_sampling(
        eps,
        &PixelSpace,
        &schedule,
        &config,
        &mut |_| noise(0),
        &style_loss,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(losses[9] < losses[0], "style: {losses:?}");
}

/// Task 3's appearance loss compares channel means of the classifier's feature maps: zero for
/// the reference moved elsewhere in the frame (here the features are the pixels, so any
/// rearrangement), the squared mean shift for a recoloured one.
#[test]
fn appearance_loss_ignores_where_the_object_is() {
    let device = Default::default();
    let (_, classifier) = networks(&device);
    let reference = Tensor::<burn::backend::Autodiff<B>, 4>::random(
        [1, 3, 8, 8],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let loss = adjoint_dpm::tasks::StyleLoss::appearance(&classifier, reference.clone());
    let value = |images| loss.loss(images).into_scalar().elem::<f64>();
    assert!(value(reference.clone().flip([3]).flip([2])) < 1e-12);
    let pixel = (reference.clone().flip([3]) - reference.clone())
        .square()
        .mean()
        .into_scalar()
        .elem::<f64>();
    assert!(pixel > 0.1, "the moved image differs pixel by pixel ({pixel})");
    let shift = Tensor::<burn::backend::Autodiff<B>, 4>::from_floats([[[[0.5]], [[0.0]], [[0.0]]]], &device);
    let recoloured = value(reference.clone() + shift);
    assert!((recoloured - 0.25 / 3.0).abs() < 1e-5, "{recoloured}");
    // Two images: the batch is compared image by image.
    let batch = Tensor::cat(vec![reference.clone(), reference], 0);
    assert!(value(batch) < 1e-12);
}
