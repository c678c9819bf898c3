//! What the stepper needs of a state and of a time: a little linear algebra, an error norm.
//!
//! The solver is written once against [`OdeState`] and [`VectorField`], so the same code steps a
//! user's state tensor and the augmented adjoint state of [`crate::ode::adjoint`] (diffrax's
//! "the adjoint system is just another term").

use burn::tensor::{backend::Backend, bf16, f16, DType, Tensor};

use crate::error::{read_scalar, Result};

/// A time or step size: a plain number when solving, a tensor when a step is replayed to
/// differentiate with respect to the output times.
#[derive(Debug, Clone)]
pub enum Time<B: Backend> {
    /// A value with no gradient.
    Value(f64),
    /// A `[1]` tensor, tracked on an autodiff backend, and its value: the stepper computes with
    /// the value exactly as it would with a plain time, so that a solve that differentiates its
    /// output times takes bit for bit the steps of one that does not (an 8th-order method's error
    /// estimate is small enough for rounding to move its step sizes).
    Tensor(Tensor<B, 1>, f64),
}

impl<B: Backend> Time<B> {
    /// The value, tracked or not.
    pub fn value(&self) -> f64 {
        match self {
            Time::Value(v) | Time::Tensor(_, v) => *v,
        }
    }

    /// `self + c · h` (in that order of operations for tensor and value alike).
    pub fn offset(&self, c: f64, h: &Time<B>) -> Time<B> {
        let value = self.value() + c * h.value();
        match (self, h) {
            (Time::Value(_), Time::Value(_)) => Time::Value(value),
            (Time::Tensor(t, _), Time::Value(h)) => Time::Tensor(t.clone().add_scalar(c * h), value),
            (Time::Value(t), Time::Tensor(h, _)) => Time::Tensor(h.clone().mul_scalar(c).add_scalar(*t), value),
            (Time::Tensor(t, _), Time::Tensor(h, _)) => Time::Tensor(t.clone() + h.clone().mul_scalar(c), value),
        }
    }

    /// The time one representable step of `dtype` past this one, towards `toward`: where a
    /// stage sits on a jump time, the dynamics see it from the side of the step's interior
    /// (diffrax's `prevbefore`/`nextafter` at `jump_ts`), in the float type they read times in
    /// (one f64 step would round away in f32).
    pub fn nudged(&self, toward: f64, dtype: DType) -> Time<B> {
        let value = self.value();
        let from = round_to(value, dtype);
        let to = next_toward(from, toward, dtype);
        match self {
            Time::Value(_) => Time::Value(to),
            Time::Tensor(t, _) => Time::Tensor(t.clone().add_scalar(to - from), to),
        }
    }

    /// The time as a `[1]` tensor, as the dynamics take it, on the device and in the float type
    /// of the state `like` (never the device's default float type, which burn shares between
    /// backends that share a device).
    pub fn to_tensor<const D: usize>(&self, like: &Tensor<B, D>) -> Tensor<B, 1> {
        match self {
            Time::Value(t) => Tensor::from_data(burn::tensor::TensorData::from([*t]), (&like.device(), like.dtype())),
            Time::Tensor(t, _) => t.clone(),
        }
    }
}

/// `t` rounded to `dtype` (as an f64).
fn round_to(t: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F64 => t,
        DType::F16 => f16::from_f64(t).to_f64(),
        DType::BF16 => bf16::from_f64(t).to_f64(),
        _ => f64::from(t as f32),
    }
}

/// The value of `dtype` next to `t` (a value of `dtype`) in the direction of `toward`.
fn next_toward(t: f64, toward: f64, dtype: DType) -> f64 {
    let up = toward > t;
    match dtype {
        DType::F64 => match up {
            true => t.next_up(),
            false => t.next_down(),
        },
        DType::F16 | DType::BF16 => {
            // Double a step from at most half the spacing at t (a quarter of the type's machine
            // epsilon, relative; its smallest subnormal near 0) until t ± step rounds to another
            // value: the neighbour, since the step before rounded to t.
            let (eps, tiniest) = match dtype {
                DType::F16 => (2f64.powi(-10), 2f64.powi(-24)),
                _ => (2f64.powi(-7), 2f64.powi(-133)),
            };
            let mut step = (t.abs() * eps / 4.0).max(tiniest);
            loop {
                let next = round_to(if up { t + step } else { t - step }, dtype);
                if next != t {
                    return next;
                }
                step *= 2.0;
            }
        }
        _ => {
            let t = t as f32;
            f64::from(if up { t.next_up() } else { t.next_down() })
        }
    }
}

/// A state the Runge–Kutta stepper can combine.
pub trait OdeState<B: Backend>: Clone + Sized {
    /// `self + other`.
    fn add(&self, other: &Self) -> Self;
    /// `c · self`.
    fn scale(&self, c: f64) -> Self;
    /// `h · self`, with `h` possibly a tracked tensor.
    fn scale_time(&self, h: &Time<B>) -> Self;
    /// Σ over the error-controlled components of `(err / (atol + rtol·max(|y0|, |y1|)))²`, and
    /// their number; the step controller takes the root mean square.
    fn error_sq_sum(&self, y0: &Self, y1: &Self, rtol: f64, atol: f64) -> (Tensor<B, 1>, usize);
    /// A number that is finite exactly when every component is (one reduction, one read).
    fn finiteness_probe(&self) -> Result<f64>;
    /// The float type the vector field reads times in, for stages on a jump time
    /// ([`Time::nudged`]); f32 unless said.
    fn time_dtype(&self) -> DType {
        DType::F32
    }
    /// The state as the vector field reads it. The stepper builds the stage states
    /// `y + h Σ a_ij k_j`, which only the field sees, from these views, so a component that no
    /// derivative depends on (a quadrature, such as the adjoint's a_θ and a_t) can be left out
    /// here: it is then summed once per step instead of once per stage. The whole state by
    /// default.
    fn field_view(&self) -> Self {
        self.clone()
    }
    /// The error estimate as [`error_sq_sum`](Self::error_sq_sum) reads it: components it skips
    /// (a seminorm's) can be left out. The whole state by default.
    fn error_view(&self) -> Self {
        self.clone()
    }
    /// `Σ_i c_i k_i` over the stages `ks` for each row `c` of `rows` (`None` for a row of
    /// zeros): the dense outputs inside one step. Term by term by default; a tensor state stacks
    /// its stages once and takes each row as one product, a few ops per output instead of two
    /// per stage.
    fn weighted_sums(ks: &[Self], rows: &[Vec<f64>]) -> Vec<Option<Self>> {
        rows.iter().map(|row| weighted_sum(row, ks, 1.0)).collect()
    }
}

/// `Σ (coef_i · factor) · k_i` over the non-zero coefficients, `None` when all are zero.
pub(crate) fn weighted_sum<B: Backend, S: OdeState<B>>(coefs: &[f64], ks: &[S], factor: f64) -> Option<S> {
    coefs
        .iter()
        .zip(ks)
        .filter(|(c, _)| **c != 0.0)
        .fold(None, |acc: Option<S>, (c, k)| {
            let term = k.scale(*c * factor);
            Some(match acc {
                None => term,
                Some(acc) => acc.add(&term),
            })
        })
}

/// A vector field over some state type: the user's dynamics, or the augmented adjoint system.
pub trait VectorField<B: Backend> {
    /// The state it acts on.
    type State: OdeState<B>;
    /// dy/dt at `(t, y)`.
    fn eval(&self, t: &Time<B>, y: &Self::State) -> Result<Self::State>;
}

/// The mean-square error term of one tensor (used by the state impls).
pub(crate) fn tensor_error_sq_sum<B: Backend, const D: usize>(
    err: &Tensor<B, D>,
    y0: &Tensor<B, D>,
    y1: &Tensor<B, D>,
    rtol: f64,
    atol: f64,
) -> (Tensor<B, 1>, usize) {
    let scale = y0
        .clone()
        .abs()
        .max_pair(y1.clone().abs())
        .mul_scalar(rtol)
        .add_scalar(atol);
    let ratio = err.clone() / scale;
    (ratio.square().sum(), err.shape().num_elements())
}

impl<B: Backend, const D: usize> OdeState<B> for Tensor<B, D> {
    fn add(&self, other: &Self) -> Self {
        self.clone() + other.clone()
    }

    fn scale(&self, c: f64) -> Self {
        self.clone().mul_scalar(c)
    }

    fn scale_time(&self, h: &Time<B>) -> Self {
        match h {
            Time::Value(h) => self.clone().mul_scalar(*h),
            Time::Tensor(h, _) => self.clone() * h.clone().reshape([1; D]),
        }
    }

    fn error_sq_sum(&self, y0: &Self, y1: &Self, rtol: f64, atol: f64) -> (Tensor<B, 1>, usize) {
        tensor_error_sq_sum(self, y0, y1, rtol, atol)
    }

    fn finiteness_probe(&self) -> Result<f64> {
        read_scalar(self.clone().sum(), "a state's finiteness probe")
    }

    fn time_dtype(&self) -> DType {
        self.dtype()
    }

    fn weighted_sums(ks: &[Self], rows: &[Vec<f64>]) -> Vec<Option<Self>> {
        // One output per step gains nothing from stacking.
        if rows.len() < 2 || ks.is_empty() {
            return rows.iter().map(|row| weighted_sum(row, ks, 1.0)).collect();
        }
        let dims = ks[0].dims();
        let n = ks[0].shape().num_elements();
        let (device, dtype) = (ks[0].device(), ks[0].dtype());
        let stages = Tensor::cat(ks.iter().map(|k| k.clone().reshape([1, n])).collect(), 0);
        rows.iter()
            .map(|row| {
                if row.iter().all(|c| *c == 0.0) {
                    return None;
                }
                let coefs = Tensor::<B, 2>::from_data(
                    burn::tensor::TensorData::new(row.clone(), [1, ks.len()]),
                    (&device, dtype),
                );
                Some(coefs.matmul(stages.clone()).reshape(dims))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f64>;

    #[test]
    fn a_nudged_time_is_the_next_value_of_the_dtype() {
        let t = Time::<B>::Value(1.0);
        assert_eq!(t.nudged(0.0, DType::F64).value(), 1.0f64.next_down());
        assert_eq!(t.nudged(2.0, DType::F64).value(), 1.0f64.next_up());
        assert_eq!(t.nudged(0.0, DType::F32).value(), f64::from(1.0f32.next_down()));
        assert_eq!(t.nudged(2.0, DType::F32).value(), f64::from(1.0f32.next_up()));
        // f16 has 10 fraction bits, bf16 7: 1 − 2^−11 below 1, 1 + 2^−10 above.
        assert_eq!(t.nudged(0.0, DType::F16).value(), 1.0 - 2f64.powi(-11));
        assert_eq!(t.nudged(2.0, DType::F16).value(), 1.0 + 2f64.powi(-10));
        assert_eq!(t.nudged(2.0, DType::BF16).value(), 1.0 + 2f64.powi(-7));
        assert_eq!(Time::<B>::Value(0.0).nudged(1.0, DType::F16).value(), 2f64.powi(-24));
        // A time that f32 cannot hold rounds first: its neighbour, not itself, is what f32 sees.
        let tenth = Time::<B>::Value(0.1);
        assert_eq!(tenth.nudged(1.0, DType::F32).value(), f64::from(0.1f32.next_up()));
        let device = Default::default();
        let like = Tensor::<B, 1>::zeros([1], &device).cast(DType::F32);
        let seen = tenth.nudged(0.0, DType::F32).to_tensor(&like).into_data();
        assert_eq!(seen, TensorData::from([0.1f32.next_down()]));
        // A tracked time moves by exactly one step of its type.
        let tracked = Time::<B>::Tensor(Tensor::from_data([0.1f32], (&device, DType::F32)), 0.1);
        let Time::Tensor(moved, _) = tracked.nudged(1.0, DType::F32) else {
            unreachable!("a tensor stays a tensor")
        };
        assert_eq!(moved.into_data(), TensorData::from([0.1f32.next_up()]));
    }
}
