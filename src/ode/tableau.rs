//! Butcher tableaux of the explicit Runge–Kutta methods, as data.
//!
//! A method is `c`, the strictly lower triangle `a` (row `i` holds the `i` coefficients of stage
//! `i + 1`), the solution weights `b` and, for adaptive methods, the error weights
//! `b_err = b − b̂` of its embedded lower-order pair, and, for adaptive methods, the polynomial
//! weights of its dense output (the continuous extension that interpolates inside a step). Every
//! method goes through the one stepper in the engine's solver module; the tests below check each
//! tableau's consistency, its order and the order of its dense output.

/// An explicit Runge–Kutta method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ButcherTableau {
    /// Short name, as used by the CLI and error messages.
    pub name: &'static str,
    /// Order of the solution.
    pub order: u32,
    /// Order of the embedded solution (0 when there is none); sets the step controller's exponents.
    pub embedded_order: u32,
    /// Stage times as fractions of the step.
    pub c: &'static [f64],
    /// Rows of the strictly lower triangle: `a[i - 1][j]` weighs stage `j` in stage `i`.
    pub a: &'static [&'static [f64]],
    /// Solution weights.
    pub b: &'static [f64],
    /// Error weights `b − b̂`; `None` for methods without an embedded pair.
    pub b_err: Option<&'static [f64]>,
    /// Dense output: row `i` holds the coefficients of θ, θ², … in `b_i(θ)`, so that
    /// `y(t + θh) = y + h Σ b_i(θ) k_i` for θ in [0, 1] (and `b_i(1) = b_i`). `None` for methods
    /// without one; an adaptive solve then steps to every output time instead of interpolating.
    pub dense: Option<&'static [&'static [f64]]>,
}

impl ButcherTableau {
    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.b.len()
    }

    /// First-same-as-last: the last stage is evaluated at the new state, so the next step can reuse
    /// it as its first stage.
    pub fn is_fsal(&self) -> bool {
        let s = self.stages();
        s > 1 && self.c[s - 1] == 1.0 && self.b[s - 1] == 0.0 && self.a[s - 2].iter().zip(self.b).all(|(a, b)| a == b)
    }

    /// Whether the method can control its own step size.
    pub fn is_adaptive(&self) -> bool {
        self.b_err.is_some()
    }

    /// Checks the shapes the stepper relies on (for a tableau written by hand): one `c`, `b`,
    /// `b_err` entry and one dense row per stage, and `a` a strictly lower triangle.
    /// [`Solver::validate`](crate::ode::Solver::validate) calls it.
    ///
    /// ```
    /// use adjoint_dpm::ode::tableau::{ButcherTableau, RK4};
    /// assert!(RK4.check_shape().is_ok());
    /// let short = ButcherTableau { c: &[0.0, 0.5], ..RK4 };
    /// assert!(short.check_shape().is_err());
    /// ```
    pub fn check_shape(&self) -> Result<(), &'static str> {
        let s = self.stages();
        if s == 0 {
            return Err("b must have one weight per stage, at least one");
        }
        if self.c.len() != s {
            return Err("c must have one entry per stage (as many as b)");
        }
        if self.a.len() != s - 1 || self.a.iter().enumerate().any(|(i, row)| row.len() != i + 1) {
            return Err("a must be the strictly lower triangle: rows of 1, 2, …, stages − 1 entries");
        }
        if self.b_err.is_some_and(|e| e.len() != s) {
            return Err("b_err must have one entry per stage");
        }
        if self.dense.is_some_and(|rows| rows.len() != s) {
            return Err("dense must have one row per stage");
        }
        Ok(())
    }

    /// The dense-output weights `b_i(θ)` at fraction `theta` of a step, `None` without a dense
    /// output.
    ///
    /// ```
    /// use adjoint_dpm::ode::tableau::DOPRI5;
    /// let w = DOPRI5.dense_weights(1.0).unwrap();
    /// assert!(w.iter().zip(DOPRI5.b).all(|(w, b)| (w - b).abs() < 1e-14)); // θ = 1: the step
    /// ```
    pub fn dense_weights(&self, theta: f64) -> Option<Vec<f64>> {
        let rows = self.dense?;
        Some(
            rows.iter()
                .map(|row| row.iter().rev().fold(0.0, |acc, p| (acc + p) * theta))
                .collect(),
        )
    }

    /// `d b_i/dθ` at `theta`: how the interpolated state moves with the output time.
    pub fn dense_weight_slopes(&self, theta: f64) -> Option<Vec<f64>> {
        let rows = self.dense?;
        Some(
            rows.iter()
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .rev()
                        .fold(0.0, |acc, (j, p)| acc * theta + (j + 1) as f64 * p)
                })
                .collect(),
        )
    }

    /// All methods shipped with the crate.
    pub fn all() -> [&'static ButcherTableau; 8] {
        [&EULER, &MIDPOINT, &HEUN, &RK4, &BOSH3, &DOPRI5, &TSIT5, &DOPRI8]
    }

    /// Looks a method up by its name (`euler`, `midpoint`, `heun`, `rk4`, `bosh3`, `dopri5`,
    /// `tsit5`, `dopri8`).
    pub fn by_name(name: &str) -> Option<&'static ButcherTableau> {
        Self::all().into_iter().find(|t| t.name == name)
    }
}

/// Forward Euler: first order, one stage.
pub const EULER: ButcherTableau = ButcherTableau {
    name: "euler",
    order: 1,
    embedded_order: 0,
    c: &[0.0],
    a: &[],
    b: &[1.0],
    b_err: None,
    // Linear: y + θh k1.
    dense: Some(&[&[1.0]]),
};

/// Explicit midpoint: second order, two stages.
pub const MIDPOINT: ButcherTableau = ButcherTableau {
    name: "midpoint",
    order: 2,
    embedded_order: 0,
    c: &[0.0, 0.5],
    a: &[&[0.5]],
    b: &[0.0, 1.0],
    b_err: None,
    // y + h((θ − θ²) k1 + θ² k2): second order, like the method.
    dense: Some(&[&[1.0, -1.0], &[0.0, 1.0]]),
};

/// Heun's method (explicit trapezoid), second order, with Euler embedded for an error estimate.
/// In ρ on the semi-linear PF-ODE this is the 2nd-order sampler of EDM / AdjointDPM.
pub const HEUN: ButcherTableau = ButcherTableau {
    name: "heun",
    order: 2,
    embedded_order: 1,
    c: &[0.0, 1.0],
    a: &[&[1.0]],
    b: &[0.5, 0.5],
    b_err: Some(&[0.5 - 1.0, 0.5]),
    // y + h(θ k1 + θ²/2 (k2 − k1)): second order, like the method.
    dense: Some(&[&[1.0, -0.5], &[0.0, 0.5]]),
};

/// The classical fourth-order Runge–Kutta method.
pub const RK4: ButcherTableau = ButcherTableau {
    name: "rk4",
    order: 4,
    embedded_order: 0,
    c: &[0.0, 0.5, 0.5, 1.0],
    a: &[&[0.5], &[0.0, 0.5], &[0.0, 0.0, 1.0]],
    b: &[1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
    b_err: None,
    // The classical third-order continuous extension (Hairer, Nørsett & Wanner I, §II.6).
    dense: Some(&[
        &[1.0, -1.5, 2.0 / 3.0],
        &[0.0, 1.0, -2.0 / 3.0],
        &[0.0, 1.0, -2.0 / 3.0],
        &[0.0, -0.5, 2.0 / 3.0],
    ]),
};

/// Bogacki–Shampine 3(2), FSAL. P. Bogacki and L. F. Shampine, "A 3(2) pair of Runge–Kutta
/// formulas", Appl. Math. Lett. 2 (1989).
pub const BOSH3: ButcherTableau = ButcherTableau {
    name: "bosh3",
    order: 3,
    embedded_order: 2,
    c: &[0.0, 0.5, 0.75, 1.0],
    a: &[&[0.5], &[0.0, 0.75], &[2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0]],
    b: &[2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0, 0.0],
    b_err: Some(&[
        2.0 / 9.0 - 7.0 / 24.0,
        1.0 / 3.0 - 1.0 / 4.0,
        4.0 / 9.0 - 1.0 / 3.0,
        -1.0 / 8.0,
    ]),
    // The cubic Hermite interpolant through y, y_new, f(y) = k1 and f(y_new) = k4 (FSAL): third
    // order, the method's own.
    dense: Some(&[
        &[1.0, -4.0 / 3.0, 5.0 / 9.0],
        &[0.0, 1.0, -2.0 / 3.0],
        &[0.0, 4.0 / 3.0, -8.0 / 9.0],
        &[0.0, -1.0, 1.0],
    ]),
};

/// Dormand–Prince 5(4), FSAL. J. R. Dormand and P. J. Prince, "A family of embedded Runge–Kutta
/// formulae", J. Comput. Appl. Math. 6 (1980).
pub const DOPRI5: ButcherTableau = ButcherTableau {
    name: "dopri5",
    order: 5,
    embedded_order: 4,
    c: &[0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0],
    a: &[
        &[1.0 / 5.0],
        &[3.0 / 40.0, 9.0 / 40.0],
        &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
        &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
        &[
            9017.0 / 3168.0,
            -355.0 / 33.0,
            46732.0 / 5247.0,
            49.0 / 176.0,
            -5103.0 / 18656.0,
        ],
        &[
            35.0 / 384.0,
            0.0,
            500.0 / 1113.0,
            125.0 / 192.0,
            -2187.0 / 6784.0,
            11.0 / 84.0,
        ],
    ],
    b: &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
        0.0,
    ],
    b_err: Some(&[
        35.0 / 384.0 - 5179.0 / 57600.0,
        0.0,
        500.0 / 1113.0 - 7571.0 / 16695.0,
        125.0 / 192.0 - 393.0 / 640.0,
        -2187.0 / 6784.0 + 92097.0 / 339200.0,
        11.0 / 84.0 - 187.0 / 2100.0,
        -1.0 / 40.0,
    ]),
    // Hairer's fourth-order continuous extension (Hairer, Nørsett & Wanner I, §II.6; the `contd5`
    // of his DOPRI5 code), `y + θΔ + θ(1−θ)(hk1 − Δ) + θ²(1−θ)(2Δ − hk1 − hk7) + θ²(1−θ)² h Σ d_i k_i`
    // with Δ = y_new − y, expanded into powers of θ.
    dense: Some(&[
        &[
            1.0,
            -8048581381.0 / 2820520608.0,
            8663915743.0 / 2820520608.0,
            -12715105075.0 / 11282082432.0,
        ],
        &[0.0, 0.0, 0.0, 0.0],
        &[
            0.0,
            131558114200.0 / 32700410799.0,
            -68118460800.0 / 10900136933.0,
            87487479700.0 / 32700410799.0,
        ],
        &[
            0.0,
            -1754552775.0 / 470086768.0,
            14199869525.0 / 1410260304.0,
            -10690763975.0 / 1880347072.0,
        ],
        &[
            0.0,
            127303824393.0 / 49829197408.0,
            -318862633887.0 / 49829197408.0,
            701980252875.0 / 199316789632.0,
        ],
        &[
            0.0,
            -282668133.0 / 205662961.0,
            2019193451.0 / 616988883.0,
            -1453857185.0 / 822651844.0,
        ],
        &[
            0.0,
            40617522.0 / 29380423.0,
            -110615467.0 / 29380423.0,
            69997945.0 / 29380423.0,
        ],
    ]),
};

const TSIT5_B: [f64; 7] = [
    0.096_460_766_818_065_23,
    0.01,
    0.479_889_650_414_499_6,
    1.379_008_574_103_742,
    -3.290_069_515_436_081,
    2.324_710_524_099_774,
    0.0,
];

/// Tsitouras 5(4), FSAL. Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the
/// first column simplifying assumption", Comput. Math. Appl. 62 (2011).
pub const TSIT5: ButcherTableau = ButcherTableau {
    name: "tsit5",
    order: 5,
    embedded_order: 4,
    c: &[0.0, 0.161, 0.327, 0.9, 0.980_025_540_904_509_7, 1.0, 1.0],
    a: &[
        &[0.161],
        &[-0.008_480_655_492_356_989, 0.335_480_655_492_357],
        &[2.897_153_057_105_493_4, -6.359_448_489_975_075, 4.362_295_432_869_581],
        &[
            5.325_864_828_439_257,
            -11.748_883_564_062_828,
            7.495_539_342_889_836,
            -0.092_495_066_361_755_25,
        ],
        &[
            5.861_455_442_946_42,
            -12.920_969_317_847_11,
            8.159_367_898_576_159,
            -0.071_584_973_281_401,
            -0.028_269_050_394_068_383,
        ],
        &[TSIT5_B[0], TSIT5_B[1], TSIT5_B[2], TSIT5_B[3], TSIT5_B[4], TSIT5_B[5]],
    ],
    b: &TSIT5_B,
    b_err: Some(&[
        TSIT5_B[0] - 0.094_680_755_765_839_46,
        TSIT5_B[1] - 0.009_183_565_540_343_253,
        TSIT5_B[2] - 0.487_770_528_424_761_6,
        TSIT5_B[3] - 1.234_297_566_930_479,
        TSIT5_B[4] + 2.707_712_349_983_525_5,
        TSIT5_B[5] - 1.866_628_418_170_587,
        -1.0 / 66.0,
    ]),
    // Tsitouras' fourth-order interpolant (the paper's b_i(θ), given there in factored form),
    // expanded into powers of θ.
    dense: Some(&[
        &[
            1.0,
            -2.763_706_197_274_826,
            2.913_255_461_821_912_6,
            -1.053_088_497_729_021_6,
        ],
        &[0.0, 0.1317, -0.2234, 0.1017],
        &[
            0.0,
            3.930_296_236_894_751_6,
            -5.941_033_872_131_505,
            2.490_627_285_651_253,
        ],
        &[
            0.0,
            -12.411_077_166_933_676,
            30.338_188_630_282_32,
            -16.548_102_889_244_902,
        ],
        &[0.0, 37.509_313_416_511_04, -88.178_904_894_766_4, 47.379_521_962_819_28],
        &[
            0.0,
            -27.896_526_289_197_286,
            65.091_894_674_793_66,
            -34.870_657_861_496_61,
        ],
        &[0.0, 1.5, -4.0, 2.5],
    ]),
};

const DOPRI8_B: [f64; 14] = [
    14005451.0 / 335480064.0,
    0.0,
    0.0,
    0.0,
    0.0,
    -59238493.0 / 1068277825.0,
    181606767.0 / 758867731.0,
    561292985.0 / 797845732.0,
    -1041891430.0 / 1371343529.0,
    760417239.0 / 1151165299.0,
    118820643.0 / 751138087.0,
    -528747749.0 / 2220607170.0,
    1.0 / 4.0,
    0.0,
];

/// Prince–Dormand 8(7), 13 stages plus FSAL ("RK8(7)13M"). P. J. Prince and J. R. Dormand,
/// "High order embedded Runge–Kutta formulae", J. Comput. Appl. Math. 7 (1981), with their
/// rational approximations of the coefficients (torchdiffeq's and diffrax's `dopri8`). For tight
/// tolerances and reference solutions: each step costs 13 evaluations of f, against 6 for Dopri5.
pub const DOPRI8: ButcherTableau = ButcherTableau {
    name: "dopri8",
    order: 8,
    embedded_order: 7,
    c: &[
        0.0,
        1.0 / 18.0,
        1.0 / 12.0,
        1.0 / 8.0,
        5.0 / 16.0,
        3.0 / 8.0,
        59.0 / 400.0,
        93.0 / 200.0,
        5490023248.0 / 9719169821.0,
        13.0 / 20.0,
        1201146811.0 / 1299019798.0,
        1.0,
        1.0,
        1.0,
    ],
    a: &[
        &[1.0 / 18.0],
        &[1.0 / 48.0, 1.0 / 16.0],
        &[1.0 / 32.0, 0.0, 3.0 / 32.0],
        &[5.0 / 16.0, 0.0, -75.0 / 64.0, 75.0 / 64.0],
        &[3.0 / 80.0, 0.0, 0.0, 3.0 / 16.0, 3.0 / 20.0],
        &[
            29443841.0 / 614563906.0,
            0.0,
            0.0,
            77736538.0 / 692538347.0,
            -28693883.0 / 1125000000.0,
            23124283.0 / 1800000000.0,
        ],
        &[
            16016141.0 / 946692911.0,
            0.0,
            0.0,
            61564180.0 / 158732637.0,
            22789713.0 / 633445777.0,
            545815736.0 / 2771057229.0,
            -180193667.0 / 1043307555.0,
        ],
        &[
            39632708.0 / 573591083.0,
            0.0,
            0.0,
            -433636366.0 / 683701615.0,
            -421739975.0 / 2616292301.0,
            100302831.0 / 723423059.0,
            790204164.0 / 839813087.0,
            800635310.0 / 3783071287.0,
        ],
        &[
            246121993.0 / 1340847787.0,
            0.0,
            0.0,
            -37695042795.0 / 15268766246.0,
            -309121744.0 / 1061227803.0,
            -12992083.0 / 490766935.0,
            6005943493.0 / 2108947869.0,
            393006217.0 / 1396673457.0,
            123872331.0 / 1001029789.0,
        ],
        &[
            -1028468189.0 / 846180014.0,
            0.0,
            0.0,
            8478235783.0 / 508512852.0,
            1311729495.0 / 1432422823.0,
            -10304129995.0 / 1701304382.0,
            -48777925059.0 / 3047939560.0,
            15336726248.0 / 1032824649.0,
            -45442868181.0 / 3398467696.0,
            3065993473.0 / 597172653.0,
        ],
        &[
            185892177.0 / 718116043.0,
            0.0,
            0.0,
            -3185094517.0 / 667107341.0,
            -477755414.0 / 1098053517.0,
            -703635378.0 / 230739211.0,
            5731566787.0 / 1027545527.0,
            5232866602.0 / 850066563.0,
            -4093664535.0 / 808688257.0,
            3962137247.0 / 1805957418.0,
            65686358.0 / 487910083.0,
        ],
        &[
            403863854.0 / 491063109.0,
            0.0,
            0.0,
            -5068492393.0 / 434740067.0,
            -411421997.0 / 543043805.0,
            652783627.0 / 914296604.0,
            11173962825.0 / 925320556.0,
            -13158990841.0 / 6184727034.0,
            3936647629.0 / 1978049680.0,
            -160528059.0 / 685178525.0,
            248638103.0 / 1413531060.0,
            0.0,
        ],
        &[
            DOPRI8_B[0],
            DOPRI8_B[1],
            DOPRI8_B[2],
            DOPRI8_B[3],
            DOPRI8_B[4],
            DOPRI8_B[5],
            DOPRI8_B[6],
            DOPRI8_B[7],
            DOPRI8_B[8],
            DOPRI8_B[9],
            DOPRI8_B[10],
            DOPRI8_B[11],
            DOPRI8_B[12],
        ],
    ],
    b: &DOPRI8_B,
    b_err: Some(&[
        DOPRI8_B[0] - 13451932.0 / 455176623.0,
        0.0,
        0.0,
        0.0,
        0.0,
        DOPRI8_B[5] + 808719846.0 / 976000145.0,
        DOPRI8_B[6] - 1757004468.0 / 5645159321.0,
        DOPRI8_B[7] - 656045339.0 / 265891186.0,
        DOPRI8_B[8] + 3867574721.0 / 1518517206.0,
        DOPRI8_B[9] - 465885868.0 / 322736535.0,
        DOPRI8_B[10] - 53011238.0 / 667516719.0,
        DOPRI8_B[11] - 2.0 / 45.0,
        DOPRI8_B[12],
        0.0,
    ]),
    // A fifth-order continuous extension, b_i(θ) of degree 6 (torchdiffeq evaluates it at θ = ½
    // only, to fit its own quartic; here it is the interpolant itself). As tabulated there,
    // b_i(1) misses b_i by up to 1e-12; the θ⁶ coefficients are adjusted by that much so that the
    // interpolant ends exactly on the step.
    dense: Some(&[
        &[
            1.0,
            -6.6910181737837595,
            19.999006933368396,
            -30.061056828966645,
            22.139650499809406,
            -6.344834939285869,
        ],
        &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        &[
            0.0,
            -7.6142658045872675,
            52.227353279294555,
            -121.49996277313346,
            116.44221495503422,
            -39.61079198521928,
        ],
        &[
            0.0,
            10.728139263042886,
            -46.89191641810936,
            83.17210046398478,
            -67.14513188259572,
            20.376121380878605,
        ],
        &[
            0.0,
            0.5526637063753649,
            -0.18908932250105956,
            9.572450755599366,
            -16.56722435274965,
            7.334709882679424,
        ],
        &[
            0.0,
            4.218656262566515,
            -35.70759759462221,
            87.84060576772056,
            -89.9916014847245,
            32.880177435245166,
        ],
        &[
            0.0,
            -0.6627209125361597,
            6.273644808324035,
            -17.415210777076297,
            22.623748964853284,
            -10.158899052642576,
        ],
        &[
            0.0,
            -1.2636789001135462,
            10.316088127245076,
            -28.590328951479098,
            32.23623401673554,
            -12.540126809877844,
        ],
        &[
            0.0,
            5.410603789859042,
            -34.76507698666118,
            81.66309505843414,
            -82.10203154883598,
            29.55530014845112,
        ],
        &[
            0.0,
            -7.032137906794574,
            47.745797107822554,
            -114.93752913770093,
            116.26621857911195,
            -41.792348642438995,
        ],
        &[
            0.0,
            2.3537586759714983,
            -19.008209934160803,
            50.255836422617605,
            -53.90207774663854,
            20.300692582210242,
        ],
    ]),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tableau_is_consistent() {
        for t in ButcherTableau::all() {
            assert_eq!(t.check_shape(), Ok(()), "{}", t.name);
            let s = t.stages();
            assert_eq!(t.c.len(), s, "{}: c has {} entries for {s} stages", t.name, t.c.len());
            assert_eq!(t.a.len(), s - 1, "{}: a has {} rows", t.name, t.a.len());
            assert_eq!(t.c[0], 0.0, "{}: explicit methods start at c = 0", t.name);
            for (i, row) in t.a.iter().enumerate() {
                assert_eq!(row.len(), i + 1, "{}: row {} of a", t.name, i + 1);
                let sum: f64 = row.iter().sum();
                assert!(
                    (sum - t.c[i + 1]).abs() < 1e-14,
                    "{}: row {} sums to {sum}, c = {}",
                    t.name,
                    i + 1,
                    t.c[i + 1]
                );
            }
            let sb: f64 = t.b.iter().sum();
            assert!((sb - 1.0).abs() < 1e-14, "{}: Σb = {sb}", t.name);
            if let Some(e) = t.b_err {
                assert_eq!(e.len(), s);
                let se: f64 = e.iter().sum();
                assert!(se.abs() < 1e-14, "{}: Σb_err = {se}", t.name);
            }
        }
        let fsal: Vec<_> = ButcherTableau::all()
            .iter()
            .filter(|t| t.is_fsal())
            .map(|t| t.name)
            .collect();
        assert_eq!(fsal, ["bosh3", "dopri5", "tsit5", "dopri8"]);
    }

    #[test]
    fn solutions_have_their_order() {
        // Σ_i b_i c_i^(q−1) = 1/q for q up to the order, and the same for the embedded weights
        // b − b_err up to the embedded order (the quadrature conditions; the engine's convergence
        // test measures the orders themselves).
        for t in ButcherTableau::all() {
            let embedded = t
                .b_err
                .map(|e| t.b.iter().zip(e).map(|(b, e)| b - e).collect::<Vec<_>>());
            for q in 1..=t.order as i32 {
                let sum: f64 = t.b.iter().zip(t.c).map(|(b, c)| b * c.powi(q - 1)).sum();
                let want = 1.0 / f64::from(q);
                assert!((sum - want).abs() < 1e-14, "{} q = {q}: {sum} vs {want}", t.name);
                if let Some(w) = embedded.as_ref().filter(|_| q <= t.embedded_order as i32) {
                    let sum: f64 = w.iter().zip(t.c).map(|(b, c)| b * c.powi(q - 1)).sum();
                    assert!((sum - want).abs() < 1e-14, "{} embedded q = {q}: {sum}", t.name);
                }
            }
        }
    }

    #[test]
    fn dense_outputs_end_on_the_step_and_have_their_order() {
        // Σ_i b_i(θ) c_i^(q−1) = θ^q / q for q up to the interpolant's order (the quadrature
        // conditions; the nonlinear ones are checked by the convergence test of the engine).
        let orders = [
            ("euler", 1),
            ("midpoint", 2),
            ("heun", 2),
            ("rk4", 3),
            ("bosh3", 3),
            ("dopri5", 4),
            ("tsit5", 4),
            ("dopri8", 5),
        ];
        for t in ButcherTableau::all() {
            let rows = t.dense.unwrap_or_else(|| panic!("{} has a dense output", t.name));
            assert_eq!(rows.len(), t.stages(), "{}: one dense row per stage", t.name);
            let w = t.dense_weights(1.0).unwrap();
            for (i, (w, b)) in w.iter().zip(t.b).enumerate() {
                assert!((w - b).abs() < 1e-13, "{}: b_{i}(1) = {w}, b_{i} = {b}", t.name);
            }
            let order = orders.iter().find(|(n, _)| *n == t.name).unwrap().1;
            for theta in [0.0, 0.3, 0.71, 1.0] {
                let w = t.dense_weights(theta).unwrap();
                let slope = t.dense_weight_slopes(theta).unwrap();
                for q in 1..=order {
                    let sum: f64 = w.iter().zip(t.c).map(|(w, c)| w * c.powi(q - 1)).sum();
                    let want = theta.powi(q) / f64::from(q);
                    assert!(
                        (sum - want).abs() < 1e-13,
                        "{} q = {q}, θ = {theta}: {sum} vs {want}",
                        t.name
                    );
                    let d: f64 = slope.iter().zip(t.c).map(|(w, c)| w * c.powi(q - 1)).sum();
                    assert!(
                        (d - theta.powi(q - 1)).abs() < 1e-12,
                        "{} slope q = {q}, θ = {theta}",
                        t.name
                    );
                }
            }
        }
    }

    #[test]
    fn lookup_by_name_round_trips() {
        for t in ButcherTableau::all() {
            assert_eq!(ButcherTableau::by_name(t.name), Some(t));
        }
        assert_eq!(ButcherTableau::by_name("rk45"), None);
    }
}
