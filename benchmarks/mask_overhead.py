"""Step-time overhead of sparsejax mask transforms against plain Optax (issue 2).

MLP 784-1024-1024-10 (ReLU, softmax cross-entropy on random data), batch 256, ``optax.adam``.
One jitted train step per configuration (params and optimizer state donated):

* ``plain optax``: ``optax.adam(1e-3)``, the baseline;
* ``fixed masks``: ``sparsify(adam, methods.static(0.9))`` (random ERK masks chosen at init);
* ``layer-wise top-k``: ``methods.gradual(constant(0.9, update_every=1), allocation="uniform")``,
  an exact magnitude top-k per layer at every step;
* ``global top-k``: the same with ``allocation="global"`` (one threshold over all kernels);
* ``2:4``: ``methods.nm(2, 4)``, N:M masks recomputed at every step.

Timing is interleaved: for ``--rounds`` rounds, every configuration runs ``--steps`` steps in
turn (round-robin, the order reversed every other round), so machine noise hits all of them
alike. The table reports the median
step time of each configuration and the median over rounds of its ratio to plain optax
measured in the same round.

    JAX_PLATFORMS=cpu python benchmarks/mask_overhead.py [--rounds 30] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import sparsejax
from sparsejax import methods, schedules

SIZES = (784, 1024, 1024, 10)
BATCH = 256


def init_mlp(key: jax.Array) -> dict:
    """He-initialized params: ``{"dense_i": {"kernel": (in, out), "bias": (out,)}}``."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        key, sub = jax.random.split(key)
        params[f"dense_{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "bias": jnp.zeros(n_out),
        }
    return params


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def configs() -> dict[str, tuple[optax.GradientTransformation, float | None]]:
    """name -> (optimizer, target ratio vs plain optax; None for the baseline)."""
    adam = optax.adam(1e-3)
    every_step = schedules.constant(0.9, update_every=1)
    return {
        "plain optax": (adam, None),
        "fixed masks": (sparsejax.sparsify(adam, methods.static(0.9)), 1.03),
        "layer-wise top-k": (
            sparsejax.sparsify(adam, methods.gradual(every_step, allocation="uniform")), 2.0
        ),
        "global top-k": (
            sparsejax.sparsify(adam, methods.gradual(every_step, allocation="global")), 2.0
        ),
        "2:4": (sparsejax.sparsify(adam, methods.nm(2, 4)), 1.5),
    }


def make_step(tx: optax.GradientTransformation) -> Callable:
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="round-robin rounds (default 30)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per config per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError("--rounds and --steps must be >= 1, --warmup >= 0")

    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])
    cfgs = configs()
    runs = {}
    for name, (tx, _) in cfgs.items():
        params = init_mlp(kp)
        state = tx.init(params)
        step = make_step(tx)
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, x, y))
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            params, state = step(params, state, x, y)
        jax.block_until_ready(params)
        runs[name] = [step, params, state]
        print(f"compiled {name:<18s} {compile_s:6.2f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in cfgs}
    order = list(runs)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate to cancel position bias
            run = runs[name]
            step, params, state = run
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params, state = step(params, state, x, y)
            jax.block_until_ready(params)
            times[name].append((time.perf_counter() - t0) / args.steps)
            run[1], run[2] = params, state

    base = times["plain optax"]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n{args.rounds} rounds x {args.steps} steps, backend {jax.default_backend()}, "
          f"load average {load}")
    header = f"{'config':<18s} {'median ms':>10s} {'ratio':>7s} {'target':>8s}  result"
    print(header)
    print("-" * len(header))
    ratios = {}
    for name, (_, target) in cfgs.items():
        med = statistics.median(times[name]) * 1e3
        ratio = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
        ratios[name] = ratio
        tgt = "-" if target is None else f"<={target:.2f}x"
        ok = "" if target is None else ("PASS" if ratio <= target else "FAIL")
        print(f"{name:<18s} {med:10.2f} {ratio:6.2f}x {tgt:>8s}  {ok}")
    return ratios


if __name__ == "__main__":
    main()
