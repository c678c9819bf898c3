//! One error type for everything a user's input can break (and the device failures the engine
//! meets when it reads values back).
//!
//! Every variant names its culprit (the value, the index, the time and step) and its message says
//! what to change, so a CLI can print it unchanged.

use burn::prelude::*;
use burn::tensor::ElementConversion;
use thiserror::Error;

/// Result alias used throughout the crate.
pub type Result<T> = core::result::Result<T, Error>;

/// Every failure reachable from user input, and the backend's own at the engine's host reads.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    /// The time grid has fewer than two points.
    #[error("time grid has {len} point(s); give at least two: the start time and one output time")]
    GridTooShort {
        /// Number of points given.
        len: usize,
    },
    /// A time in the grid is NaN or infinite.
    #[error("time grid entry {index} is {value}; every time must be finite")]
    NonFiniteTime {
        /// Index of the offending entry.
        index: usize,
        /// Its value.
        value: f64,
    },
    /// The grid is not strictly increasing or strictly decreasing.
    #[error(
        "time grid is not strictly monotone at index {index}: {prev} then {next}; give times that \
         all increase or all decrease, without repeats"
    )]
    NonMonotoneGrid {
        /// Index of the second of the two offending entries.
        index: usize,
        /// The entry before it.
        prev: f64,
        /// The offending entry.
        next: f64,
    },
    /// The dynamics returned a tensor whose shape differs from the state's.
    #[error(
        "the dynamics returned shape {got:?} for a state of shape {expected:?}; f(t, z) must \
         return a tensor shaped like z"
    )]
    ShapeMismatch {
        /// Shape of the state.
        expected: Vec<usize>,
        /// Shape returned by the dynamics.
        got: Vec<usize>,
    },
    /// A state became NaN or infinite.
    #[error(
        "the state became non-finite (NaN or Inf) at t = {t} after step {step}; lower the step \
         size or tolerances, or check the dynamics and the initial state"
    )]
    NonFiniteState {
        /// Time of the state that is non-finite.
        t: f64,
        /// Number of accepted steps at that point (0: the initial state).
        step: usize,
    },
    /// The adaptive controller asked for a step below `dt_min`.
    #[error(
        "step size underflow at t = {t}: the controller asked for |dt| = {dt:e} < dt_min = \
         {dt_min:e}; the problem may be stiff or singular there; loosen rtol/atol or lower dt_min"
    )]
    StepSizeUnderflow {
        /// Time at which it happened.
        t: f64,
        /// The step size asked for.
        dt: f64,
        /// The configured minimum.
        dt_min: f64,
    },
    /// The solve took more steps than allowed.
    #[error(
        "gave up at t = {t} after max_steps = {max_steps} steps; raise max_steps, loosen \
         rtol/atol, or check that the problem is not stiff"
    )]
    MaxStepsExceeded {
        /// Time reached.
        t: f64,
        /// The configured limit.
        max_steps: usize,
    },
    /// A solver option is out of range.
    #[error("invalid solver option {name} = {value}: {rule}")]
    InvalidOption {
        /// Option name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What it must satisfy.
        rule: &'static str,
    },
    /// Adaptive stepping was asked of a method with no embedded error estimate.
    #[error(
        "{method} has no embedded error estimate, so it cannot adapt its step; use bosh3, dopri5, \
         tsit5 or dopri8 for tolerances, or give {method} a step count"
    )]
    NoErrorEstimate {
        /// Name of the method.
        method: &'static str,
    },
    /// An event function returned something other than finite values, one per condition.
    #[error(
        "the event function returned {got} at t = {t}; it must return finite values, shape [k] \
         with the same k at every call (one per event condition), whose first sign change marks \
         the event"
    )]
    BadEventValue {
        /// Time of the evaluation.
        t: f64,
        /// What it returned: its shape, or the non-finite value.
        got: String,
    },
    /// The event function is zero where the solve starts.
    #[error(
        "component {index} of the event function is 0 at the start time t0 = {t0}; an event is a \
         sign change after the start, so start where it is non-zero, or ask for one direction \
         (Crossing::Falling or Crossing::Rising)"
    )]
    EventAtStart {
        /// The start time.
        t0: f64,
        /// The component that is 0 there.
        index: usize,
    },
    /// The event function touches zero without crossing it, so the event time has no derivative.
    #[error(
        "the event function reaches 0 at t = {t} with time derivative {slope:e} along the \
         solution; the event time is not differentiable where it only touches zero"
    )]
    TangentialEvent {
        /// The event time.
        t: f64,
        /// d/dt g(t, z(t)) there.
        slope: f64,
    },
    /// Events are located by an adaptive solve.
    #[error(
        "events are located by an adaptive solver (bosh3, dopri5, tsit5, dopri8, or heun with \
         tolerances), on its dense output; {method} here takes fixed steps"
    )]
    EventNeedsAdaptiveSolver {
        /// Name of the method.
        method: &'static str,
    },
    /// A gradient was asked of a backward pass that failed.
    #[error("the backward pass failed: {0}")]
    Backward(Box<Error>),
    /// The backend failed when the solver read a value back to the host. A device backend
    /// reports a failed kernel at the next synchronisation, so the culprit may be any kernel
    /// launched since the previous read.
    #[error(
        "the backend failed while the solver read {reading} back to the host (a device reports \
         a failed kernel at the next read, so any kernel since the previous one may be the \
         cause): {reason}"
    )]
    Backend {
        /// What was being read.
        reading: &'static str,
        /// The backend's message.
        reason: String,
    },
}

/// Reads a one-element float tensor back to the host as f64. A backend failure there is
/// [`Error::Backend`], not burn's `into_scalar` panic.
pub(crate) fn read_scalar<B: Backend, const D: usize>(tensor: Tensor<B, D>, reading: &'static str) -> Result<f64> {
    tensor.try_into_scalar().map(|v| v.elem()).map_err(|e| Error::Backend {
        reading,
        reason: e.to_string(),
    })
}

/// Reads a float tensor back to the host as f64 values; a backend failure is [`Error::Backend`].
pub(crate) fn read_values<B: Backend, const D: usize>(tensor: Tensor<B, D>, reading: &'static str) -> Result<Vec<f64>> {
    let backend = |reason: String| Error::Backend { reading, reason };
    tensor
        .try_into_data()
        .map_err(|e| backend(e.to_string()))?
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| backend(format!("{e:?}")))
}
