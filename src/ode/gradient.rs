//! How a solve is differentiated.

/// How gradients flow through a solve on an autodiff backend.
///
/// All three give gradients with respect to the initial state, every trainable parameter of the
/// dynamics and, when the time tensor is tracked, the output times. Choose:
/// - [`Checkpointed`](GradientMode::Checkpointed) (the default): the exact gradient of the
///   discretised solve, to rounding, keeping only step states. Use it unless you have a reason.
/// - [`Backprop`](GradientMode::Backprop): ordinary autodiff through every solver operation. Exact
///   too, but keeps every activation of every stage: memory grows with the number of steps. The
///   reference the other modes are tested against.
/// - [`Backsolve`](GradientMode::Backsolve): the continuous adjoint (Chen et al. 2018; AdjointDPM
///   for diffusion), integrating the adjoint ODE backward. Keeps only the states at the output
///   times, but its gradient is *not* the gradient of what was computed: it carries the reverse
///   integration's error (a few % on P1 with RK4-100), which shrinks with the tolerance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradientMode {
    /// Autodiff through the solver's operations.
    Backprop,
    /// Continuous adjoint with the augmented state `[z, a_z, a_θ, a_t]`.
    Backsolve(BacksolveOptions),
    /// Exact discrete adjoint: replay each step under autodiff from stored states.
    Checkpointed(Schedule),
}

impl Default for GradientMode {
    fn default() -> Self {
        GradientMode::Checkpointed(Schedule::All)
    }
}

/// Which step states the exact discrete adjoint keeps (N steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Every step's starting state: N states, no recomputation.
    #[default]
    All,
    /// Every k-th state; each segment of k steps is recomputed once in the backward pass:
    /// N/k + k states, one extra forward.
    Every(usize),
    /// Recursive bisection from the initial state only: O(log N) states, O(N log N) recomputed
    /// steps.
    Recursive,
}

/// Options of the continuous adjoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacksolveOptions {
    /// Relative tolerance of the reverse solve (adaptive forward solvers only; a fixed-step
    /// forward solve is reversed with the same steps).
    pub rtol: f64,
    /// Absolute tolerance of the reverse solve.
    pub atol: f64,
    /// Control the error on `z` and `a_z` only, not on the parameter and time integrals
    /// (Kidger et al. 2021, "Hey, that's not an ODE"): fewer steps, same accuracy in practice.
    pub seminorm: bool,
}

impl Default for BacksolveOptions {
    fn default() -> Self {
        Self {
            rtol: 1e-6,
            atol: 1e-8,
            seminorm: true,
        }
    }
}
