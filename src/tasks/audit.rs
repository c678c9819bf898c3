//! Task 2, security auditing: from a sample's noise x_T, find x_T' with ‖x_T' − x_T‖∞ ≤ ε whose
//! sample the classifier labels differently while the image stays close (AdjointDPM §4.3).
//!
//! Maximises `CE(classifier(decode(sample(x_T + δ))), y) − w · ‖image' − image‖²/n` over δ with
//! Adam, projecting δ back onto the ε-ball after each step.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Param;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::Serialize;

use crate::diffusion::{NoiseSchedule, Sampler};
use crate::tasks::common::{
    positive, scalar, to_f64, FrozenPipeline, Noise, TaskClassifier, TaskDecoder, TaskError, TaskModel,
};
use crate::tasks::resume::{restore, save, Restored, Resume};

/// Settings of an audit.
#[derive(Debug, Clone)]
pub struct Audit {
    /// Radius of the ℓ∞ ball around x_T.
    pub epsilon: f64,
    /// Adam steps.
    pub iters: usize,
    /// Learning rate on δ.
    pub lr: f64,
    /// Weight of the image-closeness penalty.
    pub closeness_weight: f64,
    /// The sampler and its gradient mode.
    pub sampler: Sampler,
    /// Seed of the noise a stochastic sampler injects at each step, held fixed through the
    /// optimisation ([`step_noise`](crate::tasks::common::step_noise)).
    pub step_noise_seed: u64,
    /// Save the state after every iteration and continue from a saved one (see [`Resume`]).
    pub resume: Option<Resume>,
}

/// What the audit found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// ε.
    pub epsilon: f64,
    /// Fraction of the batch whose label changed.
    pub success_rate: f64,
    /// Mean per-image RMS pixel distance between the original and the audited image.
    pub mean_image_rms: f64,
    /// Mean margin (original-class logit minus the best other) before and after; negative means
    /// the label changed.
    pub mean_margin_before: f64,
    /// See `mean_margin_before`.
    pub mean_margin_after: f64,
    /// Loss per iteration.
    pub losses: Vec<f64>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The result: report, images before/after, the audited noise.
pub struct AuditRun<B: Backend> {
    /// Metrics.
    pub report: AuditReport,
    /// Images from x_T.
    pub before: Tensor<B, 4>,
    /// Images from x_T'.
    pub after: Tensor<B, 4>,
    /// x_T'.
    pub x_t: Tensor<B, 4>,
}

/// Labels and margins of `images`.
fn margins<B: Backend>(logits: Tensor<B, 2>, labels: &[usize]) -> Vec<f64> {
    let [b, n] = logits.dims();
    let v = to_f64(logits);
    (0..b)
        .map(|i| {
            let row = &v[i * n..(i + 1) * n];
            let own = row[labels[i]];
            let other = row
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != labels[i])
                .map(|(_, x)| *x)
                .fold(f64::NEG_INFINITY, f64::max);
            own - other
        })
        .collect()
}

fn argmax_rows(v: &[f64], n: usize) -> Vec<usize> {
    v.chunks(n)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |a, (j, &x)| if x > a.1 { (j, x) } else { a })
                .0
        })
        .collect()
}

/// Audits the samples of `x_t`.
pub fn audit<B, M, K, Dec>(
    model: &M,
    classifier: &K,
    decoder: &Dec,
    schedule: &NoiseSchedule,
    x_t: Tensor<B, 4>,
    config: &Audit,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<AuditRun<B>, TaskError>
where
    B: Backend,
    M: TaskModel<B>,
    K: TaskClassifier<B>,
    Dec: TaskDecoder<B>,
{
    positive("epsilon", config.epsilon)?;
    positive("lr", config.lr)?;
    let started = Instant::now();
    let device = x_t.device();
    let batch = x_t.dims()[0];
    let nets = FrozenPipeline::new(
        model,
        classifier,
        decoder,
        schedule,
        config.sampler,
        config.step_noise_seed,
    );
    let before = nets.images(x_t.clone())?;
    let logits_before = nets.logits(before.clone());
    let classes = logits_before.dims()[1];
    let labels = argmax_rows(&to_f64(logits_before.clone()), classes);
    let margin_before = margins(logits_before, &labels);

    let targets = Tensor::<Autodiff<B>, 1, Int>::from_data(
        burn::tensor::TensorData::new(labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [batch]),
        &device,
    );
    let reference = Tensor::<Autodiff<B>, 4>::from_inner(before.clone());
    let base = Tensor::<Autodiff<B>, 4>::from_inner(x_t.clone());
    let ce = CrossEntropyLossConfig::new().init(&device);
    let delta = Noise {
        x_t: Param::from_tensor(Tensor::<Autodiff<B>, 4>::zeros(x_t.dims(), &device).require_grad()),
        steps: Vec::new(),
    };
    let optim = AdamConfig::new().init();
    let Restored {
        module: mut delta,
        mut optim,
        iter: start,
        mut losses,
    } = restore(&config.resume, delta, optim, &device)?;
    let eps = config.epsilon;
    for iter in start..config.iters {
        let image = nets
            .tracked_images(base.clone() + delta.x_t.val())
            .map_err(|e| e.at_iteration(iter))?;
        let closeness = (image.clone() - reference.clone()).powi_scalar(2).mean();
        let loss =
            ce.forward(classifier.logits(image), targets.clone()).neg() + closeness.mul_scalar(config.closeness_weight);
        let value = scalar(loss.clone().inner());
        if !value.is_finite() {
            return Err(TaskError::NonFiniteLoss { iter });
        }
        losses.push(value);
        let grads = GradientsParams::from_grads(loss.backward(), &delta);
        delta = optim.step(config.lr, delta, grads);
        // Project back onto the ε-ball (same parameter, so Adam keeps its state).
        delta.x_t = delta
            .x_t
            .map(|d| Tensor::from_inner(d.inner().clamp(-eps, eps)).require_grad());
        save(&config.resume, &delta, &optim, iter + 1, &losses)?;
        on_iter(iter, value);
    }
    let x_final = x_t.clone() + delta.x_t.val().inner();
    let after = nets.images(x_final.clone())?;
    let margin_after = margins(nets.logits(after.clone()), &labels);
    let flipped = margin_after.iter().filter(|m| **m < 0.0).count();
    let per_image: Vec<f64> = to_f64(
        (after.clone() - before.clone())
            .powi_scalar(2)
            .mean_dim(3)
            .mean_dim(2)
            .mean_dim(1)
            .reshape([batch]),
    )
    .into_iter()
    .map(f64::sqrt)
    .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let report = AuditReport {
        epsilon: eps,
        success_rate: flipped as f64 / batch as f64,
        mean_image_rms: mean(&per_image),
        mean_margin_before: mean(&margin_before),
        mean_margin_after: mean(&margin_after),
        losses,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(AuditRun {
        report,
        before,
        after,
        x_t: x_final,
    })
}
