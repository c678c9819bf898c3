//! Validated time grids.

use crate::error::{Error, Result};

/// The requested output times: finite, at least two, strictly monotone in either direction.
///
/// The first time is where the initial state sits; the solution has one state per time. Checked
/// once here, so the solver never sees a bad grid.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeGrid {
    times: Vec<f64>,
}

impl TimeGrid {
    /// Validates `times`.
    ///
    /// ```
    /// use adjoint_dpm::ode::TimeGrid;
    /// assert!(TimeGrid::new(&[1.0, 0.5, 0.0]).is_ok()); // backward in time is fine
    /// assert!(TimeGrid::new(&[0.0, 1.0, 1.0]).is_err()); // repeats are not
    /// ```
    pub fn new(times: &[f64]) -> Result<Self> {
        if times.len() < 2 {
            return Err(Error::GridTooShort { len: times.len() });
        }
        if let Some((index, &value)) = times.iter().enumerate().find(|(_, t)| !t.is_finite()) {
            return Err(Error::NonFiniteTime { index, value });
        }
        let direction = (times[1] - times[0]).signum();
        for (index, w) in times.windows(2).enumerate() {
            if (w[1] - w[0]).signum() != direction || w[1] == w[0] {
                return Err(Error::NonMonotoneGrid {
                    index: index + 1,
                    prev: w[0],
                    next: w[1],
                });
            }
        }
        Ok(Self { times: times.to_vec() })
    }

    /// The times.
    pub fn times(&self) -> &[f64] {
        &self.times
    }

    /// Number of times (= number of states in the solution).
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Always false: a grid has at least two times.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `+1.0` forward in time, `-1.0` backward.
    pub fn direction(&self) -> f64 {
        (self.times[1] - self.times[0]).signum()
    }

    /// Total signed length `t_last − t_first`.
    pub fn span(&self) -> f64 {
        self.times[self.times.len() - 1] - self.times[0]
    }

    /// The grid reversed (for integrating the adjoint backward).
    pub fn reversed(&self) -> Self {
        Self {
            times: self.times.iter().rev().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_short_non_finite_and_non_monotone_grids() {
        assert_eq!(TimeGrid::new(&[0.0]), Err(Error::GridTooShort { len: 1 }));
        assert_eq!(TimeGrid::new(&[]), Err(Error::GridTooShort { len: 0 }));
        assert!(matches!(
            TimeGrid::new(&[0.0, f64::NAN]),
            Err(Error::NonFiniteTime { index: 1, .. })
        ));
        assert_eq!(
            TimeGrid::new(&[0.0, 1.0, 0.5]),
            Err(Error::NonMonotoneGrid {
                index: 2,
                prev: 1.0,
                next: 0.5
            })
        );
        assert_eq!(
            TimeGrid::new(&[2.0, 2.0]),
            Err(Error::NonMonotoneGrid {
                index: 1,
                prev: 2.0,
                next: 2.0
            })
        );
        let g = TimeGrid::new(&[1.0, 0.0]).unwrap();
        assert_eq!(g.direction(), -1.0);
        assert_eq!(g.reversed().times(), &[0.0, 1.0]);
    }
}
