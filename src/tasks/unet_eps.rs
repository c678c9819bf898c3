//! A diffusers UNet with its conditioning held as a parameter: the shape of a text-conditioned
//! Stable Diffusion denoiser, as an [`EpsModel`].

use adjoint_dpm_models::unet::UNet2DConditionModel;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

use crate::diffusion::{DiffusionError, EpsModel, NoiseSchedule};

/// What the UNet predicts (diffusers' `prediction_type`); [`UnetEps`] always returns ε.
#[derive(Debug, Clone, Default)]
pub enum UnetPrediction {
    /// The noise ε (SD 1.x, SD 2.x base).
    #[default]
    Epsilon,
    /// `v = α ε − σ x_0` (SD 2.x 768): `ε = σ x + α v`.
    V(NoiseSchedule),
    /// The clean sample x_0: `ε = (x − α x_0)/σ`.
    Sample(NoiseSchedule),
}

/// ε(x, t) = UNet(x, t, context). Freeze `unet` (`no_grad`) and keep `context` trainable to
/// differentiate w.r.t. the text embedding (embedding inversion); freeze `context` to tune
/// weights.
///
/// The context holds `r` rows that split the batch into `r` equal consecutive groups: one row
/// for any batch, one per sample, or `[uncond; cond]` under [`crate::diffusion::Cfg`] (which
/// calls the model on `[x; x]`).
///
/// # Panics
/// `eps` panics when the batch is not a multiple of the context's rows: the model fixes its
/// conditioning per group of samples. [`EpsModel::check_batch`] says so first as an error, and
/// the samplers call it before their first step.
#[derive(Module, Debug)]
pub struct UnetEps<B: Backend> {
    /// The noise-prediction UNet.
    pub unet: UNet2DConditionModel<B>,
    /// `[rows, tokens, cross_attention_dim]` (e.g. `[1, 77, 768]` CLIP text embeddings).
    pub context: Param<Tensor<B, 3>>,
    /// What the UNet predicts.
    #[module(skip)]
    pub prediction: UnetPrediction,
    /// When set, only these token positions of the context receive gradients (the tokens an
    /// embedding inversion learns); the rest act as constants.
    #[module(skip)]
    pub trainable_tokens: Option<(usize, usize)>,
}

impl<B: Backend> UnetEps<B> {
    /// An ε-prediction UNet with `context` as its (trainable, unless frozen) conditioning.
    pub fn new(unet: UNet2DConditionModel<B>, context: Tensor<B, 3>) -> Self {
        Self {
            unet,
            context: Param::from_tensor(context),
            prediction: UnetPrediction::Epsilon,
            trainable_tokens: None,
        }
    }

    /// Sets what the UNet predicts.
    pub fn with_prediction(mut self, prediction: UnetPrediction) -> Self {
        self.prediction = prediction;
        self
    }

    /// Restricts the context's gradient to token positions `start..end`.
    pub fn with_trainable_tokens(mut self, start: usize, end: usize) -> Self {
        self.trainable_tokens = Some((start, end));
        self
    }

    /// The context as the UNet sees it, one row per sample.
    ///
    /// # Panics
    /// If the batch is not a multiple of the context's rows (a programming error).
    fn context_for(&self, batch: usize) -> Tensor<B, 3> {
        let mut context = self.context.val();
        let [rows, tokens, dim] = context.dims();
        if let Some((start, end)) = self.trainable_tokens {
            let (start, end) = (start.min(tokens), end.min(tokens));
            let keep: Vec<f32> = (0..tokens)
                .map(|i| if (start..end).contains(&i) { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::<B, 1>::from_data(TensorData::new(keep, [tokens]), (&context.device(), context.dtype()))
                .reshape([1, tokens, 1]);
            context = context.clone().detach() * (mask.clone().neg().add_scalar(1.0)) + context * mask;
        }
        if let Err(e) = self.check_batch(batch) {
            panic!("{e}");
        }
        if rows == batch {
            return context;
        }
        context
            .reshape([rows, 1, tokens, dim])
            .repeat_dim(1, batch / rows)
            .reshape([batch, tokens, dim])
    }
}

impl<B: Backend> EpsModel<B, 4> for UnetEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let batch = x.dims()[0];
        let time = t.clone();
        let t = if t.dims()[0] == batch {
            t
        } else {
            t.repeat_dim(0, batch)
        };
        let out = self.unet.forward(x.clone(), t, self.context_for(batch), None);
        let at = |schedule: &NoiseSchedule| {
            let t: f64 = time.clone().narrow(0, 0, 1).into_scalar().elem();
            (schedule.alpha(t), schedule.sigma(t))
        };
        match &self.prediction {
            UnetPrediction::Epsilon => out,
            UnetPrediction::V(schedule) => {
                let (alpha, sigma) = at(schedule);
                x.mul_scalar(sigma) + out.mul_scalar(alpha)
            }
            UnetPrediction::Sample(schedule) => {
                let (alpha, sigma) = at(schedule);
                (x - out.mul_scalar(alpha)).div_scalar(sigma)
            }
        }
    }

    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        let rows = self.context.val().dims()[0];
        if !batch.is_multiple_of(rows) {
            return Err(DiffusionError::BatchMismatch {
                batch,
                reason: format!("the context has {rows} rows, and a batch must be a multiple of that"),
            });
        }
        Ok(())
    }
}
