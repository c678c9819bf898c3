//! PI step-size control: sees only the error norm and the step, decides accept/reject and the
//! next step (Hairer, Nørsett & Wanner II, §IV.2; Söderlind's PI form).

/// Proportional-integral controller with the usual safety factor and growth limits.
#[derive(Debug, Clone)]
pub(crate) struct PiController {
    beta1: f64,
    beta2: f64,
    inv_q: f64,
    prev_err: f64,
}

/// Safety factor applied to every proposal.
const SAFETY: f64 = 0.9;
/// The step never shrinks by more than this factor at once.
const FACTOR_MIN: f64 = 0.2;
/// The step never grows by more than this factor at once.
const FACTOR_MAX: f64 = 10.0;

impl PiController {
    /// A controller for a method whose error estimate is of order `embedded_order + 1` in h,
    /// with diffrax's `pcoeff`/`icoeff` (validated by `Solver::validate`).
    pub(crate) fn new(embedded_order: u32, pcoeff: f64, icoeff: f64) -> Self {
        let q = f64::from(embedded_order + 1);
        Self {
            beta1: (pcoeff + icoeff) / q,
            beta2: pcoeff / q,
            inv_q: 1.0 / q,
            prev_err: 1.0,
        }
    }

    /// Decides on a step of size `h` whose scaled RMS error is `err` (≤ 1 is acceptable).
    /// Returns whether to accept it and the next step size (same sign as `h`).
    pub(crate) fn adapt(&mut self, err: f64, h: f64) -> (bool, f64) {
        if !err.is_finite() {
            return (false, h * FACTOR_MIN);
        }
        if err <= 1.0 {
            let factor = if err == 0.0 {
                FACTOR_MAX
            } else {
                SAFETY * err.powf(-self.beta1) * self.prev_err.powf(self.beta2)
            };
            self.prev_err = err.max(1e-4);
            (true, h * factor.clamp(FACTOR_MIN, FACTOR_MAX))
        } else {
            let factor = (SAFETY * err.powf(-self.inv_q)).clamp(FACTOR_MIN, 1.0);
            (false, h * factor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_small_errors_and_shrinks_on_large_ones() {
        let mut c = PiController::new(4, 0.0, 1.0);
        let (ok, h) = c.adapt(0.1, 0.1);
        assert!(ok && h > 0.1);
        let (ok, h) = c.adapt(4.0, 0.1);
        assert!(!ok && (0.1 * FACTOR_MIN..0.1).contains(&h));
        let (ok, h) = c.adapt(f64::NAN, -0.1);
        assert!(!ok && (h - (-0.1 * FACTOR_MIN)).abs() < 1e-15);
        let (ok, h) = c.adapt(0.0, 1.0);
        assert!(ok && h == FACTOR_MAX);
    }
}
