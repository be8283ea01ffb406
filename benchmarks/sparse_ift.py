"""Sparse-IFT: iso-FLOP check per family, and step time of Sparse Wide on BSR kernels vs dense.

Thangarasa et al. 2023, "Sparse Iso-FLOP Transformations for Maximizing Training Efficiency".

1. FLOP table: for every family and ``s`` in ``--sparsities``, the forward FLOPs per token of
   the layer replacing an attention (``d x d``) and an MLP (``d x ff``) linear, over the dense
   layer's (``sparse_ift.layer_flops``, Wide at the model's rounded widths), and the whole
   model's (``accounting.model_forward_flops`` of the model ``model.sparse_ift`` builds; the
   LM head and attention scores grow under Wide).
2. Step time: the dense GPT vs Sparse Wide at ``--wide-s`` on BSR kernel layers
   (``model.linear=bsr``, static random block mask at block density ``1 - s``), and the same
   Wide model with masked dense layers (what a MaskMethod costs without kernels). Rounds
   alternate between configs in one process (same data); ratio = total time / dense total.

    python benchmarks/sparse_ift.py [--size tiny] [--block 32] [--rounds 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models import sparse_ift
from sparsejax.models.gpt import GPT
from sparsejax.run import accounting, build, configlib, data, experiment
from sparsejax.run.step import TrainState, flops_coefficients, make_train_step, sparse_state


def config(size: str, family: str, s: float, *, seq: int, batch: int, bsr_block: int = 0,
           method: str = "static"):
    c = configlib.base()
    configlib.apply_arg(c, f"model.n_ctx={seq},train.seq_len={seq},train.batch_size={batch}")
    configlib.set_key(c, "model.size", size)
    if family:
        configlib.apply_arg(c, f"model.sparse_ift.family={family},model.sparse_ift.sparsity={s},"
                               f"sparsity.method={method},sparsity.final={s},"
                               "sparsity.score=random,sparsity.allocation=uniform")
    if bsr_block:
        configlib.apply_arg(c, f"model.linear=bsr,model.block={bsr_block}")
    spec = configlib.validate(c)
    experiment.check(spec)  # the whole blueprint builds
    return spec


def flop_table(size: str, sparsities: list[float], seq: int) -> None:
    dense_cfg = build.model_config(config(size, "", 0.0, seq=seq, batch=1), 256)
    d, ff = dense_cfg.d_model, dense_cfg.d_ff
    dense_model = nnx.eval_shape(lambda: GPT(dense_cfg, rngs=nnx.Rngs(0)))
    dense_total = accounting.model_forward_flops(dense_model, seq)
    print(f"\nFLOPs per token over the dense layer's / model's: GPT {size} "
          f"({dense_cfg.n_layer}x{d}, ff {ff}, n_ctx {seq}, vocab 256)")
    print(f"{'family':<12}{'s':>6}{'shape':>14}{'attn d x d':>12}{'mlp d x ff':>12}"
          f"{'blocks':>9}{'model':>9}")
    for family in sparse_ift.FAMILIES:
        for s in sparsities:
            c = config(size, family, s, seq=seq, batch=1)
            cfg = build.model_config(c, 256)
            model = nnx.eval_shape(lambda c=c, cfg=cfg: GPT(cfg, rngs=nnx.Rngs(0),
                                                              linear=build.linear_factory(c)))
            w = (cfg.d_model, cfg.d_model), (cfg.d_model, cfg.d_ff)
            # Wide trains each widened layer at its own iso-FLOP share (what the config's
            # masks do: sparse_ift.wide_layer_sparsity), the others at s
            s_of = (sparse_ift.wide_layer_sparsity(d, ff, cfg.d_model, cfg.d_ff)
                    if family == "wide" else lambda i, o, s=s: s)
            attn = sparse_ift.layer_flops(family, d, d, s_of(*w[0]), widened=w[0]) / (2 * d * d)
            mlp = sparse_ift.layer_flops(family, d, ff, s_of(*w[1]), widened=w[1]) / (2 * d * ff)
            s_total = build.targets(c, build.wide_plan(c)).sparsity
            maskable, dense = accounting.block_matmul_weights(model)
            blocks = (maskable * (1 - s_total) + dense) / accounting.block_matmul_weights(
                dense_model)[0]
            total = accounting.model_forward_flops(model, seq, 1 - s_total) / dense_total
            shape = f"{cfg.d_model}/{cfg.d_ff}" if family == "wide" else ""
            print(f"{family:<12}{s:>6.2f}{shape:>14}{attn:>12.4f}{mlp:>12.4f}{blocks:>9.4f}"
                  f"{total:>9.4f}")
    print("blocks: attention+MLP matmul FLOPs; model: plus attention scores and the LM head")


def build_step(c):
    cfg = build.model_config(c, 256)
    model = GPT(cfg, rngs=nnx.Rngs(0), linear=build.linear_factory(c))
    tx = experiment.check(c).tx
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params_state)
    params = nnx.to_pure_dict(params_state)
    opt_state = tx.init(params)
    sparse = sparse_state(opt_state) is not None
    seq, batch = c.train.seq_len, c.train.batch_size
    fixed, dense = flops_coefficients(model, seq)
    step = make_train_step(graphdef, params_def, rest, tx, fixed_flops=fixed,
                           dense_flops=dense, tokens_per_step=float(batch * seq), sparse=sparse,
                           structural=accounting.structural_stats(model, params))
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(0),
                       jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                       jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    return step, state, cfg


def step_times(args) -> None:
    kw = dict(seq=args.seq, batch=args.batch)
    configs = {
        "dense": config(args.size, "", 0.0, **kw),
        f"wide s={args.wide_s:g}, bsr {args.block}": config(args.size, "wide", args.wide_s,
                                                           bsr_block=args.block, **kw),
        f"wide s={args.wide_s:g}, masked dense": config(args.size, "wide", args.wide_s, **kw),
    }
    built = {name: build_step(c) for name, c in configs.items()}
    corpus = data.load_corpus(None)
    batches = [data.get_batch(corpus.train, seed=0, step=i, batch_size=args.batch,
                              seq_len=args.seq) for i in range(args.steps)]
    states = {}
    for name, (step, state, _) in built.items():  # compile + warm up
        state, _ = step(state, *batches[0])
        jax.block_until_ready(state.params)
        states[name] = state
    times: dict[str, list[float]] = {name: [] for name in built}
    for r in range(args.rounds):
        for name in (list(built) if r % 2 == 0 else list(reversed(built))):
            step, state = built[name][0], states[name]
            t = time.perf_counter()
            for b in batches:
                state, metrics = step(state, *b)
            jax.block_until_ready(state.params)
            times[name].append((time.perf_counter() - t) / args.steps)
            states[name] = state
    base = sum(times["dense"])
    tokens = args.batch * args.seq
    print(f"\nTraining step, GPT {args.size}, batch {args.batch}x{args.seq}, {args.rounds} "
          f"interleaved rounds x {args.steps} steps, backend {jax.default_backend()}")
    print(f"{'config':<28}{'d/ff':>10}{'median ms':>11}{'ratio':>8}{'train GFLOP/token':>19}")
    for name, ts in times.items():
        state, cfg = states[name], built[name][2]
        per_token = float(state.flops) / (int(state.step) * tokens)
        print(f"{name:<28}{f'{cfg.d_model}/{cfg.d_ff}':>10}{statistics.median(ts) * 1e3:>11.2f}"
              f"{sum(ts) / base:>8.3f}{per_token / 1e9:>19.6f}")
    print("ratio = total time / dense total over the same rounds (iso-time where ~1)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--wide-s", type=float, default=0.75)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="steps per config per round")
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args()
    flop_table(args.size, [float(s) for s in args.sparsities.split(",")], args.seq)
    if not args.skip_timing:
        step_times(args)


if __name__ == "__main__":
    main()
