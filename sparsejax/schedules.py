"""Sparsity schedules: jittable ``step -> sparsity`` closures plus their mask-update steps.

A :class:`Schedule` answers two questions for a training step ``t``:

* ``sched(t)``: the target sparsity the masks hold *during* step ``t`` (after the mask update
  at ``t``, if ``t`` is an update step). It is piecewise constant and only changes at update
  steps.
* ``sched.is_update_step(t)``: whether the masks are recomputed at step ``t``.

Both accept Python ints and (traced) int32 JAX scalars, returning float32 / bool JAX values, so
they run under ``jit``. They are elementwise, so they also accept arrays of steps. A NumPy array
(or NumPy scalar) of steps takes a float64 NumPy path on the host, which
:func:`average_density` uses.

Update steps (``every = update_every``; ``[b, e]`` the window given to the constructor):

* ``constant(s)``: every multiple of ``every`` from 0, forever; value ``s`` from step 0.
* ``polynomial`` (Zhu & Gupta 2017, "To prune, or not to prune"): ``b, b+every, ...`` below
  ``e``, and ``e`` itself; the value set at update ``t`` is the Zhu & Gupta formula at ``t``,
  so ``b`` gives ``initial_sparsity`` and ``e`` gives ``final_sparsity``.
* ``geometric`` (Jin et al. 2025, "Journey Matters: Average Parameter Count over Pre-training
  Unifies Sparse and Dense Scaling Laws", as in its code): ``n = ceil((e-b)/every)`` events at
  ``b + k*every``, ``k = 0..n-1``; ``e`` itself is *not* an update step. Event ``k`` sets the
  density to ``(1-s_f)^((k+1)/n)``, so the first event already prunes and the last (before
  ``e``) reaches ``s_f``. This placement reproduces the average densities of the published
  model cards (0.8919 and 0.7651, see the tests); placing events at ``b+every..e`` does not.
* ``one_shot``: ``at_step``; ``iterative``: each of ``steps``.

Before its first update step every schedule is dense (sparsity 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.checks import sparsity as _check_sparsity


class Schedule(NamedTuple):
    """A sparsity schedule: ``fn(step) -> sparsity`` and ``update_fn(step) -> bool``."""

    fn: Callable[[jax.Array], jax.Array]  # step (int32 scalar) -> float32 sparsity, jittable
    update_fn: Callable[[jax.Array], jax.Array]  # step -> bool scalar: masks recomputed here
    begin_step: int  # first update step
    end_step: int | None  # end of the window as given; None: active forever (constant)
    final_sparsity: float
    update_every: int

    def __call__(self, step):
        return self.fn(step)

    def is_update_step(self, step):
        return self.update_fn(step)


# ----------------------------------------------------------------------------- checks


def _check_step(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_window(begin_step: int, end_step: int) -> tuple[int, int]:
    b = _check_step("begin_step", begin_step)
    e = _check_step("end_step", end_step)
    if b >= e:
        raise ValueError(f"begin_step must be < end_step, got begin_step={b}, end_step={e}")
    return b, e


def _backend(step):
    """(array module, step array, float dtype): float64 NumPy for NumPy input, else JAX."""
    if isinstance(step, np.ndarray | np.generic):
        return np, np.asarray(step, np.int64), np.float64
    return jnp, jnp.asarray(step, jnp.int32), jnp.float32


# ----------------------------------------------------------------------------- constructors


def constant(sparsity: float, *, update_every: int = 1) -> Schedule:
    """Sparsity ``s`` from step 0 on; masks recomputed at every multiple of ``update_every``.

    >>> sched = constant(0.5, update_every=10)
    >>> float(sched(0)), float(sched(123)), bool(sched.is_update_step(20))
    (0.5, 0.5, True)
    """
    s = _check_sparsity("sparsity", sparsity)
    every = _check_step("update_every", update_every, 1)

    def fn(step):
        xp, t, f = _backend(step)
        return xp.full(xp.shape(t), s, dtype=f)

    def update_fn(step):
        xp, t, _ = _backend(step)
        return (t >= 0) & (t % every == 0)

    return Schedule(fn, update_fn, 0, None, s, every)


def polynomial(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    power: float = 3,
    initial_sparsity: float = 0.0,
    update_every: int = 1,
) -> Schedule:
    """Zhu & Gupta 2017 gradual pruning (``power=3`` is their cubic schedule).

    At update steps ``t`` in ``[t0, t1]`` (multiples of ``update_every`` from ``t0``, and
    ``t1`` itself): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power``.

    >>> sched = polynomial(0.8, 0, 100, update_every=50)
    >>> [round(float(sched(t)), 4) for t in (0, 49, 50, 99, 100)]
    [0.0, 0.0, 0.7, 0.7, 0.8]
    """
    s_f = _check_sparsity("final_sparsity", final_sparsity)
    s_i = _check_sparsity("initial_sparsity", initial_sparsity)
    b, e = _check_window(begin_step, end_step)
    every = _check_step("update_every", update_every, 1)
    if not isinstance(power, int | float) or not power > 0:
        raise ValueError(f"power must be a number > 0, got {power!r}")
    p = float(power)

    def fn(step):
        xp, t, f = _backend(step)
        last = b + ((t - b) // every) * every  # last regular update step <= t
        last = xp.where(t >= e, e, last)
        progress = xp.clip((last - b).astype(f) / (e - b), 0.0, 1.0)
        s = s_f + (s_i - s_f) * (1.0 - progress) ** p
        return xp.where(t >= b, s, 0.0).astype(f)

    def update_fn(step):
        xp, t, _ = _backend(step)
        return (t >= b) & (t <= e) & (((t - b) % every == 0) | (t == e))

    return Schedule(fn, update_fn, b, e, s_f, every)


def geometric(
    final_sparsity: float, begin_step: int, end_step: int, *, update_every: int = 1
) -> Schedule:
    """Journey Matters' geometric schedule: each event removes the same fraction of weights.

    ``n = ceil((end_step - begin_step) / update_every)`` events at ``begin_step + k *
    update_every`` (``k = 0..n-1``, all before ``end_step``); after event ``k`` the density is
    ``(1 - s_f) ** ((k + 1) / n)``, so the last event reaches ``s_f``.

    >>> sched = geometric(0.75, 10, 30, update_every=10)
    >>> [float(sched(t)) for t in (9, 10, 19, 20, 30)]
    [0.0, 0.5, 0.5, 0.75, 0.75]
    """
    s_f = _check_sparsity("final_sparsity", final_sparsity)
    b, e = _check_window(begin_step, end_step)
    every = _check_step("update_every", update_every, 1)
    n = -(-(e - b) // every)
    log_q = math.log1p(-s_f)

    def fn(step):
        xp, t, f = _backend(step)
        k = xp.clip((t - b) // every, 0, n - 1)
        s = -xp.expm1((k + 1).astype(f) / n * log_q)
        s = xp.where(k + 1 >= n, s_f, s)
        return xp.where(t >= b, s, 0.0).astype(f)

    def update_fn(step):
        xp, t, _ = _backend(step)
        return (t >= b) & (t < e) & ((t - b) % every == 0)

    return Schedule(fn, update_fn, b, e, s_f, every)


def iterative(sparsities: Sequence[float], steps: Sequence[int]) -> Schedule:
    """Piecewise-constant levels: ``sparsities[i]`` from ``steps[i]`` on (dense before).

    >>> sched = iterative([0.5, 0.75], [10, 20])
    >>> [float(sched(t)) for t in (0, 10, 25)], bool(sched.is_update_step(20))
    ([0.0, 0.5, 0.75], True)
    """
    levels = [_check_sparsity(f"sparsities[{i}]", s) for i, s in enumerate(sparsities)]
    at = [_check_step(f"steps[{i}]", t) for i, t in enumerate(steps)]
    if not levels or len(levels) != len(at):
        raise ValueError(
            "sparsities and steps must be non-empty and of equal length, got "
            f"{len(levels)} and {len(at)}"
        )
    if any(t1 <= t0 for t0, t1 in zip(at, at[1:], strict=False)):
        raise ValueError(f"steps must be strictly increasing, got {at}")
    values = [0.0, *levels]

    def fn(step):
        xp, t, f = _backend(step)
        idx = xp.searchsorted(xp.asarray(at), t, side="right")
        return xp.asarray(values, dtype=f)[idx]

    def update_fn(step):
        xp, t, _ = _backend(step)
        return (t[..., None] == xp.asarray(at)).any(axis=-1)

    return Schedule(fn, update_fn, at[0], at[-1], levels[-1], 1)


def one_shot(sparsity: float, at_step: int) -> Schedule:
    """Prune once to ``sparsity`` at ``at_step`` (dense before).

    >>> sched = one_shot(0.75, 5)
    >>> float(sched(4)), float(sched(5)), bool(sched.is_update_step(6))
    (0.0, 0.75, False)
    """
    s = _check_sparsity("sparsity", sparsity)
    t0 = _check_step("at_step", at_step)
    return iterative([s], [t0])


def window(
    total_steps: int,
    final_sparsity: float,
    *,
    start: float = 0.25,
    end: float = 0.75,
    kind: str = "geometric",
    by: str = "compute",
    update_every: int = 1,
) -> Schedule:
    """A geometric or polynomial schedule whose window is placed by fraction of training.

    ``by="steps"``: the window is ``[round(start*T), round(end*T))``. ``by="compute"`` (Journey
    Matters' "start at 25%, end at 75%"): with C(t) = sum over steps before t of the density,
    the window begins when C reaches ``start * C(T)`` and ends when it reaches ``end * C(T)``.
    C(T) depends on the window, so ``(begin, end)`` are solved for the discrete schedule:
    the integer pair minimising the larger misfit ``|C(b) - start*C(T)|``,
    ``|C(e) - end*C(T)|`` (at most about one step's compute). In the continuous limit the
    average density is ``q / (1 - end + q*start + q*(end - start)/w)`` with ``q = 1 - s_f``
    and ``w`` the window's mean density (``-s_f / ln q`` geometric, ``1 - s_f*p/(p+1)``
    polynomial): 0.8926 at ``s_f = 0.2`` and 0.7662 at 0.4 for the geometric 25%-75% window.

    >>> sched = window(1000, 0.5, by="steps")
    >>> sched.begin_step, sched.end_step
    (250, 750)
    """
    T = _check_step("total_steps", total_steps, 2)
    s_f = _check_sparsity("final_sparsity", final_sparsity)
    every = _check_step("update_every", update_every, 1)
    for name, v in (("start", start), ("end", end)):
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"start and end must satisfy 0 <= start < end <= 1, got {start}, {end}")
    makers = {
        "geometric": lambda b, e: geometric(s_f, b, e, update_every=every),
        "polynomial": lambda b, e: polynomial(s_f, b, e, update_every=every),
    }
    if kind not in makers:
        raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
    if by == "steps":
        b, e = round(start * T), round(end * T)
    elif by == "compute":
        q = 1.0 - s_f
        w = window_mean_density(s_f, kind)
        c = T * window_average_density(s_f, start, end, kind=kind, by="compute")
        b, e = _solve_by_compute(T, q, start, end, w, c, makers[kind])
    else:
        raise ValueError(f"by must be one of ['compute', 'steps'], got {by!r}")
    if not 0 <= b < e <= T:
        raise ValueError(f"total_steps={T} is too small to place a window from {start} to {end}")
    return makers[kind](b, e)


WINDOW_KINDS = ("geometric", "polynomial")


def window_mean_density(final_sparsity: float, kind: str = "geometric", *,
                        power: float = 3.0) -> float:
    """Mean density inside a pruning window from density 1 down to ``q = 1 - final_sparsity``,
    in continuous time (``u``: fraction of the window elapsed):

    * ``geometric`` (Journey Matters): density ``q^u``, mean ``(1 - q) / -ln q``;
    * ``polynomial`` (Zhu & Gupta 2017): sparsity ``s (1 - (1 - u)^p)``, mean density
      ``1 - s p / (p + 1)`` (``power=3``: the cubic schedule, ``power=1``: linear).

    >>> round(window_mean_density(0.5, "polynomial"), 6)
    0.625
    """
    s = float(final_sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity!r}")
    if kind == "geometric":
        return 1.0 if s == 0 else s / -math.log1p(-s)
    if kind == "polynomial":
        if not (isinstance(power, int | float) and power > 0):
            raise ValueError(f"power must be > 0, got {power!r}")
        return 1.0 - s * power / (power + 1.0)
    hint = {"cubic": " (the cubic schedule is kind='polynomial', power=3)",
            "linear": " (linear is kind='polynomial', power=1)"}.get(kind, "")
    raise ValueError(f"kind must be one of {list(WINDOW_KINDS)}, got {kind!r}{hint}")


def window_average_density(
    final_sparsity: float,
    start: float = 0.25,
    end: float = 0.75,
    *,
    kind: str = "geometric",
    by: str = "compute",
    power: float = 3.0,
) -> float:
    """Average density over training of a dense-to-sparse window schedule, continuous limit.

    The window runs from fraction ``start`` to ``end`` of training, dense before and at
    ``q = 1 - final_sparsity`` after; ``m`` is :func:`window_mean_density`.
    ``by="steps"``: ``rho = start + (end - start) m + (1 - end) q``. ``by="compute"`` (Journey
    Matters' "25% to 75% of compute"; each phase's step share is its compute share divided by
    its mean density): ``rho = 1 / (start + (end - start) / m + (1 - end) / q)``. This is the
    one closed form behind :func:`window` (placing a window by compute) and
    ``scaling.plan_sparse``; :func:`average_density` is the exact mean of a discrete schedule,
    which approaches it as the number of steps grows (tested).

    >>> round(window_average_density(0.5, by="steps"), 6)
    0.735674
    """
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    m = window_mean_density(final_sparsity, kind, power=power)
    q = 1.0 - float(final_sparsity)
    if by == "steps":
        return start + (end - start) * m + (1.0 - end) * q
    if by == "compute":
        return 1.0 / (start + (end - start) / m + (1.0 - end) / q)
    raise ValueError(f"by must be one of ['compute', 'steps'], got {by!r}")


def _solve_by_compute(T, q, start, end, w, c, make) -> tuple[int, int]:
    """Integer window ``(b, e)`` placing ``start``/``end`` of the total compute (see window)."""
    sums: dict[int, float] = {}

    def window_sum(length: int) -> float:  # compute of the window's own steps
        if length not in sums:
            sums[length] = float(np.sum(1.0 - make(0, length)(np.arange(length))))
        return sums[length]

    def clamp(b: int, length: int) -> tuple[int, int]:
        b = min(max(b, 0), T - 1)
        return b, min(max(length, 1), T - b)

    def misfit(b: int, length: int) -> float:
        total = b + window_sum(length) + (T - b - length) * q
        return max(abs(b - start * total), abs(b + window_sum(length) - end * total))

    # c: steps-equivalent compute of the continuous solution (T times its average density)
    b, length = clamp(round(start * c), round((end - start) * c / w))
    seen = set()
    while (b, length) not in seen and len(seen) < 100:  # fixed-point iteration on integers
        seen.add((b, length))
        total = b + window_sum(length) + (T - b - length) * q
        nb = round(start * total)
        per_step = window_sum(length) / length
        b, length = clamp(nb, length + round((end * total - nb - window_sum(length)) / per_step))
    best = min(seen, key=lambda bl: misfit(*bl))
    candidates = {clamp(best[0] + db, best[1] + dl) for db in range(-2, 3) for dl in range(-2, 3)}
    b, length = min(sorted(candidates), key=lambda bl: misfit(*bl))
    return b, b + length


def average_density(schedule: Schedule, total_steps: int) -> float:
    """Exact mean of ``1 - schedule(t)`` over ``t = 0..total_steps-1`` (float64, host).

    Journey Matters' N_avg is this times the prunable parameter count.

    >>> round(average_density(one_shot(0.5, 50), 100), 6)
    0.75
    """
    T = _check_step("total_steps", total_steps, 1)
    steps = np.arange(T, dtype=np.int64)
    values = np.asarray(schedule(steps), dtype=np.float64)
    if values.shape != steps.shape:  # a schedule that is not elementwise
        values = np.asarray(jax.vmap(schedule.fn)(jnp.asarray(steps, jnp.int32)), np.float64)
    return float(np.mean(1.0 - values))
