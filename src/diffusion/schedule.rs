//! Variance-preserving noise schedules: `x_t = α_t x_0 + σ_t ε`, `α² + σ² = 1`.
//!
//! A schedule is its discrete `β_k` (k = 0..N−1, diffusers' convention), giving
//! `ᾱ_k = Π_{j≤k} (1 − β_j)`, `α_k = √ᾱ_k`, `σ_k = √(1 − ᾱ_k)`. Continuous time `t ∈ [0, N−1]`
//! (in timestep units, what the network is fed) interpolates `log α` linearly between the integer
//! steps, as DPM-Solver's discrete VP schedule does, so that `ρ = σ/α = e^{−λ}` is strictly
//! increasing in t and inverts exactly.

use serde::{Deserialize, Serialize};

use crate::diffusion::error::DiffusionError;

/// How the betas are laid out, with diffusers' names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// DDPM: β linear from `beta_start` to `beta_end`.
    Linear,
    /// Stable Diffusion: √β linear from √beta_start to √beta_end.
    ScaledLinear,
    /// Nichol & Dhariwal's cosine ᾱ ("squaredcos_cap_v2"), β capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    Cosine,
}

/// A discrete VP noise schedule with continuous-time interpolation.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// log α at each integer timestep.
    log_alpha: Vec<f64>,
}

impl NoiseSchedule {
    /// DDPM's linear schedule, β from 1e-4 to 0.02 over 1000 steps.
    pub fn ddpm_linear() -> Self {
        Self::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).expect("valid constants")
    }

    /// Stable Diffusion's scaled-linear schedule, β from 0.00085 to 0.012 over 1000 steps.
    pub fn sd_scaled_linear() -> Self {
        Self::new(BetaSchedule::ScaledLinear, 1000, 0.00085, 0.012).expect("valid constants")
    }

    /// The cosine schedule over 1000 steps.
    pub fn cosine() -> Self {
        Self::new(BetaSchedule::Cosine, 1000, 0.0, 0.0).expect("valid constants")
    }

    /// A schedule of `steps` betas (`beta_start`, `beta_end` unused for cosine).
    pub fn new(kind: BetaSchedule, steps: usize, beta_start: f64, beta_end: f64) -> Result<Self, DiffusionError> {
        if steps < 2 {
            return Err(DiffusionError::BadSchedule {
                reason: format!("{steps} training steps; need at least 2"),
            });
        }
        let lerp = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (steps - 1) as f64;
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear => (0..steps).map(|i| lerp(beta_start, beta_end, i)).collect(),
            BetaSchedule::ScaledLinear => {
                if beta_start < 0.0 || beta_end < 0.0 {
                    return Err(DiffusionError::BadSchedule {
                        reason: format!("scaled_linear needs β ≥ 0, got {beta_start} → {beta_end}"),
                    });
                }
                (0..steps)
                    .map(|i| lerp(beta_start.sqrt(), beta_end.sqrt(), i).powi(2))
                    .collect()
            }
            BetaSchedule::Cosine => {
                let abar = |i: usize| {
                    ((i as f64 / steps as f64 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..steps).map(|i| (1.0 - abar(i + 1) / abar(i)).min(0.999)).collect()
            }
        };
        Self::from_betas(&betas)
    }

    /// A schedule from explicit betas: each in (0, 1) (then ᾱ strictly decreases), none smaller
    /// than the one before (noise is added ever faster, as in every published schedule).
    pub fn from_betas(betas: &[f64]) -> Result<Self, DiffusionError> {
        if betas.len() < 2 {
            return Err(DiffusionError::BadSchedule {
                reason: format!("{} betas; need at least 2", betas.len()),
            });
        }
        if let Some((index, beta)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && **b > 0.0 && **b < 1.0))
        {
            return Err(DiffusionError::BadSchedule {
                reason: format!("beta[{index}] = {beta}; every beta must lie in (0, 1)"),
            });
        }
        if let Some(i) = (1..betas.len()).find(|&i| betas[i] < betas[i - 1]) {
            return Err(DiffusionError::BadSchedule {
                reason: format!(
                    "beta[{i}] = {} < beta[{}] = {}; betas must not decrease",
                    betas[i],
                    i - 1,
                    betas[i - 1]
                ),
            });
        }
        let mut log_abar = 0.0;
        let log_alpha = betas
            .iter()
            .map(|b| {
                log_abar += (1.0 - b).ln();
                0.5 * log_abar
            })
            .collect();
        Ok(Self { log_alpha })
    }

    /// Number of training timesteps N.
    pub fn train_steps(&self) -> usize {
        self.log_alpha.len()
    }

    /// ᾱ at integer timestep k (diffusers' `alphas_cumprod[k]`).
    pub fn alphas_cumprod(&self, k: usize) -> f64 {
        (2.0 * self.log_alpha[k]).exp()
    }

    /// log α at continuous t ∈ [0, N−1] (clamped).
    pub fn log_alpha(&self, t: f64) -> f64 {
        let last = (self.log_alpha.len() - 1) as f64;
        let t = t.clamp(0.0, last);
        let k = (t.floor() as usize).min(self.log_alpha.len() - 2);
        let f = t - k as f64;
        self.log_alpha[k] * (1.0 - f) + self.log_alpha[k + 1] * f
    }

    /// α(t).
    pub fn alpha(&self, t: f64) -> f64 {
        self.log_alpha(t).exp()
    }

    /// σ(t) = √(1 − α²).
    pub fn sigma(&self, t: f64) -> f64 {
        (-(2.0 * self.log_alpha(t)).exp_m1()).sqrt()
    }

    /// λ(t) = log(α/σ).
    pub fn lambda(&self, t: f64) -> f64 {
        self.log_alpha(t) - self.sigma(t).ln()
    }

    /// ρ(t) = σ/α = e^{−λ}: the time variable of the semi-linear PF-ODE.
    pub fn rho(&self, t: f64) -> f64 {
        (-self.lambda(t)).exp()
    }

    /// The t with ρ(t) = ρ, exact for the interpolated schedule; clamped to [0, N−1].
    pub fn t_of_rho(&self, rho: f64) -> f64 {
        // log α = −½ log(1 + ρ²) is linear in t inside each step: find the step, then solve.
        let target = -0.5 * rho.powi(2).ln_1p();
        let la = &self.log_alpha;
        if target >= la[0] {
            return 0.0;
        }
        if target <= la[la.len() - 1] {
            return (la.len() - 1) as f64;
        }
        let k = la.partition_point(|&v| v > target).saturating_sub(1);
        let (a, b) = (la[k], la[k + 1]);
        k as f64 + (target - a) / (b - a)
    }

    /// Karras et al. (2022)'s `steps` noise levels, decreasing from ρ(N−1) to ρ(0), evenly
    /// spaced in ρ^(1/7) (diffusers' `use_karras_sigmas`; ρ is their σ), and the training
    /// timestep the network sees at each: the step whose log ρ is nearest, interpolated
    /// linearly in log ρ and rounded half to even, as diffusers' `_sigma_to_t` and `round()`.
    pub fn karras(&self, steps: usize) -> Result<(Vec<f64>, Vec<usize>), DiffusionError> {
        let n = self.train_steps();
        if steps == 0 || steps > n || n < 2 {
            return Err(DiffusionError::BadStepCount { steps, train_steps: n });
        }
        const SHAPE: f64 = 7.0;
        let (lo, hi) = (
            self.rho(0.0).powf(1.0 / SHAPE),
            self.rho((n - 1) as f64).powf(1.0 / SHAPE),
        );
        let rhos: Vec<f64> = (0..steps)
            .map(|i| {
                let ramp = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
                (hi + ramp * (lo - hi)).powf(SHAPE)
            })
            .collect();
        let log_rhos: Vec<f64> = (0..n).map(|k| self.rho(k as f64).ln()).collect();
        let timesteps = rhos
            .iter()
            .map(|rho| {
                let target = rho.ln();
                // The last step at or below the target, at most N−2; its neighbour above.
                let low = log_rhos.partition_point(|&l| l <= target).saturating_sub(1).min(n - 2);
                let (a, b) = (log_rhos[low], log_rhos[low + 1]);
                let w = ((a - target) / (a - b)).clamp(0.0, 1.0);
                (low as f64 + w).round_ties_even() as usize
            })
            .collect();
        Ok((rhos, timesteps))
    }

    /// α as a function of ρ: 1/√(1 + ρ²).
    pub fn alpha_of_rho(rho: f64) -> f64 {
        1.0 / (1.0 + rho * rho).sqrt()
    }
}

/// How inference timesteps are picked from the N training steps, with diffusers' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `k · (N / S)` for k = 0..S, plus `steps_offset`, descending.
    Leading,
    /// `round(N − k · N/S) − 1`, descending.
    Trailing,
    /// `round(linspace(0, N − 1, S))`, descending.
    Linspace,
}

/// The S inference timesteps, descending, as diffusers' schedulers pick them
/// (`DDIMScheduler.set_timesteps`, diffusers v0.31).
pub fn timesteps(
    train_steps: usize,
    steps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Result<Vec<usize>, DiffusionError> {
    if steps == 0 || steps > train_steps {
        return Err(DiffusionError::BadStepCount { steps, train_steps });
    }
    let ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            (0..steps)
                .map(|k| ((train_steps as f64 - k as f64 * ratio).round() as usize).saturating_sub(1))
                .collect()
        }
        TimestepSpacing::Linspace => (0..steps)
            .rev()
            .map(|k| {
                if steps == 1 {
                    0
                } else {
                    (k as f64 * (train_steps - 1) as f64 / (steps - 1) as f64).round() as usize
                }
            })
            .collect(),
    };
    if let Some(&t) = ts.iter().find(|&&t| t >= train_steps) {
        return Err(DiffusionError::BadSchedule {
            reason: format!("timestep {t} ≥ {train_steps} training steps (steps_offset = {steps_offset})"),
        });
    }
    Ok(ts)
}

/// The S inference timesteps of diffusers' `DPMSolverMultistepScheduler.set_timesteps`
/// (diffusers v0.31, `lambda_min_clipped` = −∞): S + 1 points are spread and the last dropped.
pub fn dpm_solver_timesteps(
    train_steps: usize,
    steps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Result<Vec<usize>, DiffusionError> {
    if steps == 0 || steps > train_steps {
        return Err(DiffusionError::BadStepCount { steps, train_steps });
    }
    let ts: Vec<usize> = match spacing {
        TimestepSpacing::Linspace => (1..=steps)
            .rev()
            .map(|k| (k as f64 * (train_steps - 1) as f64 / steps as f64).round() as usize)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train_steps / (steps + 1);
            (1..=steps).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => return timesteps(train_steps, steps, spacing, steps_offset),
    };
    if let Some(&t) = ts.iter().find(|&&t| t >= train_steps) {
        return Err(DiffusionError::BadSchedule {
            reason: format!("timestep {t} ≥ {train_steps} training steps (steps_offset = {steps_offset})"),
        });
    }
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schedules() -> [NoiseSchedule; 3] {
        [
            NoiseSchedule::ddpm_linear(),
            NoiseSchedule::sd_scaled_linear(),
            NoiseSchedule::cosine(),
        ]
    }

    proptest! {
        #[test]
        fn alpha_sq_plus_sigma_sq_is_one(t in 0.0f64..999.0) {
            for s in schedules() {
                let (a, b) = (s.alpha(t), s.sigma(t));
                prop_assert!((a * a + b * b - 1.0).abs() < 1e-12);
            }
        }

        #[test]
        fn rho_inverse_round_trips(t in 0.0f64..999.0) {
            for s in schedules() {
                let back = s.t_of_rho(s.rho(t));
                prop_assert!((back - t).abs() < 1e-6 * t.max(1.0), "t = {t}, back = {back}");
            }
        }
    }

    #[test]
    fn alphas_cumprod_strictly_decreasing() {
        for s in schedules() {
            for k in 1..s.train_steps() {
                assert!(s.alphas_cumprod(k) < s.alphas_cumprod(k - 1));
            }
            for k in 1..999 {
                assert!(s.rho(k as f64 + 0.5) > s.rho(k as f64));
            }
        }
    }

    #[test]
    fn sd_schedule_matches_diffusers_values() {
        // diffusers DDPMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012).alphas_cumprod
        let s = NoiseSchedule::sd_scaled_linear();
        assert!((s.alphas_cumprod(0) - 0.99915).abs() < 1e-12);
        assert!(
            (s.alphas_cumprod(999) - 0.004_660_098_513_077_234).abs() < 1e-14,
            "{}",
            s.alphas_cumprod(999)
        );
    }

    #[test]
    fn bad_schedules_and_step_counts_are_errors() {
        assert!(matches!(
            NoiseSchedule::from_betas(&[0.1, 1.5]),
            Err(DiffusionError::BadSchedule { .. })
        ));
        assert!(matches!(
            NoiseSchedule::from_betas(&[0.1, f64::NAN]),
            Err(DiffusionError::BadSchedule { .. })
        ));
        assert!(matches!(
            NoiseSchedule::new(BetaSchedule::Linear, 1000, -0.1, 0.02),
            Err(DiffusionError::BadSchedule { .. })
        ));
        assert_eq!(
            timesteps(1000, 0, TimestepSpacing::Leading, 0),
            Err(DiffusionError::BadStepCount {
                steps: 0,
                train_steps: 1000
            })
        );
        assert_eq!(
            timesteps(1000, 1001, TimestepSpacing::Leading, 0),
            Err(DiffusionError::BadStepCount {
                steps: 1001,
                train_steps: 1000
            })
        );
    }

    #[test]
    fn dpm_solver_spacings_match_diffusers() {
        // DPMSolverMultistepScheduler(num_train_timesteps=1000).set_timesteps(10).
        assert_eq!(
            dpm_solver_timesteps(1000, 10, TimestepSpacing::Linspace, 0).unwrap(),
            [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
        );
        assert_eq!(
            dpm_solver_timesteps(1000, 10, TimestepSpacing::Leading, 1).unwrap(),
            [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
        );
    }

    #[test]
    fn spacings_match_diffusers() {
        // DDIMScheduler(num_train_timesteps=1000).set_timesteps(10) with each spacing.
        assert_eq!(
            timesteps(1000, 10, TimestepSpacing::Leading, 1).unwrap(),
            [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        assert_eq!(
            timesteps(1000, 10, TimestepSpacing::Trailing, 0).unwrap(),
            [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            timesteps(1000, 10, TimestepSpacing::Linspace, 0).unwrap(),
            [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
    }
}
