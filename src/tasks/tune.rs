//! The loop under tasks 3 and 4: move a model's trainable parameters (an embedding, LoRA
//! adapters, all weights) with Adam so that a loss on the images it samples falls. Which
//! parameters move is the model's business (`no_grad`, `train_only`, `with_lora`); the adjoint
//! does no work for the frozen ones.

use burn::backend::Autodiff;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::diffusion::{NoiseSchedule, Sampler};
use crate::tasks::common::{positive, scalar, step_noise, Classifier, Decoder, TaskError, TaskModel};
use crate::tasks::resume::{restore, save, Restored, Resume};

/// Settings of the tuning loop.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Adam steps.
    pub iters: usize,
    /// Learning rate.
    pub lr: f64,
    /// The sampler and its gradient mode.
    pub sampler: Sampler,
    /// Seed of the noise a stochastic sampler injects at each step: iteration i draws with
    /// `step_noise_seed + i` ([`step_noise`]).
    pub step_noise_seed: u64,
    /// Save the state after every iteration and continue from a saved one (see [`Resume`]).
    pub resume: Option<Resume>,
}

/// Tunes `model`; `noise(i)` gives iteration i's batch of x_T (a function of i alone, so a
/// resumed run draws the same noise), `loss(images)` the objective of
/// the decoded samples. Returns the tuned model and the loss of each iteration.
#[allow(clippy::too_many_arguments)]
pub fn tune_through_sampling<B, M, Dec>(
    model: M,
    decoder: &Dec,
    schedule: &NoiseSchedule,
    config: &Tuning,
    noise: &mut dyn FnMut(usize) -> Tensor<B, 4>,
    loss: &dyn Fn(Tensor<Autodiff<B>, 4>) -> Tensor<Autodiff<B>, 1>,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<(M, Vec<f64>), TaskError>
where
    B: Backend,
    M: TaskModel<B>,
    Dec: Decoder<Autodiff<B>>,
{
    positive("lr", config.lr)?;
    let device = model.devices().into_iter().next().unwrap_or_default();
    let Restored {
        module: mut model,
        mut optim,
        iter: start,
        mut losses,
    } = restore(&config.resume, model, AdamConfig::new().init(), &device)?;
    for iter in start..config.iters {
        let x_t = noise(iter);
        let xi = step_noise(
            &config.sampler,
            schedule,
            x_t.dims(),
            config.step_noise_seed.wrapping_add(iter as u64),
            &x_t.device(),
        )?;
        let xi = xi.into_iter().map(Tensor::from_inner).collect();
        let x0 = config
            .sampler
            .sample_with_noise(&model, schedule, Tensor::from_inner(x_t), xi)
            .map_err(|e| TaskError::from(e).at_iteration(iter))?;
        let value_tensor = loss(decoder.decode(x0));
        let value = scalar(value_tensor.clone().inner());
        if !value.is_finite() {
            return Err(TaskError::NonFiniteLoss { iter });
        }
        losses.push(value);
        let grads = GradientsParams::from_grads(value_tensor.backward(), &model);
        model = optim.step(config.lr, model, grads);
        save(&config.resume, &model, &optim, iter + 1, &losses)?;
        on_iter(iter, value);
    }
    Ok((model, losses))
}

/// Gram matrices of feature maps, normalised by their size: the style statistics of Gatys et al.
pub fn gram<B: Backend>(features: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, c, h, w] = features.dims();
    let f = features.reshape([b, c, h * w]);
    f.clone().matmul(f.swap_dims(1, 2)).div_scalar((c * h * w) as f64)
}

/// Channel means of feature maps (global average pooling), `[b, c, 1]`: what a classifier's head
/// sees of an image, wherever in it the object is.
pub fn channel_means<B: Backend>(features: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, c, h, w] = features.dims();
    features.reshape([b, c, h * w]).mean_dim(2)
}

/// A loss on a classifier's feature maps against those of one target image, summed over maps:
/// the style loss of task 4 (Gatys et al.: Gram matrices, [`StyleLoss::new`]) or the appearance
/// loss of task 3 (channel means, [`StyleLoss::appearance`]).
pub struct StyleLoss<'a, B: Backend, K: Classifier<B>> {
    classifier: &'a K,
    statistic: fn(Tensor<B, 4>) -> Tensor<B, 3>,
    targets: Vec<Tensor<B, 3>>,
}

impl<'a, B: Backend, K: Classifier<B>> StyleLoss<'a, B, K> {
    /// The style loss towards `style` (`[1, 3, h, w]`): Gram matrices of `classifier`'s features.
    pub fn new(classifier: &'a K, style: Tensor<B, 4>) -> Self {
        Self::with_statistic(classifier, style, gram)
    }

    /// The appearance loss towards `reference` (`[1, 3, h, w]`): channel means of
    /// `classifier`'s features. Unlike a pixel loss, it does not ask a sample to put the object
    /// where the reference has it — which different noises cannot all do, so a pixel loss is
    /// best served by shrinking the object.
    pub fn appearance(classifier: &'a K, reference: Tensor<B, 4>) -> Self {
        Self::with_statistic(classifier, reference, channel_means)
    }

    fn with_statistic(classifier: &'a K, target: Tensor<B, 4>, statistic: fn(Tensor<B, 4>) -> Tensor<B, 3>) -> Self {
        let targets = classifier
            .features(target)
            .into_iter()
            .map(|f| statistic(f).detach())
            .collect();
        Self {
            classifier,
            statistic,
            targets,
        }
    }

    /// The loss of a batch of images (0 for a classifier without feature maps).
    pub fn loss(&self, images: Tensor<B, 4>) -> Tensor<B, 1> {
        let b = images.dims()[0];
        let zero = Tensor::zeros([1], (&images.device(), images.dtype()));
        self.classifier
            .features(images)
            .into_iter()
            .map(self.statistic)
            .zip(&self.targets)
            .map(|(g, t)| (g - t.clone().repeat_dim(0, b)).square().mean())
            .fold(zero, |a, b| a + b)
    }
}
