#!/usr/bin/env python3
"""Dense-output reference values from diffrax, for tests/engine/dense.rs.

One step of size h of dz/dt = z² from z0 (elementwise, nonlinear), with the states at 0.3h and
0.7h read off each solver's interpolant, in f64. Writes tests/fixtures/dense_diffrax.json.

    /tmp/fxenv/bin/pip install jax diffrax
    /tmp/fxenv/bin/python scripts/dense_reference.py
"""

import json
import os

import jax

jax.config.update("jax_enable_x64", True)
import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

H = 0.4
Z0 = [0.5, -0.3]
THETAS = [0.3, 0.7]


def one_step(solver):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: y**2),
        solver,
        t0=0.0,
        t1=H,
        dt0=H,
        y0=jnp.array(Z0),
        saveat=diffrax.SaveAt(ts=[theta * H for theta in THETAS] + [H]),
        stepsize_controller=diffrax.ConstantStepSize(),
    )
    return [[float(v) for v in row] for row in sol.ys]


out = {
    "h": H,
    "z0": Z0,
    "thetas": THETAS,
    "diffrax": diffrax.__version__,
    "states": {name: one_step(solver) for name, solver in
               [("tsit5", diffrax.Tsit5()), ("bosh3", diffrax.Bosh3()), ("dopri5", diffrax.Dopri5()),
                ("dopri8", diffrax.Dopri8())]},
}
path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                    "dense_diffrax.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps(out))
