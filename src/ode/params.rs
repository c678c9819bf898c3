//! A module's trainable parameters as one flat vector, and their gradients in the same order.
//!
//! The solver op takes θ as one parent: the differentiable concatenation of every parameter that
//! is part of the caller's graph, so burn routes each slice of dL/dθ back to its own parameter.
//! That is a leaf that requires a gradient, or a tensor computed from one (a parameter made with
//! `Param::initialized` from, say, a stochastic sampler's noise). Frozen parameters are left out:
//! they are not parents and cost no vector-Jacobian work.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

/// Whether `value` is part of the graph: a leaf that requires a gradient or a tensor computed
/// from one. (`is_require_grad` answers for leaves only.)
fn tracked<B: Backend, C: CheckpointStrategy, const D: usize>(value: &Tensor<Autodiff<B, C>, D>) -> bool {
    !value.clone().into_primitive().tensor().node.requirement.is_none()
}

/// Collects the flattened tracked parameters, in visiting order.
struct Flatten<B: Backend, C: CheckpointStrategy> {
    parts: Vec<Tensor<Autodiff<B, C>, 1>>,
}

impl<B: Backend, C: CheckpointStrategy> ModuleVisitor<Autodiff<B, C>> for Flatten<B, C> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Autodiff<B, C>, D>>) {
        let value = param.val();
        if tracked(&value) {
            let n = value.shape().num_elements();
            self.parts.push(value.reshape([n]));
        }
    }
}

/// θ: the tracked parameters of `module` flattened and concatenated, or `None` when nothing is
/// tracked.
pub(crate) fn flatten_trainable<B: Backend, C: CheckpointStrategy, M: Module<Autodiff<B, C>>>(
    module: &M,
) -> Option<Tensor<Autodiff<B, C>, 1>> {
    let mut v = Flatten { parts: Vec::new() };
    module.visit(&mut v);
    (!v.parts.is_empty()).then(|| Tensor::cat(v.parts, 0))
}

/// Reads the gradient of every trainable parameter, flattened, in the order of
/// [`flatten_trainable`] (zeros for a parameter the output does not depend on).
struct GradsOf<'a, AD: AutodiffBackend> {
    grads: &'a AD::Gradients,
    out: Vec<Tensor<AD::InnerBackend, 1>>,
}

impl<AD: AutodiffBackend> ModuleVisitor<AD> for GradsOf<'_, AD> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        let value = param.val();
        if value.is_require_grad() {
            let n = value.shape().num_elements();
            let g = match value.grad(self.grads) {
                Some(g) => g.reshape([n]),
                None => Tensor::zeros([n], (&value.device(), value.dtype())),
            };
            self.out.push(g);
        }
    }
}

/// Gradients of `module`'s trainable parameters, one flat tensor each.
pub(crate) fn trainable_grads<AD: AutodiffBackend, M: Module<AD>>(
    module: &M,
    grads: &AD::Gradients,
) -> Vec<Tensor<AD::InnerBackend, 1>> {
    let mut v = GradsOf { grads, out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// Which float parameters are tracked (the parts of θ), in visiting order. Kept apart because
/// cloning an inner-backend module forgets it (burn re-derives the flag from the untracked inner
/// tensor).
pub(crate) fn trainable_mask<B: Backend, C: CheckpointStrategy, M: Module<Autodiff<B, C>>>(module: &M) -> Vec<bool> {
    struct Mask(Vec<bool>);
    impl<B: Backend, C: CheckpointStrategy> ModuleVisitor<Autodiff<B, C>> for Mask {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Autodiff<B, C>, D>>) {
            self.0.push(tracked(&param.val()));
        }
    }
    let mut v = Mask(Vec::new());
    module.visit(&mut v);
    v.0
}

/// Sets each float parameter's gradient requirement from a mask.
struct ApplyMask<'a> {
    mask: &'a [bool],
    next: usize,
}

impl<B: Backend> ModuleMapper<B> for ApplyMask<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let train = self.mask.get(self.next).copied().unwrap_or(false);
        self.next += 1;
        param.set_require_grad(train)
    }
}

/// A copy of the module whose parameters are fresh leaves of a new graph (the outer graph is
/// never touched from inside a backward step), trainable as `mask` says when `train`, frozen
/// otherwise.
pub(crate) fn fresh<AD: AutodiffBackend, M: AutodiffModule<AD>>(
    inner: &M::InnerModule,
    mask: &[bool],
    train: bool,
) -> M {
    let module = M::from_inner(inner.clone());
    if train {
        module.map(&mut ApplyMask { mask, next: 0 })
    } else {
        module.no_grad()
    }
}

/// Zeros shaped like each trainable parameter of a [`fresh`] module (whose trainable
/// parameters are leaves), flattened: the initial `a_θ`.
pub(crate) fn trainable_zeros<AD: AutodiffBackend, M: Module<AD>>(module: &M) -> Vec<Tensor<AD::InnerBackend, 1>> {
    struct Zeros<AD: AutodiffBackend>(Vec<Tensor<AD::InnerBackend, 1>>);
    impl<AD: AutodiffBackend> ModuleVisitor<AD> for Zeros<AD> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            let value = param.val();
            if value.is_require_grad() {
                let n = value.shape().num_elements();
                self.0.push(value.inner().reshape([n]).zeros_like());
            }
        }
    }
    let mut v = Zeros::<AD>(Vec::new());
    module.visit(&mut v);
    v.0
}

/// Initialises every lazily-initialised parameter of `module` now, so that its clones share
/// weights (burn draws the weights of a lazy parameter at first use, separately in each clone).
///
/// ```
/// use adjoint_dpm::ode::{materialized, mlp::MlpFieldConfig};
/// use burn::backend::NdArray;
/// let field = materialized(MlpFieldConfig::new(vec![2, 8, 2]).init::<NdArray>(&Default::default()));
/// let copy = field.clone(); // same weights as `field`
/// # let _ = copy;
/// ```
pub fn materialized<B: Backend, M: Module<B>>(module: M) -> M {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
    module
}

/// Keeps trainable exactly the float parameters whose path (field names joined by `.`, e.g.
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`) satisfies `keep`, and
/// freezes the rest: the "named subset" of weights to fine-tune or differentiate. Frozen
/// parameters cost the adjoint nothing.
///
/// ```
/// use adjoint_dpm::ode::{train_only, mlp::MlpFieldConfig};
/// use burn::backend::{Autodiff, NdArray};
/// let field = MlpFieldConfig::new(vec![2, 8, 2]).init::<Autodiff<NdArray>>(&Default::default());
/// let field = train_only(field, |path| path.starts_with("layers.1."));
/// assert!(!field.layers[0].weight.val().is_require_grad());
/// assert!(field.layers[1].weight.val().is_require_grad());
/// ```
pub fn train_only<B: Backend, M: Module<B>>(module: M, keep: impl Fn(&str) -> bool) -> M {
    struct ByPath<F> {
        path: Vec<String>,
        keep: F,
    }
    impl<B: Backend, F: Fn(&str) -> bool> ModuleMapper<B> for ByPath<F> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let train = (self.keep)(&self.path.join("."));
            param.set_require_grad(train)
        }
    }
    module.map(&mut ByPath { path: Vec::new(), keep })
}
