//! Exponential moving average of a model's weights, the standard companion of diffusion training:
//! samples from the averaged weights are far cleaner than from the last optimiser iterate, whose
//! small-batch noise the sampler integrates over every step.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The averaged float parameters of a module, in the module's visiting order.
#[derive(Debug, Clone)]
pub struct Ema<B: Backend> {
    values: Vec<Tensor<B, 1>>,
    decay: f64,
    updates: usize,
}

struct Collect<B: Backend>(Vec<Tensor<B, 1>>);

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let n = value.shape().num_elements();
        self.0.push(value.reshape([n]));
    }
}

fn collect<B: Backend, M: Module<B>>(module: &M) -> Vec<Tensor<B, 1>> {
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

struct Write<B: Backend> {
    values: std::vec::IntoIter<Tensor<B, 1>>,
}

impl<B: Backend> ModuleMapper<B> for Write<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let value = self
            .values
            .next()
            .expect("the EMA was taken of a module of this architecture");
        param.map(|old| value.reshape(old.shape()))
    }
}

impl<B: Backend> Ema<B> {
    /// Starts the average at `module`'s weights. `decay` in `[0, 1)` is the long-run weight of
    /// the past (0.999 ≈ an average over the last thousand updates).
    pub fn new<M: Module<B>>(module: &M, decay: f64) -> Self {
        Self {
            values: collect(module),
            decay,
            updates: 0,
        }
    }

    /// The decay of the next update: `min(decay, (1 + k)/(10 + k))` after `k` updates, so the
    /// first updates do not pin the average to the initial weights.
    pub fn current_decay(&self) -> f64 {
        let k = self.updates as f64;
        self.decay.min((1.0 + k) / (10.0 + k))
    }

    /// Folds `module`'s current weights (same architecture) into the average.
    ///
    /// # Panics
    /// If `module` has another number of float parameters than the one the average started
    /// from (a programming error: the training loop averages its own model).
    pub fn update<M: Module<B>>(&mut self, module: &M) {
        let d = self.current_decay();
        let current = collect(module);
        assert_eq!(current.len(), self.values.len(), "EMA of a different architecture");
        for (avg, new) in self.values.iter_mut().zip(current) {
            *avg = avg.clone().mul_scalar(d) + new.detach().mul_scalar(1.0 - d);
        }
        self.updates += 1;
    }

    /// Updates folded in so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// `module` with its float parameters replaced by the averages (ids and the rest kept).
    ///
    /// # Panics
    /// If `module` has more float parameters than the averaged one.
    pub fn apply<M: Module<B>>(&self, module: M) -> M {
        module.map(&mut Write {
            values: self.values.clone().into_iter(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    type B = crate::backend::CpuF64;

    fn weight(m: &Linear<B>) -> Vec<f64> {
        m.weight.val().into_data().to_vec::<f64>().unwrap()
    }

    #[test]
    fn average_follows_the_recurrence() {
        let device = Default::default();
        let a = LinearConfig::new(3, 2).init::<B>(&device);
        let b = LinearConfig::new(3, 2).init::<B>(&device);
        let mut ema = Ema::new(&a, 0.5);
        // First update: decay min(0.5, 1/10) = 0.1.
        ema.update(&b);
        assert_eq!(ema.updates(), 1);
        let avg = weight(&ema.apply(a.clone()));
        for ((x, y), z) in weight(&a).iter().zip(weight(&b)).zip(avg) {
            assert!((z - (0.1 * x + 0.9 * y)).abs() < 1e-12);
        }
        // Later updates saturate at the configured decay.
        for _ in 0..20 {
            ema.update(&b);
        }
        assert!((ema.current_decay() - 0.5).abs() < 1e-12);
        let avg = weight(&ema.apply(a));
        for (y, z) in weight(&b).iter().zip(avg) {
            assert!((z - y).abs() < 1e-5, "{z} vs {y}");
        }
    }
}
