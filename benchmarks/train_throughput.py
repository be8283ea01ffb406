"""Tokens/s of the sparse training step vs the dense step on the same GPT, and model FLOP/s.

Sparse: gradual global magnitude pruning in the 25%->75%-of-compute window, masks recomputed
every 100 steps (the mask update's cost is amortized over the steps it covers). Dense: the same
optimizer without ``sparsify``. Rounds alternate between the two (same process, same data), so
the ratio is measured side by side. Also measures this machine's dense f32 matmul FLOP/s and
the model FLOP/s both steps achieve (6·N-style accounting, docs/design.md "Accounting":
3x forward FLOPs).

With ``--bsr-block B`` it also times the same model on the block-sparse kernel layers
(``pallas_kernels.layers.BSRLinear``, static random block mask of ``--bsr-density``; its
model FLOP/s column counts dense-equivalent FLOPs).

    python benchmarks/train_throughput.py [--size tiny] [--rounds 8] [--steps 25]
        [--bsr-block 32 --bsr-density 0.1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax import SparsifyState, methods, schedules, sparsify
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.run import accounting, data, hardware
from sparsejax.run.step import TrainState, make_train_step


def build_step(cfg: GPTConfig, tx, batch: int, seq: int, linear=None):
    model = GPT(cfg, rngs=nnx.Rngs(0)) if linear is None else GPT(cfg, rngs=nnx.Rngs(0),
                                                                  linear=linear)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params_state)
    params = nnx.to_pure_dict(params_state)
    opt_state = tx.init(params)
    sparse = isinstance(opt_state, tuple) and any(
        isinstance(x, SparsifyState) for x in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, SparsifyState)))
    f0 = accounting.train_flops_per_token(cfg.n_layer, cfg.d_model, cfg.d_ff, seq,
                                          cfg.vocab_size)
    half = accounting.train_flops_per_token(cfg.n_layer, cfg.d_model, cfg.d_ff, seq,
                                            cfg.vocab_size, sparsity=0.5)
    step = make_train_step(graphdef, params_def, rest, tx,
                           fixed_flops=2 * half - f0, dense_flops=2 * (f0 - half),
                           tokens_per_step=float(batch * seq), sparse=sparse,
                           structural=accounting.structural_stats(model, params))
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state,
                       jax.random.PRNGKey(0), jnp.zeros((), jnp.float32),
                       jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                       jnp.zeros((), jnp.int32))
    return step, state, f0




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="steps per config per round")
    p.add_argument("--bsr-block", type=int, default=0,
                   help="also time the model on BSR kernel layers (static random block mask "
                        "of density --bsr-density, blocks of this size); 0: skip")
    p.add_argument("--bsr-density", type=float, default=0.1)
    args = p.parse_args()

    cfg = GPTConfig.from_variant(args.size, n_ctx=args.seq)
    total = args.rounds * args.steps + 1
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    sched = schedules.window(total, 0.5, update_every=100)
    sparse_tx = sparsify(inner, methods.gradual(sched, allocation="global"))
    configs = {"dense": build_step(cfg, inner, args.batch, args.seq),
               "sparse (gradual, every 100)": build_step(cfg, sparse_tx, args.batch, args.seq)}
    if args.bsr_block:
        from pallas_kernels.layers import bsr_linear_factory

        factory = bsr_linear_factory((args.bsr_block,) * 2, args.bsr_density)
        configs[f"bsr kernels (density {args.bsr_density:g})"] = build_step(
            cfg, inner, args.batch, args.seq, linear=factory)
    corpus = data.load_corpus(None)
    batches = [data.get_batch(corpus.train, seed=0, step=i, batch_size=args.batch,
                              seq_len=args.seq) for i in range(args.steps)]
    states = {}
    for name, (step, state, _) in configs.items():  # compile + warm up one step
        state, _ = step(state, *batches[0])
        jax.block_until_ready(state.params)
        states[name] = state
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            step, state = configs[name][0], states[name]
            t = time.perf_counter()
            for b in batches:
                state, _ = step(state, *b)
            jax.block_until_ready(state.params)
            times[name].append((time.perf_counter() - t) / args.steps)
            states[name] = state
    peak = hardware.device_peak(jax.devices()[0])
    tokens = args.batch * args.seq
    base_total = sum(times["dense"])
    print(f"\nGPT {args.size} {cfg.n_layer}x{cfg.d_model} ff {cfg.d_ff}, batch {args.batch}x"
          f"{args.seq}, {args.rounds} interleaved rounds x {args.steps} steps; "
          f"sparse ended at sparsity {float(sched(total - 1)):.2f} "
          f"({int(states['sparse (gradual, every 100)'].step)} steps)")
    print(f"{'step':<30}{'median ms':>10}{'tokens/s':>11}{'ratio':>8}{'model GFLOP/s':>15}"
          f"{'MFU':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        flops = configs[name][2] * tokens / med
        ratio = sum(ts) / base_total
        print(f"{name:<30}{med * 1e3:>10.2f}{tokens / med:>11.0f}{ratio:>8.3f}"
              f"{flops / 1e9:>15.2f}" + (f"{flops / peak.flops_per_s:>8.1%}" if peak else
                                         f"{'n/a':>8}"))
    print("MFU: model FLOPs/s over " + (f"{peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.source})"
                                        if peak else "an unknown peak (device not in the table)"))
    print("ratio = total sparse time / total dense time over the same rounds; target <= 1.05")


if __name__ == "__main__":
    main()
