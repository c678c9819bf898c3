//! Task 1, guided sampling (vocabulary expansion): optimise the initial noise x_T so that samples
//! of an *unconditional* model are classified as a target class (AdjointDPM §4.1).
//!
//! `L(x_T) = CE(classifier(decode(sample(x_T))), target) + λ · mean_i (‖x_T,i‖²/d − 1)²`: the
//! second term keeps each x_T on the shell where d-dimensional Gaussian noise lives, so that the
//! optimised noise stays a plausible sample.
//!
//! A stochastic sampler's step noises ξ_k are optimised with x_T (as DOODL does), each under the
//! same shell term: through η = 1 DDIM or Euler ancestral, x_T alone steers little of the sample.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Param;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::diffusion::{NoiseSchedule, Sampler};
use crate::tasks::common::{
    positive, scalar, to_f64, FrozenPipeline, Noise, TaskClassifier, TaskDecoder, TaskError, TaskModel,
};
use crate::tasks::resume::{restore, save, Restored, Resume};

/// Settings of guided sampling.
#[derive(Debug, Clone)]
pub struct GuidedSampling {
    /// The class the samples should become.
    pub target: usize,
    /// Optimisation steps.
    pub iters: usize,
    /// Adam's learning rate on x_T.
    pub lr: f64,
    /// λ, the weight of the Gaussian-shell prior.
    pub prior_weight: f64,
    /// The sampler and its gradient mode.
    pub sampler: Sampler,
    /// Seed of the noise a stochastic sampler injects at each step, held fixed through the
    /// optimisation ([`step_noise`](crate::tasks::common::step_noise)).
    pub step_noise_seed: u64,
    /// Save the state after every iteration and continue from a saved one (see [`Resume`]).
    pub resume: Option<Resume>,
}

/// What guided sampling achieved.
#[derive(Debug, Clone, Serialize)]
pub struct GuidedReport {
    /// Target class.
    pub target: usize,
    /// Fraction of the batch classified as the target before optimisation.
    pub target_rate_before: f64,
    /// … and after.
    pub target_rate_after: f64,
    /// Mean classifier probability of the target before and after.
    pub target_prob_before: f64,
    /// See `target_prob_before`.
    pub target_prob_after: f64,
    /// Loss at each iteration (before that iteration's update).
    pub losses: Vec<f64>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Result of a run: the report, the images before and after (`[b, 3, h, w]` flattened, in
/// [-1, 1]) and the optimised noise.
pub struct GuidedRun<B: Backend> {
    /// Metrics.
    pub report: GuidedReport,
    /// Samples from the initial noise.
    pub before: Tensor<B, 4>,
    /// Samples from the optimised noise.
    pub after: Tensor<B, 4>,
    /// The optimised x_T.
    pub x_t: Tensor<B, 4>,
    /// The optimised step noises of a stochastic sampler (empty for a deterministic one).
    pub step_noise: Vec<Tensor<B, 4>>,
}

/// Target rate and mean target probability, from logits.
fn judge<B: Backend>(logits: Tensor<B, 2>, target: usize) -> (f64, f64) {
    let [b, _] = logits.dims();
    let probs = burn::tensor::activation::softmax(logits.clone(), 1);
    let hits = to_f64(logits.argmax(1).reshape([b]).float())
        .iter()
        .filter(|&&p| p as usize == target)
        .count();
    let prob = scalar(probs.narrow(1, target, 1).mean());
    (hits as f64 / b as f64, prob)
}

/// Runs guided sampling from `x_t` (the batch of initial noises). `on_iter(i, loss)` is called
/// after every iteration.
pub fn guided_sampling<B, M, K, Dec>(
    model: &M,
    classifier: &K,
    decoder: &Dec,
    schedule: &NoiseSchedule,
    x_t: Tensor<B, 4>,
    config: &GuidedSampling,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<GuidedRun<B>, TaskError>
where
    B: Backend,
    M: TaskModel<B>,
    K: TaskClassifier<B>,
    Dec: TaskDecoder<B>,
{
    positive("lr", config.lr)?;
    let started = Instant::now();
    let device = x_t.device();
    let [batch, c, h, w] = x_t.dims();
    let d = (c * h * w) as f64;
    let nets = FrozenPipeline::new(
        model,
        classifier,
        decoder,
        schedule,
        config.sampler,
        config.step_noise_seed,
    );
    let before = nets.images(x_t.clone())?;
    let (rate_before, prob_before) = judge(nets.logits(before.clone()), config.target);

    let targets =
        Tensor::<Autodiff<B>, 1, Int>::from_data(TensorData::new(vec![config.target as i64; batch], [batch]), &device);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let tracked = |t: Tensor<B, 4>| Param::from_tensor(Tensor::<Autodiff<B>, 4>::from_inner(t).require_grad());
    let noise = Noise {
        steps: nets.step_noise(&x_t)?.into_iter().map(tracked).collect(),
        x_t: tracked(x_t),
    };
    let optim = AdamConfig::new().init();
    let Restored {
        module: mut noise,
        mut optim,
        iter: start,
        mut losses,
    } = restore(&config.resume, noise, optim, &device)?;
    for iter in start..config.iters {
        let x = noise.x_t.val();
        let steps: Vec<_> = noise.steps.iter().map(|p| p.val()).collect();
        let images = nets
            .tracked_images_with(x.clone(), steps.clone())
            .map_err(|e| e.at_iteration(iter))?;
        let logits = nets.classifier.logits(images);
        // The shell term of each noise tensor, averaged over x_T and the step noises.
        let shell = |t: Tensor<Autodiff<B>, 4>| {
            t.powi_scalar(2)
                .sum_dim(3)
                .sum_dim(2)
                .sum_dim(1)
                .reshape([batch])
                .div_scalar(d)
                .sub_scalar(1.0)
                .powi_scalar(2)
                .mean()
        };
        let count = 1 + steps.len();
        let prior = steps
            .into_iter()
            .fold(shell(x), |acc, t| acc + shell(t))
            .div_scalar(count as f64);
        let loss = ce.forward(logits, targets.clone()) + prior.mul_scalar(config.prior_weight);
        let value = scalar(loss.clone().inner());
        if !value.is_finite() {
            return Err(TaskError::NonFiniteLoss { iter });
        }
        losses.push(value);
        let grads = GradientsParams::from_grads(loss.backward(), &noise);
        noise = optim.step(config.lr, noise, grads);
        save(&config.resume, &noise, &optim, iter + 1, &losses)?;
        on_iter(iter, value);
    }
    let x_final = noise.x_t.val().inner();
    let steps_final: Vec<_> = noise.steps.iter().map(|p| p.val().inner()).collect();
    let after = nets.images_with(x_final.clone(), steps_final.clone())?;
    let (rate_after, prob_after) = judge(nets.logits(after.clone()), config.target);
    let report = GuidedReport {
        target: config.target,
        target_rate_before: rate_before,
        target_rate_after: rate_after,
        target_prob_before: prob_before,
        target_prob_after: prob_after,
        losses,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(GuidedRun {
        report,
        before,
        after,
        x_t: x_final,
        step_noise: steps_final,
    })
}
