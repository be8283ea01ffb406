"""Sample text from a loaded run (:func:`generate`; ``sparsejax sample RUN_DIR``).

One jitted decode loop (``lax.fori_loop``) over a fixed buffer of the model's context length
``n_ctx``: each step runs the causal forward on the whole buffer and reads the logits after
the last real token (padding after it cannot reach it through causal attention), so no step
recompiles and one compile serves every prompt, temperature, ``top_k`` and seed of the same
``max_new_tokens``. There is no KV
cache: a step costs a forward of ``n_ctx`` tokens. When the buffer is full the window slides
(the oldest token leaves, the model sees the last ``n_ctx`` tokens, as in training's windows);
a prompt longer than ``n_ctx`` tokens is refused. Prompts are encoded and the result decoded
with the run's tokenizer (:func:`sparsejax.run.tokenizer.for_source`: bytes, or a prepared
folder's BPE). ``temperature=0`` is greedy (argmax); otherwise logits are divided by the
temperature, cut to the ``top_k`` largest (0: all) and sampled with keys
``fold_in(PRNGKey(seed), i)``, so a seed gives the same text every time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax import errors
from sparsejax.downstream.loading import Loaded
from sparsejax.run import tokenizer


def _check(loaded: Loaded, max_new_tokens: int, temperature: float, top_k: int, seed: int,
           vocab: int) -> None:
    def is_int(v: object) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not isinstance(loaded, Loaded):
        raise errors.InputError(f"loaded must be what sparsejax.load(RUN_DIR) returns, got "
                                f"{type(loaded).__name__}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise errors.InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, int | float)
            or not math.isfinite(temperature) or temperature < 0):
        raise errors.InputError(f"temperature must be a finite float >= 0 (0: greedy), got "
                                f"{temperature!r}")
    if not is_int(top_k) or not 0 <= top_k <= vocab:
        raise errors.InputError(f"top_k must be an int in [0, {vocab}] (0: no cut), got "
                                f"{top_k!r}")
    if not is_int(seed) or seed < 0:
        raise errors.InputError(f"seed must be an int >= 0, got {seed!r}")


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, buf_L: jax.Array, n0: jax.Array,
            key: jax.Array, temperature: jax.Array, top_k: jax.Array, *, steps: int
            ) -> jax.Array:
    """``steps`` new tokens after the first ``n0`` of ``buf_L`` (module docstring); the
    sampling settings are traced, so one compile serves them all (temperature 0: argmax)."""
    model = nnx.merge(graphdef, state)
    L = buf_L.shape[0]

    def pick(logits_V: jax.Array, i: jax.Array) -> jax.Array:
        scaled_V = logits_V / jnp.where(temperature > 0, temperature, 1.0)
        kth = jnp.sort(scaled_V)[-jnp.maximum(top_k, 1)]  # the k-th largest
        cut_V = jnp.where((top_k > 0) & (scaled_V < kth), -jnp.inf, scaled_V)
        sampled = jax.random.categorical(jax.random.fold_in(key, i), cut_V)
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(jnp.int32)

    def body(i, carry):
        buf_L, n, out_S = carry
        logits_LxV = model(buf_L[None])[0]
        tok = pick(jax.lax.dynamic_index_in_dim(logits_LxV, n - 1, keepdims=False), i)
        slid_L = jnp.roll(buf_L, -1).at[L - 1].set(tok)
        buf_L = jnp.where(n == L, slid_L, buf_L.at[jnp.minimum(n, L - 1)].set(tok))
        return buf_L, jnp.minimum(n + 1, L), out_S.at[i].set(tok)

    out_S = jnp.zeros((steps,), jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (buf_L, n0, out_S))[2]


def generate_ids(loaded: Loaded, prompt_ids: Sequence[int] | np.ndarray,
                 max_new_tokens: int = 100, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0) -> np.ndarray:
    """The ``max_new_tokens`` token ids that follow ``prompt_ids`` (int32; module docstring)."""
    model = loaded.model
    vocab, n_ctx = model.cfg.vocab_size, model.cfg.n_ctx
    _check(loaded, max_new_tokens, temperature, top_k, seed, vocab)
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise errors.InputError(f"prompt must be a non-empty text or 1-D list of token ids, got "
                                f"shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise errors.InputError(f"prompt token ids must be in [0, {vocab}), got "
                                f"{ids.min()}..{ids.max()}")
    if ids.size > n_ctx:
        raise errors.InputError(f"prompt is {ids.size} tokens, longer than the model's context "
                                f"(model.n_ctx = {n_ctx}); shorten it")
    buf_L = np.zeros(n_ctx, np.int32)
    buf_L[: ids.size] = ids
    graphdef, state = nnx.split(model)
    out = _decode(graphdef, state, jnp.asarray(buf_L), jnp.int32(ids.size),
                  jax.random.PRNGKey(seed), jnp.float32(temperature), jnp.int32(top_k),
                  steps=int(max_new_tokens))
    return np.asarray(out)


def generate(loaded: Loaded, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0) -> str:
    """The text that ``loaded`` (:func:`sparsejax.load`) writes after ``prompt``: its
    ``max_new_tokens`` tokens decoded with the run's tokenizer (module docstring). Raises
    :class:`~sparsejax.errors.InputError` naming the argument out of range, for a prompt
    longer than the context, or for a run trained on a ``.bin`` of token ids (no tokenizer:
    use :func:`generate_ids`)."""
    if not isinstance(prompt, str) or not prompt:
        raise errors.InputError(f"prompt must be a non-empty string, got {prompt!r}")
    tok = tokenizer.for_source(loaded.config.data.source)
    if tok.vocab_size > loaded.model.cfg.vocab_size:
        raise errors.InputError(f"the run's tokenizer has {tok.vocab_size} tokens, its model "
                                f"{loaded.model.cfg.vocab_size}: not the data it was trained on")
    ids = generate_ids(loaded, tok.encode(prompt), max_new_tokens, temperature, top_k, seed)
    return tok.decode(ids)
