"""Step-time overhead of sparsejax mask transforms against plain Optax (issues 2 and 10).

Two models, each timed on its own: ``mlp``, an MLP 784-1024-1024-10 (ReLU, softmax
cross-entropy on random data, batch 256); ``cnn``, a Flax linen CNN on 32x32x3 images, batch 32
(Conv 32 -> BatchNorm -> relu -> Conv 64 stride 2 -> BatchNorm -> relu -> Conv 64 stride 2 ->
BatchNorm -> relu -> mean pool -> Dense 10; HWIO kernels, ``batch_stats`` updated with
``mutable``). ``optax.adam`` throughout; one jitted train step per configuration (params,
batch statistics and optimizer state donated):

* ``plain optax``: ``optax.adam(1e-3)``, the baseline;
* ``fixed masks``: ``sparsify(adam, methods.static(0.9))`` (random ERK masks chosen at init);
* ``layer-wise top-k``: ``methods.gradual(constant(0.9, update_every=1), allocation="uniform")``,
  an exact magnitude top-k per layer at every step;
* ``global top-k``: the same with ``allocation="global"`` (one threshold over all kernels);
* ``2:4``: ``methods.nm(2, 4)``, N:M masks recomputed at every step along each kernel's
  contraction axis (``Cin`` of the conv kernels; the CNN's first conv, ``Cin = 3``, stays dense
  through ``skip_indivisible=True``).

Timing is interleaved: for ``--rounds`` rounds, every configuration runs ``--steps`` steps in
turn (round-robin, the order reversed every other round), so machine noise hits all of them
alike. The table reports the median
step time of each configuration and the median over rounds of its ratio to plain optax
measured in the same round.

    JAX_PLATFORMS=cpu python benchmarks/mask_overhead.py [--model mlp|cnn|both] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import sparsejax
from sparsejax import methods, schedules

SIZES = (784, 1024, 1024, 10)
BATCH = 256
CNN_BATCH = 32


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


def mlp_loss(params: dict, extra: dict, x: jax.Array, y: jax.Array):
    """Softmax cross-entropy of the MLP; ``extra`` (no state) is passed through."""
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean(), extra


class CNN(nn.Module):
    """The linen CNN of the module docstring."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features, stride in ((32, 1), (64, 2), (64, 2)):
            x = nn.Conv(features, (3, 3), strides=stride, use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def cnn_loss(params: dict, batch_stats: dict, x: jax.Array, y: jax.Array):
    logits, new = CNN().apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]


def setup(model: str, key: jax.Array):
    """``(init() -> (params, extra), loss_fn, x, y)`` of the named model."""
    kx, ky, kp = jax.random.split(key, 3)
    if model == "mlp":
        x = jax.random.normal(kx, (BATCH, SIZES[0]))
        return (lambda: (init_mlp(kp), {})), mlp_loss, x, jax.random.randint(ky, (BATCH,), 0, 10)
    x = jax.random.normal(kx, (CNN_BATCH, 32, 32, 3))
    variables = jax.jit(lambda k: CNN().init(k, x, train=False))(kp)

    def init():
        copy = jax.tree.map(jnp.copy, variables)  # fresh buffers: steps donate them
        return copy["params"], copy["batch_stats"]

    return init, cnn_loss, x, jax.random.randint(ky, (CNN_BATCH,), 0, 10)


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
        "2:4": (sparsejax.sparsify(adam, methods.nm(2, 4, skip_indivisible=True)), 1.5),
    }


def make_step(tx: optax.GradientTransformation, loss_fn: Callable) -> Callable:
    def step(params, extra, opt_state, x, y):
        grads, extra = jax.grad(loss_fn, has_aux=True)(params, extra, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), extra, opt_state

    return jax.jit(step, donate_argnums=(0, 1, 2))


def run(model: str, args: argparse.Namespace) -> dict[str, float]:
    """Time every configuration on ``model``; print and return the ratios to plain optax."""
    init, loss_fn, x, y = setup(model, jax.random.PRNGKey(0))
    cfgs = configs()
    runs = {}
    for name, (tx, _) in cfgs.items():
        params, extra = init()
        with warnings.catch_warnings():  # the CNN's Cin=3 conv is skipped by 2:4, by design
            warnings.simplefilter("ignore", UserWarning)
            state = tx.init(params)
        step = make_step(tx, loss_fn)
        t0 = time.perf_counter()
        params, extra, state = jax.block_until_ready(step(params, extra, state, x, y))
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            params, extra, state = step(params, extra, state, x, y)
        jax.block_until_ready(params)
        runs[name] = [step, params, extra, state]
        print(f"compiled {model} {name:<18s} {compile_s:6.2f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in cfgs}
    order = list(runs)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:  # alternate to cancel position bias
            run = runs[name]
            step, params, extra, state = run
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params, extra, state = step(params, extra, state, x, y)
            jax.block_until_ready(params)
            times[name].append((time.perf_counter() - t0) / args.steps)
            run[1], run[2], run[3] = params, extra, state

    base = times["plain optax"]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n{model}: {args.rounds} rounds x {args.steps} steps, backend "
          f"{jax.default_backend()}, load average {load}")
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
    print(flush=True)
    return ratios


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mlp", "cnn", "both"), default="both",
                    help="which model to time (default both)")
    ap.add_argument("--rounds", type=int, default=30, help="round-robin rounds (default 30)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per config per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError("--rounds and --steps must be >= 1, --warmup >= 0")
    models = ("mlp", "cnn") if args.model == "both" else (args.model,)
    return {model: run(model, args) for model in models}


if __name__ == "__main__":
    main()
