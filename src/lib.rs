//! # adjoint-dpm
//!
//! Gradients through ODE solves on [burn](https://burn.dev), without storing the solver's
//! activations: for neural ODEs, and for diffusion sampling (AdjointDPM, Pan et al., ICLR 2024).
//!
//! ## A tour
//! 1. Write the dynamics as any burn module implementing [`ode::Dynamics`]: `dz/dt = f(t, z)`.
//! 2. Wrap it: [`ode::NeuralOde::new`], pick a [`ode::Solver`] (fixed-step Euler, midpoint, Heun,
//!    RK4; adaptive Bosh3, Dopri5, Tsit5, Dopri8) and a [`ode::GradientMode`].
//! 3. On an autodiff backend, [`ode::NeuralOde::solve`] returns a [`ode::Solution`] whose states
//!    are tracked tensors: build any loss on them and call `.backward()`. The initial state, every
//!    trainable parameter and (with [`ode::NeuralOde::solve_with_times`]) the output times receive
//!    their gradients, ready for burn's optimizers.
//! 4. For inference, [`ode::NeuralOde::integrate`] solves on any backend without a graph.
//! 5. [`ode::NeuralOde::solve_until`] solves until an event function changes sign; the event
//!    time and state are differentiable too.
//!
//! Bad input (grids, shapes, NaN, step-size underflow, step limits) is an [`Error`], never a
//! panic.
//!
//! ## Depending on this crate
//! The adjoint modes need a patched burn-autodiff 0.21.0: the published one deadlocks when a
//! backward step runs an inner `backward()`, and its graph merges make backprop through N steps
//! O(N²). This repository carries the patched copy in `vendor/burn-autodiff`. Cargo applies
//! `[patch]` sections only from the top-level workspace, so your own `Cargo.toml` needs the same
//! entry, pointing at that folder (without it this crate does not compile, rather than hang):
//!
//! ```toml
//! [patch.crates-io]
//! burn-autodiff = { path = "path/to/adjoint-dpm/vendor/burn-autodiff" }
//! # or, when adjoint-dpm comes from git: Cargo finds the package inside the repository
//! # burn-autodiff = { git = "<adjoint-dpm's repository URL>" }
//! ```

pub mod bench;
pub mod diffusion;
pub mod error;
pub mod ode;
pub mod tasks;
pub mod toy;

pub use error::{Error, Result};

// If this fails to compile ("cannot find value `ADJOINT_DPM_PATCHES`"), your workspace builds
// the published burn-autodiff, whose nested backward deadlocks in the adjoint modes: add
// `burn-autodiff = { path = "<adjoint-dpm>/vendor/burn-autodiff" }` under `[patch.crates-io]`
// in your top-level Cargo.toml (see "Depending on this crate" above).
const _: () = assert!(
    burn::backend::autodiff::ADJOINT_DPM_PATCHES >= 5,
    "adjoint-dpm needs its vendored burn-autodiff (vendor/README.md)"
);

/// Backends used by the tests, examples and benches: CPU by default, CUDA with `--features cuda`.
pub mod backend {
    /// The CPU backend for f32 work.
    pub type Cpu = burn::backend::Flex;
    /// The f64 CPU backend used for gradient checks.
    pub type CpuF64 = burn::backend::NdArray<f64>;
    /// The CUDA backend: fusion and autotune under the `cuda` feature, fusion alone under
    /// `cuda-untuned`, neither under `cuda-base`.
    #[cfg(feature = "cuda-base")]
    pub type Cuda = burn::backend::Cuda;
}

/// The names a user needs.
pub mod prelude {
    pub use crate::error::Error;
    pub use crate::ode::{
        BacksolveOptions, Crossing, Dynamics, EventHit, GradientMode, NeuralOde, Schedule, Solution, Solver, Stats,
    };
}
