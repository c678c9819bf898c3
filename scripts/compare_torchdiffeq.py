#!/usr/bin/env python3
"""Times P1 and P2 of DESIGN.md §6 in torchdiffeq on this machine, printing JSON lines shaped like
`cargo run --release --example bench_ode`, so both can be compared in one run:

    /tmp/fxenv/bin/pip install torch torchdiffeq
    /tmp/fxenv/bin/python scripts/compare_torchdiffeq.py
"""

import json
import time

import torch
from torchdiffeq import odeint, odeint_adjoint

torch.manual_seed(0)


class Mlp(torch.nn.Module):
    def __init__(self, widths, cube=False):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.cube = cube

    def forward(self, t, z):
        x = z ** 3 if self.cube else z
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def bench(name, widths, cube, batch, times, method, options, adjoint, reps):
    f = Mlp(widths, cube)
    z0 = torch.randn(batch, widths[0], requires_grad=True)
    t = torch.tensor(times)
    solve = odeint_adjoint if adjoint else odeint
    kwargs = dict(method=method, options=options) if method == "rk4" else dict(method=method, rtol=1e-6, atol=1e-6)
    if adjoint and method != "rk4":
        kwargs.update(adjoint_rtol=1e-6, adjoint_atol=1e-6)

    def once():
        start = time.perf_counter()
        z = solve(f, z0, t, **kwargs)
        loss = z[1:].pow(2).mean() if len(times) > 2 else z[-1].pow(2).mean()
        loss.backward()
        return time.perf_counter() - start

    once()
    samples = sorted(once() for _ in range(reps))
    print(json.dumps({"problem": name, "library": "torchdiffeq", "method": method,
                      "gradient": "backsolve" if adjoint else "backprop", "median_s": samples[len(samples) // 2],
                      "threads": torch.get_num_threads()}))


p1_times = [2.5 * k for k in range(11)]
for adjoint in (False, True):
    bench("p1", [2, 50, 2], True, 16, p1_times, "rk4", dict(step_size=0.25), adjoint, 20)
    bench("p2", [64, 256, 256, 64], False, 256, [0.0, 1.0], "rk4", dict(step_size=0.01), adjoint, 5)
    bench("p2", [64, 256, 256, 64], False, 256, [0.0, 1.0], "dopri5", {}, adjoint, 5)
