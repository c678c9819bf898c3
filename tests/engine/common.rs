//! Shared problems and helpers: the P1 spiral of DESIGN.md §6, random MLP dynamics, central
//! finite differences.

use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::TensorData;

/// The f64 CPU backend of the gradient checks.
pub type F64 = NdArray<f64>;
/// Its autodiff wrapper.
pub type Ad = Autodiff<F64>;

/// The activation of a random MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Tanh,
    Softplus,
    Sin,
}

/// dz/dt = MLP(z) (+ time features), used by the property tests.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub layers: Vec<Linear<B>>,
    /// Weight of t in the first layer's input (a time-dependent field when non-zero).
    pub time_weight: Param<Tensor<B, 1>>,
    pub act: u8,
    /// Cube the input first (P1's dynamics).
    pub cube: bool,
}

/// Held while a test seeds the backends' random generators and draws from them: the generators
/// are process-wide, and `cargo test` runs tests on parallel threads, which could otherwise draw
/// between another test's seed and its draws (and change its weights).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    static HOLDS_RNG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` holding [`RNG`] (re-entrant on one thread), after seeding NdArray's and flex's
/// generators with `seed` if one is given.
pub fn with_rng<T>(seed: Option<u64>, f: impl FnOnce() -> T) -> T {
    let seed_all = |seed: Option<u64>| {
        if let Some(seed) = seed {
            F64::seed(&Default::default(), seed);
            burn::backend::Flex::seed(&Default::default(), seed);
        }
    };
    if HOLDS_RNG.get() {
        seed_all(seed);
        return f();
    }
    let _lock = RNG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            HOLDS_RNG.set(false);
        }
    }
    HOLDS_RNG.set(true);
    let _release = Release;
    seed_all(seed);
    f()
}

impl<B: Backend> Mlp<B> {
    /// [`Mlp::new`] with the random generators seeded first: the same weights in every run.
    pub fn seeded(seed: u64, widths: &[usize], act: Act, time_dependent: bool, device: &B::Device) -> Self {
        with_rng(Some(seed), || Self::new(widths, act, time_dependent, device))
    }

    /// Widths `[dim, h1, …, dim]`.
    pub fn new(widths: &[usize], act: Act, time_dependent: bool, device: &B::Device) -> Self {
        let layers = with_rng(None, || {
            widths
                .windows(2)
                .map(|w| LinearConfig::new(w[0], w[1]).init(device))
                .collect()
        });
        let tw = if time_dependent { 0.5 } else { 0.0 };
        let act = match act {
            Act::Tanh => 0,
            Act::Softplus => 1,
            Act::Sin => 2,
        };
        let model = Self {
            layers,
            time_weight: Param::from_tensor(Tensor::from_floats([tw], device)),
            act,
            cube: false,
        };
        // Every clone of the model must be the same model.
        adjoint_dpm::ode::materialized(model)
    }

    fn activate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.act {
            0 => x.tanh(),
            1 => burn::tensor::activation::softplus(x, 1.0),
            _ => x.sin(),
        }
    }
}

impl<B: Backend> Dynamics<B, 2> for Mlp<B> {
    fn f(&self, t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut x = if self.cube { z.clone().powi_scalar(3) } else { z };
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i == 0 {
                x = x + (t.clone() * self.time_weight.val()).sin().unsqueeze::<2>();
            }
            if i + 1 < n {
                x = self.activate(x);
            }
        }
        x
    }
}

/// The P1 spiral problem with the reference numbers.
pub struct P1 {
    pub w0: Vec<f64>,
    pub b0: Vec<f64>,
    pub w1: Vec<f64>,
    pub b1: Vec<f64>,
    pub z0: Vec<f64>,
    pub ts: Vec<f64>,
    pub target: Vec<f64>,
    pub rk4_loss: f64,
    pub rk4_gp: Vec<f64>,
    pub rk4_gz: Vec<f64>,
    pub exact_loss: f64,
    pub exact_gp: Vec<f64>,
    pub exact_gz: Vec<f64>,
}

fn read(st: &safetensors::SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    t.data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

impl P1 {
    pub fn load() -> Self {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/p1_spiral.safetensors"
        ))
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        Self {
            w0: read(&st, "W0"),
            b0: read(&st, "b0"),
            w1: read(&st, "W1"),
            b1: read(&st, "b1"),
            z0: read(&st, "z0"),
            ts: read(&st, "ts"),
            target: read(&st, "target"),
            rk4_loss: read(&st, "rk4_100_loss")[0],
            rk4_gp: read(&st, "rk4_100_gp"),
            rk4_gz: read(&st, "rk4_100_gz"),
            exact_loss: read(&st, "exact_loss")[0],
            exact_gp: read(&st, "exact_gp"),
            exact_gz: read(&st, "exact_gz"),
        }
    }

    /// The MLP with the reference weights (PyTorch `[out, in]` layout transposed to burn's).
    pub fn model<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        let lin = |w: &[f64], b: &[f64], out: usize, inp: usize| {
            let w = Tensor::<B, 2>::from_data(TensorData::new(w.to_vec(), [out, inp]), device).transpose();
            let mut l = with_rng(None, || LinearConfig::new(inp, out).init(device));
            l.weight = Param::from_tensor(w);
            l.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(b.to_vec(), [out]),
                device,
            )));
            l
        };
        let mut m = Mlp::new(&[2, 50, 2], Act::Tanh, false, device);
        m.layers = vec![lin(&self.w0, &self.b0, 50, 2), lin(&self.w1, &self.b1, 2, 50)];
        m.time_weight = Param::from_tensor(Tensor::zeros([1], device)).set_require_grad(false);
        m.cube = true;
        m
    }

    pub fn z0<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(self.z0.clone(), [16, 2]), device)
    }

    /// mean |z(t_k) − target_k| over k = 1..10.
    pub fn loss<B: Backend>(&self, sol: &Solution<B, 2>, device: &B::Device) -> Tensor<B, 1> {
        let target = Tensor::<B, 2>::from_data(TensorData::new(self.target.clone(), [160, 2]), device);
        let states = Tensor::cat((1..11).map(|k| sol.state(k)).collect(), 0);
        (states - target).abs().mean()
    }

    /// Parameter gradient in the reference order (W0, b0, W1, b1; PyTorch layout).
    pub fn flat_param_grad<B: burn::tensor::backend::AutodiffBackend>(
        model: &Mlp<B>,
        grads: &B::Gradients,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for layer in &model.layers {
            out.extend(to_vec(layer.weight.grad(grads).unwrap().transpose()));
            out.extend(to_vec(layer.bias.as_ref().unwrap().grad(grads).unwrap()));
        }
        out
    }
}

/// A tensor's values.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec().unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// Gradients of one differentiated solve, flattened.
#[derive(Debug, Clone)]
pub struct GradSet {
    pub loss: f64,
    pub z0: Vec<f64>,
    pub theta: Vec<f64>,
    pub times: Vec<f64>,
}

/// A fixed nonlinear loss of every state: Σ w ⊙ z + 0.1 Σ z².
pub fn test_loss<B: Backend>(sol: &Solution<B, 2>) -> Tensor<B, 1> {
    let ys = sol.stacked();
    let n = ys.shape().num_elements();
    let w: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0).collect();
    let w = Tensor::<B, 1>::from_data(TensorData::new(w, [n]), &ys.device()).reshape(ys.dims());
    (ys.clone() * w).sum() + ys.powi_scalar(2).sum().mul_scalar(0.1)
}

/// Every float parameter's gradient, flattened in visiting order (zeros for frozen ones).
pub fn param_grads(model: &Mlp<Ad>, grads: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients) -> Vec<f64> {
    let mut out = Vec::new();
    for layer in &model.layers {
        let w = layer.weight.val();
        out.extend(
            w.grad(grads)
                .map(to_vec)
                .unwrap_or_else(|| vec![0.0; w.shape().num_elements()]),
        );
        let b = layer.bias.as_ref().unwrap().val();
        out.extend(
            b.grad(grads)
                .map(to_vec)
                .unwrap_or_else(|| vec![0.0; b.shape().num_elements()]),
        );
    }
    out.extend(
        model
            .time_weight
            .val()
            .grad(grads)
            .map(to_vec)
            .unwrap_or_else(|| vec![0.0]),
    );
    out
}

/// Solves with `mode` and differentiates [`test_loss`] w.r.t. z0, θ and the times.
pub fn grads_of(model: &Mlp<Ad>, solver: Solver, mode: GradientMode, z0: &[f64], dim: usize, times: &[f64]) -> GradSet {
    let device = Default::default();
    let ode = NeuralOde::new(model.clone()).solver(solver).gradient(mode);
    let batch = z0.len() / dim;
    let z0 = Tensor::<Ad, 2>::from_data(TensorData::new(z0.to_vec(), [batch, dim]), &device).require_grad();
    let t = Tensor::<Ad, 1>::from_data(TensorData::new(times.to_vec(), [times.len()]), &device).require_grad();
    let sol = ode.solve_with_times(z0.clone(), t.clone()).unwrap();
    let loss = test_loss(&sol);
    let value = to_vec(loss.clone())[0];
    let grads = loss.backward();
    assert_eq!(sol.backward_error(), None);
    GradSet {
        loss: value,
        z0: to_vec(z0.grad(&grads).unwrap()),
        theta: param_grads(&ode.dynamics, &grads),
        times: t.grad(&grads).map(to_vec).unwrap_or_else(|| vec![0.0; times.len()]),
    }
}

/// The loss of a plain solve (no graph) on the f64 backend.
pub fn loss_of(model: &Mlp<F64>, solver: Solver, z0: &[f64], dim: usize, times: &[f64]) -> f64 {
    let device = Default::default();
    let ode = NeuralOde::new(model.clone()).solver(solver);
    let z0 = Tensor::<F64, 2>::from_data(TensorData::new(z0.to_vec(), [z0.len() / dim, dim]), &device);
    to_vec(test_loss(&ode.integrate(z0, times).unwrap()))[0]
}

/// The model with one float parameter (visiting order, flattened index) moved by `eps`.
pub fn perturbed(model: &Mlp<F64>, index: usize, eps: f64) -> Mlp<F64> {
    use burn::module::ModuleMapper;
    struct Nudge {
        index: usize,
        seen: usize,
        eps: f64,
    }
    impl ModuleMapper<F64> for Nudge {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<F64, D>>) -> Param<Tensor<F64, D>> {
            let n = param.val().shape().num_elements();
            let (start, index, eps) = (self.seen, self.index, self.eps);
            self.seen += n;
            if (start..start + n).contains(&index) {
                param.map(|t| {
                    let shape = t.dims();
                    let mut v = to_vec(t.clone());
                    v[index - start] += eps;
                    Tensor::from_data(TensorData::new(v, shape), &t.device())
                })
            } else {
                param
            }
        }
    }
    model.clone().map(&mut Nudge { index, seen: 0, eps })
}

/// Checks `g` (gradients of [`test_loss`]) against central differences (step 1e-6, tolerance
/// 1e-6 relative to max(|g|, 1)) of the plain solve: every entry of z0, three parameters (first,
/// middle, last) and the output times `time_indices`. The first mismatch, named, as an error.
pub fn check_central_differences(
    model: &Mlp<Ad>,
    solver: Solver,
    g: &GradSet,
    z0: &[f64],
    dim: usize,
    times: &[f64],
    time_indices: &[usize],
) -> Result<(), String> {
    use burn::module::AutodiffModule;
    let inner = model.valid();
    let eps = 1e-6;
    let central = |f: &dyn Fn(f64) -> f64| (f(eps) - f(-eps)) / (2.0 * eps);
    let check = |what: String, fd: f64, ad: f64| {
        if (fd - ad).abs() <= 1e-6 * ad.abs().max(1.0) {
            Ok(())
        } else {
            Err(format!("{what}: FD {fd} vs {ad}"))
        }
    };
    for i in 0..z0.len() {
        let fd = central(&|e| {
            let mut z = z0.to_vec();
            z[i] += e;
            loss_of(&inner, solver, &z, dim, times)
        });
        check(format!("dL/dz0[{i}]"), fd, g.z0[i])?;
    }
    for i in [0, g.theta.len() / 2, g.theta.len() - 1] {
        let fd = central(&|e| loss_of(&perturbed(&inner, i, e), solver, z0, dim, times));
        check(format!("dL/dθ[{i}]"), fd, g.theta[i])?;
    }
    for &k in time_indices {
        let fd = central(&|e| {
            let mut t = times.to_vec();
            t[k] += e;
            loss_of(&inner, solver, z0, dim, &t)
        });
        check(format!("dL/dT[{k}]"), fd, g.times[k])?;
    }
    Ok(())
}

/// The largest relative error of Backsolve's gradients (z0, θ, T) from `exact`, at each of
/// `tolerances` (forward solver `solver(tol)`, reverse solve at the same tolerance, seminorm).
pub fn backsolve_errors(
    model: &Mlp<Ad>,
    solver: impl Fn(f64) -> Solver,
    z0: &[f64],
    times: &[f64],
    tolerances: &[f64],
    exact: &GradSet,
) -> Vec<f64> {
    tolerances
        .iter()
        .map(|&tol| {
            let options = BacksolveOptions {
                rtol: tol,
                atol: tol,
                seminorm: true,
            };
            let g = grads_of(model, solver(tol), GradientMode::Backsolve(options), z0, 2, times);
            rel_err(&g.theta, &exact.theta)
                .max(rel_err(&g.z0, &exact.z0))
                .max(rel_err(&g.times, &exact.times))
        })
        .collect()
}

/// `PROPTEST_CASES` when set, else `default`: an explicit `cases` overrides proptest's own
/// reading of that variable.
pub fn cases_from_env(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
