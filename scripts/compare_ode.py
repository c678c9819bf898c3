#!/usr/bin/env python3
"""P1 and P2 of DESIGN.md §6 in adjoint-dpm, torchdiffeq and diffrax, side by side in one run.

Each library solves the same problems with the same solver settings and computes forward +
gradient (w.r.t. the initial state and every weight) of the same loss: the mean square of every
output state after the first. Gradient modes: "backprop" (autodiff through the solver: our
Backprop, torchdiffeq's `odeint`), "checkpointed" (the exact discrete adjoint: our
Checkpointed(All), diffrax's default `RecursiveCheckpointAdjoint`) and "backsolve" (the continuous
adjoint: our Backsolve, torchdiffeq's `odeint_adjoint`, diffrax's `BacksolveAdjoint`). diffrax has
no classical RK4, so it gets one from its Butcher-tableau base class. A library that is not
installed is skipped. One JSON line per measurement, then a table:

    /tmp/fxenv/bin/pip install torch torchdiffeq jax diffrax equinox
    cargo build --release --example bench_ode
    /tmp/fxenv/bin/python scripts/compare_ode.py [--quick] [--only=P2 ...] [--one-thread]

`--one-thread` pins torch (`torch.set_num_threads(1)`), XLA (no Eigen thread pool) and
adjoint-dpm (`ADJOINT_DPM_THREADS=1`: no helper threads in the vendored burn-flex) to one
thread: a per-core comparison.
"""

import json
import os
import subprocess
import sys
import time

QUICK = "--quick" in sys.argv
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (widths, cube, batch, output times, solver, fixed step)
PROBLEMS = {
    "P1 RK4-100": ([2, 50, 2], True, 16, [2.5 * k for k in range(11)], "rk4", 0.25),
    "P2 RK4-100": ([64, 256, 256, 64], False, 256, [0.0, 1.0], "rk4", 0.01),
    "P2 Dopri5": ([64, 256, 256, 64], False, 256, [0.0, 1.0], "dopri5", None),
    # P1's field with 1001 output times: dense output against stepping to each time.
    "P1 Dopri5 x1001": ([2, 50, 2], True, 16, [0.025 * k for k in range(1001)], "dopri5", None),
}
ONLY = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
if ONLY:
    PROBLEMS = {k: v for k, v in PROBLEMS.items() if any(o in k for o in ONLY)}
TOL = 1e-6
ONE_THREAD = "--one-thread" in sys.argv
if ONE_THREAD:
    # Read by XLA when jax initialises its CPU backend, so before the first jax import.
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["ADJOINT_DPM_THREADS"] = "1"


def reps_for(problem):
    base = 20 if problem.startswith("P1") else 5
    return 3 if QUICK else base


def median(samples):
    samples = sorted(samples)
    return samples[len(samples) // 2]


def ours(problem, mode):
    widths, cube, batch, times, solver, _ = PROBLEMS[problem]
    exe = os.path.join(ROOT, "target", "release", "examples", "bench_ode")
    args = [exe, "--widths", ",".join(map(str, widths)), "--batch", str(batch), "--t1", str(times[-1]),
            "--outputs", str(len(times)), "--solver", solver, "--steps", "100", "--rtol", str(TOL),
            "--atol", str(TOL), "--gradient", mode, "--reps", str(reps_for(problem))]
    if cube:
        args.append("--cube")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_s"]


def torchdiffeq_bench(problem, mode):
    if mode == "checkpointed":
        return None
    import torch
    from torchdiffeq import odeint, odeint_adjoint

    torch.manual_seed(0)
    if ONE_THREAD:
        torch.set_num_threads(1)
    widths, cube, batch, times, solver, step = PROBLEMS[problem]

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

        def forward(self, t, z):
            x = z ** 3 if cube else z
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i + 1 < len(self.layers):
                    x = torch.tanh(x)
            return x

    f = Mlp()
    z0 = torch.randn(batch, widths[0], requires_grad=True)
    t = torch.tensor(times)
    solve = odeint_adjoint if mode == "backsolve" else odeint
    if solver == "rk4":
        kwargs = dict(method="rk4", options=dict(step_size=step))
    else:
        kwargs = dict(method=solver, rtol=TOL, atol=TOL)
        if mode == "backsolve":
            kwargs.update(adjoint_rtol=TOL, adjoint_atol=TOL)

    def once():
        start = time.perf_counter()
        z = solve(f, z0, t, **kwargs)
        z[1:].pow(2).mean().backward()
        return time.perf_counter() - start

    once()
    return median([once() for _ in range(reps_for(problem))])


def diffrax_bench(problem, mode):
    if mode == "backprop":
        return None
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    class Rk4(diffrax.AbstractERK):
        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    widths, cube, batch, times, solver, step = PROBLEMS[problem]
    key_mlp, key_z = jax.random.split(jax.random.PRNGKey(0))
    mlp = eqx.nn.MLP(widths[0], widths[-1], widths[1], len(widths) - 2, activation=jnp.tanh, key=key_mlp)
    z0 = jax.random.normal(key_z, (batch, widths[0]))
    ts = jnp.array(times)

    def field(t, z, mlp):
        x = z ** 3 if cube else z
        return jax.vmap(mlp)(x)

    if solver == "rk4":
        kwargs = dict(solver=Rk4(), dt0=step, stepsize_controller=diffrax.ConstantStepSize())
    else:
        kwargs = dict(solver=diffrax.Dopri5(), dt0=None,
                      stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL))
    adjoint = diffrax.BacksolveAdjoint() if mode == "backsolve" else diffrax.RecursiveCheckpointAdjoint()

    def loss(z0, mlp):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(field), t0=times[0], t1=times[-1], y0=z0, args=mlp,
                                  saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint, max_steps=100_000, **kwargs)
        return jnp.mean(sol.ys[1:] ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(lambda inputs: loss(*inputs)))

    def once():
        start = time.perf_counter()
        jax.block_until_ready(grad((z0, mlp)))
        return time.perf_counter() - start

    once()  # compilation
    return median([once() for _ in range(reps_for(problem))])


LIBRARIES = {"adjoint-dpm": ours, "torchdiffeq": torchdiffeq_bench, "diffrax": diffrax_bench}
MODES = ["backprop", "checkpointed", "backsolve"]

results = {}
for problem in PROBLEMS:
    for library, bench in LIBRARIES.items():
        for mode in MODES:
            try:
                seconds = bench(problem, mode)
            except ImportError as e:
                print(f"skipping {library}: {e}", file=sys.stderr)
                continue
            if seconds is None:
                continue
            results[(problem, library, mode)] = seconds
            print(json.dumps({"problem": problem, "library": library, "gradient": mode, "median_s": seconds}),
                  flush=True)

print("\n| problem | library | " + " | ".join(MODES) + " |")
print("|---|---|" + "---|" * len(MODES))
for problem in PROBLEMS:
    for library in LIBRARIES:
        cells = [results.get((problem, library, m)) for m in MODES]
        if any(c is not None for c in cells):
            text = ["—" if c is None else (f"{c * 1e3:.1f} ms" if c < 1 else f"{c:.2f} s") for c in cells]
            print(f"| {problem} | {library} | " + " | ".join(text) + " |")
