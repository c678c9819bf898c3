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

    /// The schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common diffusion noise
    /// schedules and sample steps are flawed"; diffusers' `rescale_betas_zero_snr`): √ᾱ is
    /// shifted and scaled so that its first value stays and its last becomes 0. Then, as
    /// diffusers' Euler, Heun, DPM-Solver and UniPC schedulers do, the last ᾱ is set to 2⁻²⁴, so
    /// that ρ stays finite there (≈ 4096) and y = x/α defined. (diffusers' `DDIMScheduler` keeps
    /// ᾱ = 0, which only a v-prediction network survives; its first step differs from this
    /// schedule's by ~2⁻¹² relative.) Train or sample a v-prediction network with it, with
    /// "trailing" timesteps so that sampling starts at the last level. A schedule whose
    /// rescaled ᾱ falls below 2⁻²⁴ before the last step (DDPM's linear one: 4.2e-9 at step
    /// 998) would then not decrease: an error.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::NoiseSchedule;
    /// let sd = NoiseSchedule::sd_scaled_linear();
    /// let zsnr = sd.rescale_zero_terminal_snr()?;
    /// assert!((zsnr.alphas_cumprod(0) - sd.alphas_cumprod(0)).abs() < 1e-15);
    /// assert!((zsnr.alphas_cumprod(999) / 2f64.powi(-24) - 1.0).abs() < 1e-12);
    /// assert!((zsnr.rho(999.0) - 4096.0).abs() < 1e-3);
    /// assert!(NoiseSchedule::ddpm_linear().rescale_zero_terminal_snr().is_err());
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn rescale_zero_terminal_snr(&self) -> Result<Self, DiffusionError> {
        // log α = ½ log ᾱ; diffusers' floor 2⁻²⁴ on ᾱ is 2⁻¹² on α.
        let floor = -12.0 * std::f64::consts::LN_2;
        let sqrt_abar: Vec<f64> = self.log_alpha.iter().map(|la| la.exp()).collect();
        let n = sqrt_abar.len();
        let (first, last) = (sqrt_abar[0], sqrt_abar[n - 1]);
        let scale = first / (first - last);
        let mut log_alpha: Vec<f64> = sqrt_abar[..n - 1].iter().map(|a| ((a - last) * scale).ln()).collect();
        if log_alpha[n - 2] <= floor {
            return Err(DiffusionError::BadSchedule {
                reason: format!(
                    "rescaled to zero terminal SNR, ᾱ at step {} is {:e}, below the 2^-24 the last \
                     step gets: the noise levels would not increase",
                    n - 2,
                    (2.0 * log_alpha[n - 2]).exp()
                ),
            });
        }
        log_alpha.push(floor);
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

    /// ρ at a fractional timestep as diffusers' `EulerDiscreteScheduler` and
    /// `HeunDiscreteScheduler` take it: linear in ρ (their σ) between the integer steps
    /// (`np.interp`), rather than [`NoiseSchedule::rho`]'s linear log α. Clamped to [0, N−1].
    pub fn rho_lerp(&self, t: f64) -> f64 {
        let n = self.log_alpha.len();
        let t = t.clamp(0.0, (n - 1) as f64);
        let k = (t.floor() as usize).min(n - 2);
        let f = t - k as f64;
        self.rho(k as f64) * (1.0 - f) + self.rho((k + 1) as f64) * f
    }

    /// The fractional timestep of a noise level as diffusers' `_sigma_to_t` finds it: the
    /// integer step at or below `rho` in log ρ (at most N−2) and its neighbour, interpolated
    /// linearly in log ρ, clamped to [0, N−1]. The timestep a network is told at Karras' or
    /// exponential levels.
    pub fn t_of_rho_log_lerp(&self, rho: f64) -> f64 {
        let n = self.log_alpha.len();
        let rho = rho.max(1e-10);
        // ρ increases with t, so the integer step at or below ρ is the floor of its exact t.
        let low = (self.t_of_rho(rho).floor() as usize).min(n - 2);
        let (a, b, target) = (self.rho(low as f64).ln(), self.rho((low + 1) as f64).ln(), rho.ln());
        low as f64 + ((a - target) / (a - b)).clamp(0.0, 1.0)
    }

    /// α as a function of ρ: 1/√(1 + ρ²).
    pub fn alpha_of_rho(rho: f64) -> f64 {
        1.0 / (1.0 + rho * rho).sqrt()
    }
}

/// Karras et al. (2022)'s `steps` noise levels from `rho_max` down to `rho_min`, evenly spaced
/// in ρ^(1/7), dense at low noise (diffusers' `_convert_to_karras`; ρ is their σ).
pub fn karras_levels(rho_max: f64, rho_min: f64, steps: usize) -> Vec<f64> {
    const SHAPE: f64 = 7.0;
    let (hi, lo) = (rho_max.powf(1.0 / SHAPE), rho_min.powf(1.0 / SHAPE));
    (0..steps)
        .map(|i| (hi + ramp(i, steps) * (lo - hi)).powf(SHAPE))
        .collect()
}

/// `steps` noise levels from `rho_max` down to `rho_min`, evenly spaced in log ρ, that is in
/// λ = −log ρ (diffusers' `_convert_to_exponential`, and its `use_lu_lambdas`, which spaces
/// the same levels evenly in λ).
pub fn exponential_levels(rho_max: f64, rho_min: f64, steps: usize) -> Vec<f64> {
    let (hi, lo) = (rho_max.ln(), rho_min.ln());
    (0..steps).map(|i| (hi + ramp(i, steps) * (lo - hi)).exp()).collect()
}

/// `np.linspace(0, 1, steps)[i]`.
fn ramp(i: usize, steps: usize) -> f64 {
    match steps {
        1 => 0.0,
        _ => i as f64 / (steps - 1) as f64,
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

/// The S inference timesteps, descending, of diffusers' `EulerDiscreteScheduler` and
/// `HeunDiscreteScheduler`: as [`timesteps`], but "linspace" is not rounded
/// (`linspace(0, N − 1, S)`, fractional unless S − 1 divides N − 1).
pub fn fractional_timesteps(
    train_steps: usize,
    steps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Result<Vec<f64>, DiffusionError> {
    if spacing != TimestepSpacing::Linspace {
        return Ok(timesteps(train_steps, steps, spacing, steps_offset)?
            .into_iter()
            .map(|t| t as f64)
            .collect());
    }
    if steps == 0 || steps > train_steps {
        return Err(DiffusionError::BadStepCount { steps, train_steps });
    }
    Ok((0..steps)
        .rev()
        .map(|k| ramp(k, steps) * (train_steps - 1) as f64)
        .collect())
}

/// The S inference timesteps, descending, of diffusers' `LCMScheduler.set_timesteps`: the
/// latent consistency model was distilled on the `original_steps` timesteps `k·j − 1`,
/// `k = N / original_steps`, `j = 1 ..= ⌊original_steps · strength⌋`; S of them are picked at
/// evenly spaced indices from the top. (`strength` < 1 is the LCM img2img pipeline's, which
/// shrinks that list before its own `get_timesteps` keeps the last ⌊S · strength⌋.)
pub fn lcm_timesteps(
    train_steps: usize,
    steps: usize,
    original_steps: usize,
    strength: f64,
) -> Result<Vec<usize>, DiffusionError> {
    let bad = |reason: String| Err(DiffusionError::SamplerOption { sampler: "LCM", reason });
    if steps == 0 || steps > train_steps {
        return Err(DiffusionError::BadStepCount { steps, train_steps });
    }
    if original_steps == 0 || original_steps > train_steps {
        return bad(format!(
            "original_inference_steps {original_steps} must be in 1..={train_steps} (the training steps)"
        ));
    }
    if steps > original_steps {
        return bad(format!(
            "{steps} steps cannot be picked from the {original_steps} timesteps it was distilled on (original_inference_steps)"
        ));
    }
    let k = train_steps / original_steps;
    let kept = (original_steps as f64 * strength) as usize;
    if kept < steps {
        return bad(format!(
            "original_inference_steps × strength = {original_steps} × {strength} leaves {kept} timesteps, fewer than the {steps} steps"
        ));
    }
    let origin: Vec<usize> = (1..=kept).rev().map(|j| j * k - 1).collect();
    // numpy's floor(linspace(0, len, S, endpoint=False)).
    let stride = origin.len() as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| origin[(i as f64 * stride).floor() as usize])
        .collect())
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
    fn euler_levels_interpolate_as_diffusers() {
        // EulerDiscreteScheduler(num_train_timesteps=1000).set_timesteps(20).timesteps[:3]
        let ts = fractional_timesteps(1000, 20, TimestepSpacing::Linspace, 0).unwrap();
        assert_eq!((ts[0], ts[19]), (999.0, 0.0));
        assert!((ts[1] - 946.421_052_631_578_9).abs() < 1e-9 && (ts[2] - 893.842_105_263_157_9).abs() < 1e-9);
        for s in schedules() {
            for k in [0usize, 1, 500, 998, 999] {
                let t = k as f64;
                assert!((s.rho_lerp(t) - s.rho(t)).abs() <= 1e-12 * s.rho(t));
                assert!((s.t_of_rho_log_lerp(s.rho(t)) - t).abs() < 1e-9, "k = {k}");
            }
            // Between steps: linear in ρ, and its log-ρ timestep lies between them.
            let (a, b) = (s.rho(400.0), s.rho(401.0));
            assert!((s.rho_lerp(400.25) - (0.75 * a + 0.25 * b)).abs() < 1e-12 * b);
            let t = s.t_of_rho_log_lerp((a * b).sqrt());
            assert!((t - 400.5).abs() < 1e-12, "{t}");
            // Clamped outside the schedule.
            assert_eq!(s.t_of_rho_log_lerp(0.0), 0.0);
            assert_eq!(s.t_of_rho_log_lerp(1e6), 999.0);
        }
        let levels = exponential_levels(10.0, 0.1, 3);
        assert!((levels[1] - 1.0).abs() < 1e-12 && (levels[2] - 0.1).abs() < 1e-12);
        assert!((karras_levels(10.0, 0.1, 1)[0] - 10.0).abs() < 1e-12);
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
