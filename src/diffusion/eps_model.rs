//! Noise-prediction networks, adapters from other parameterisations, classifier-free guidance.

use burn::module::{Module, ModuleDisplay};
use burn::tensor::{backend::Backend, ElementConversion, Tensor};

use crate::diffusion::error::DiffusionError;
use crate::diffusion::schedule::NoiseSchedule;

/// A noise-prediction network ε(x, t). Conditioning (a text or class embedding) lives inside the
/// module as a parameter, so gradients w.r.t. it come from the parameter machinery (freeze the
/// network's weights and keep the embedding trainable).
pub trait EpsModel<B: Backend, const D: usize>: Module<B> + ModuleDisplay {
    /// The predicted noise.
    ///
    /// # Shapes
    /// - `x`: `[batch, …]`, the noisy sample.
    /// - `t`: `[1]`, the continuous timestep in training units (`0 ..= N−1`).
    /// - output: shaped like `x`.
    ///
    /// A model whose conditioning fixes the batch may panic on a batch that
    /// [`check_batch`](Self::check_batch) rejects; the samplers call that first.
    fn eps(&self, x: Tensor<B, D>, t: Tensor<B, 1>) -> Tensor<B, D>;

    /// Whether `eps` accepts a batch of `batch` samples. A model whose conditioning holds one
    /// row per sample (or per group of samples) says no to other batches here, so that a
    /// sampler fails with a typed error before its first step instead of panicking inside the
    /// network. Any batch, by default.
    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        let _ = batch;
        Ok(())
    }
}

/// A network whose raw output is some other prediction target; see [`VPrediction`] and
/// [`SamplePrediction`].
pub trait Predictor<B: Backend, const D: usize>: Module<B> + ModuleDisplay {
    /// The network's raw output at `(x, t)`, shaped like `x`.
    fn predict(&self, x: Tensor<B, D>, t: Tensor<B, 1>) -> Tensor<B, D>;

    /// Whether `predict` accepts a batch of `batch` samples ([`EpsModel::check_batch`]).
    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        let _ = batch;
        Ok(())
    }
}

fn alpha_sigma<B: Backend>(schedule: &NoiseSchedule, t: &Tensor<B, 1>) -> (f64, f64) {
    let t: f64 = t.clone().into_scalar().elem();
    (schedule.alpha(t), schedule.sigma(t))
}

/// A v-prediction network (`v = α ε − σ x_0`, Salimans & Ho 2022; SD 2.x) seen as an ε-model:
/// `ε = σ x_t + α v`.
#[derive(Module, Debug)]
pub struct VPrediction<B: Backend, M: Module<B>> {
    /// The network.
    pub model: M,
    #[module(skip)]
    schedule: NoiseSchedule,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> VPrediction<B, M> {
    /// Wraps a v-prediction network trained with `schedule`.
    pub fn new(model: M, schedule: NoiseSchedule) -> Self {
        Self {
            model,
            schedule,
            _backend: core::marker::PhantomData,
        }
    }
}

impl<B: Backend, M: Predictor<B, D>, const D: usize> EpsModel<B, D> for VPrediction<B, M> {
    fn eps(&self, x: Tensor<B, D>, t: Tensor<B, 1>) -> Tensor<B, D> {
        let (alpha, sigma) = alpha_sigma(&self.schedule, &t);
        x.clone().mul_scalar(sigma) + self.model.predict(x, t).mul_scalar(alpha)
    }

    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        self.model.check_batch(batch)
    }
}

/// An x_0-prediction network seen as an ε-model: `ε = (x_t − α x̂_0)/σ`.
#[derive(Module, Debug)]
pub struct SamplePrediction<B: Backend, M: Module<B>> {
    /// The network.
    pub model: M,
    #[module(skip)]
    schedule: NoiseSchedule,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> SamplePrediction<B, M> {
    /// Wraps an x_0-prediction network trained with `schedule`.
    pub fn new(model: M, schedule: NoiseSchedule) -> Self {
        Self {
            model,
            schedule,
            _backend: core::marker::PhantomData,
        }
    }
}

impl<B: Backend, M: Predictor<B, D>, const D: usize> EpsModel<B, D> for SamplePrediction<B, M> {
    fn eps(&self, x: Tensor<B, D>, t: Tensor<B, 1>) -> Tensor<B, D> {
        let (alpha, sigma) = alpha_sigma(&self.schedule, &t);
        (x.clone() - self.model.predict(x, t).mul_scalar(alpha)).div_scalar(sigma)
    }

    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        self.model.check_batch(batch)
    }
}

/// Classifier-free guidance: `ε = ε_u + s (ε_c − ε_u)` (Ho & Salimans 2022), both halves from one
/// batched network call.
///
/// The wrapped model is called on the batch doubled, `[x; x]`, and must evaluate its first half
/// with the unconditional embedding and its second half with the conditional one (a conditioned
/// network holds both embeddings; see [`GuidanceEmbeddings`]).
///
/// [`Cfg::guidance_rescale`] adds diffusers' `guidance_rescale` (Lin et al. 2024, §3.4).
#[derive(Module, Debug)]
pub struct Cfg<B: Backend, M: Module<B>> {
    /// The conditioned network.
    pub model: M,
    #[module(skip)]
    scale: f64,
    #[module(skip)]
    rescale: Option<(f64, RescaleSpace)>,
    _backend: core::marker::PhantomData<B>,
}

/// Where [`Cfg::guidance_rescale`] measures standard deviations: the network's own output, as
/// diffusers does.
#[derive(Debug, Clone, PartialEq)]
pub enum RescaleSpace {
    /// An ε-prediction network's: the guided ε itself.
    Epsilon,
    /// A v-prediction network's (trained with this schedule): `v = (ε − σ x_t)/α`.
    V(NoiseSchedule),
}

impl<B: Backend, M: Module<B>> Cfg<B, M> {
    /// Guidance with scale `s` (1 = conditional only, 0 = unconditional only).
    pub fn new(model: M, scale: f64) -> Result<Self, DiffusionError> {
        if !scale.is_finite() {
            return Err(DiffusionError::BadGuidance {
                reason: format!("guidance scale {scale} is not finite"),
            });
        }
        Ok(Self {
            model,
            scale,
            rescale: None,
            _backend: core::marker::PhantomData,
        })
    }

    /// The guidance scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// diffusers' `guidance_rescale = φ` (Lin et al. 2024, §3.4, against the over-exposure of
    /// strong guidance, with zero-terminal-SNR schedules): the guided output `o` is scaled per
    /// sample to the conditional output's standard deviation, `φ · o · std(o_c)/std(o) +
    /// (1 − φ) · o`, in `space` (the network's output: v for a v-prediction network). φ in
    /// [0, 1].
    pub fn guidance_rescale(mut self, phi: f64, space: RescaleSpace) -> Result<Self, DiffusionError> {
        if !(0.0..=1.0).contains(&phi) {
            return Err(DiffusionError::BadGuidance {
                reason: format!("guidance rescale {phi} lies outside [0, 1]"),
            });
        }
        self.rescale = Some((phi, space));
        Ok(self)
    }
}

/// `o · std(reference)/std(o)` per sample (over every axis but the first).
fn match_std<B: Backend, const D: usize>(o: Tensor<B, D>, reference: Tensor<B, D>) -> Tensor<B, D> {
    let batch = o.dims()[0];
    let std = |t: Tensor<B, D>| t.reshape([batch as i64, -1]).var(1).sqrt();
    let mut shape = [1usize; D];
    shape[0] = batch;
    let ratio = (std(reference) / std(o.clone())).reshape(shape);
    o * ratio
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> EpsModel<B, D> for Cfg<B, M> {
    fn eps(&self, x: Tensor<B, D>, t: Tensor<B, 1>) -> Tensor<B, D> {
        let batch = x.dims()[0];
        let both = self.model.eps(Tensor::cat(vec![x.clone(), x.clone()], 0), t.clone());
        let uncond = both.clone().narrow(0, 0, batch);
        let cond = both.narrow(0, batch, batch);
        let guided = uncond.clone() + (cond.clone() - uncond).mul_scalar(self.scale);
        let Some((phi, space)) = &self.rescale else {
            return guided;
        };
        let mix = |o: Tensor<B, D>, c: Tensor<B, D>| match_std(o.clone(), c).mul_scalar(*phi) + o.mul_scalar(1.0 - phi);
        match space {
            RescaleSpace::Epsilon => mix(guided, cond),
            RescaleSpace::V(schedule) => {
                let (alpha, sigma) = alpha_sigma(schedule, &t);
                let v = |e: Tensor<B, D>| (e - x.clone().mul_scalar(sigma)).div_scalar(alpha);
                mix(v(guided), v(cond)).mul_scalar(alpha) + x.clone().mul_scalar(sigma)
            }
        }
    }

    /// The wrapped model sees the batch doubled.
    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        self.model.check_batch(2 * batch)
    }
}

/// The conditional and (optional) unconditional embeddings of a guided model, checked once.
#[derive(Debug, Clone)]
pub struct GuidanceEmbeddings<B: Backend, const E: usize> {
    /// The conditional embedding, e.g. `[batch, 77, 768]` text or `[batch, dim]` class rows.
    pub cond: Tensor<B, E>,
    /// The unconditional one (empty prompt or null class), same shape.
    pub uncond: Option<Tensor<B, E>>,
}

impl<B: Backend, const E: usize> GuidanceEmbeddings<B, E> {
    /// Checks the pair for a guidance `scale`: any scale other than 1 needs the unconditional
    /// embedding, which must be shaped like the conditional one.
    pub fn new(cond: Tensor<B, E>, uncond: Option<Tensor<B, E>>, scale: f64) -> Result<Self, DiffusionError> {
        match &uncond {
            None if scale != 1.0 => {
                return Err(DiffusionError::BadGuidance {
                    reason: format!("guidance scale {scale} needs an unconditional embedding; give one or use scale 1"),
                })
            }
            Some(u) if u.dims() != cond.dims() => {
                return Err(DiffusionError::ConditioningShape {
                    name: "unconditional embedding",
                    expected: cond.dims().to_vec(),
                    got: u.dims().to_vec(),
                })
            }
            _ => {}
        }
        Ok(Self { cond, uncond })
    }

    /// `[uncond; cond]` along the batch, as the network sees them under [`Cfg`].
    pub fn doubled(&self) -> Tensor<B, E> {
        match &self.uncond {
            Some(u) => Tensor::cat(vec![u.clone(), self.cond.clone()], 0),
            None => Tensor::cat(vec![self.cond.clone(), self.cond.clone()], 0),
        }
    }
}
