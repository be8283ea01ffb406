"""How much device memory a run's training step needs, without allocating its weights.

:func:`plan` lowers and compiles the *whole* jitted train step on abstract state and batch
(:func:`sparsejax.run.abstract_step.abstract_step`: no weights, state donated) for the default
backend, then reads XLA's compiled memory analysis. The peak is taken as

    peak = arguments + outputs - aliases + temporaries + generated code

Arguments (state and batch) are resident when the step starts; outputs are new buffers except
those XLA aliases to donated arguments (the new state reuses the old state's buffers);
temporaries are XLA's heap-simulated peak of everything else (activations kept for the backward
pass, gradients, the optimizer's intermediates, workspace), counted as if they coexisted with
all arguments and outputs, so this errs high. Run on a CPU host, this is XLA:CPU's plan of the
same program: an estimate of an accelerator's, whose fusion and layouts differ (XLA:CPU keeps
some bf16 intermediates in f32, so bf16 plans err high). Reported beside it, not in the sum:
the activations autodiff saves for the backward pass (the jaxpr's residuals, before XLA fuses
anything), in the compute dtype, platform independent.

:func:`check_fits` is what ``train`` runs before it loads data or allocates weights: it
refuses (:class:`~sparsejax.errors.ConfigError`) a run whose step cannot fit the memory of
the device it will run on (:func:`device_memory`). It compiles only when it must: the cheap
:func:`estimate` (state + twice the gradients + the residuals, ~0.3 s for a tiny model)
bounds the compiled peak from above (tested), so a run whose estimate is under
:data:`SKIP_COMPILE_FRACTION` of the memory passes at once; one whose state alone exceeds it
is refused at once; only in between is the step compiled and its peak compared. Before all
that, a model whose parameters alone (:func:`params_bytes`) exceed the memory is refused.

:func:`check_host_batches` runs first: the token batches the data pipeline holds on the host
(:func:`host_batches`) against the memory this process may still allocate
(:func:`available_host_memory`), so ``train.batch_size=100000000`` is refused before any
allocation.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.gpt import GPT
from sparsejax.run import build, distributed
from sparsejax.run.abstract_step import AbstractStep, abstract_step
from sparsejax.run.mask_methods import physical_memory
from sparsejax.run.shards import is_prepared, read_metadata
from sparsejax.run.spec import RunSpec
from sparsejax.transforms import SparsifyState

#: skip compiling when the upper estimate is below this fraction of the device's memory
SKIP_COMPILE_FRACTION = 0.5
BYTE_VOCAB = 256  # the built-in, text and folder corpora (sparsejax.run.data)
TOKEN_VOCAB_BOUND = 2**16  # a uint16 ``.bin`` corpus: vocab = max token + 1 <= 65536


def corpus_vocab(spec: RunSpec, *, exact: bool = True) -> int:
    """The vocabulary the run's corpus will have (:mod:`sparsejax.run.data`'s rule):
    ``data.vocab_size`` when set; a prepared folder's metadata's; 256 for byte corpora; for a
    ``uint16`` ``.bin``, its largest token + 1 (one pass over the memmap), or with
    ``exact=False`` the bound 65536 (no pass)."""
    source = spec.data.source
    if spec.data.vocab_size:
        return spec.data.vocab_size
    if source and is_prepared(Path(source).expanduser()):
        return int(read_metadata(Path(source).expanduser())["vocab_size"])
    if not source.endswith(".bin"):
        return BYTE_VOCAB
    if not exact:
        return TOKEN_VOCAB_BOUND
    return int(np.memmap(Path(source).expanduser(), dtype=np.uint16, mode="r").max()) + 1


def _nbytes(tree: Any, shardings: Any = None) -> int:
    """Bytes of ``tree``'s leaves (per device: the shard each holds, with ``shardings``)."""
    leaves = jax.tree.leaves(tree)
    shards = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    total = 0
    for leaf, sh in zip(leaves, shards, strict=True):
        shape = np.shape(leaf) if sh is None else sh.shard_shape(np.shape(leaf))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def residual_bytes(step: AbstractStep, min_itemsize: int = 1) -> int:
    """Bytes of the activations JAX's autodiff saves for the backward pass of one device's
    batch: the residuals of ``vjp(loss)``'s jaxpr that are not the params themselves (before
    XLA fuses or rematerializes anything); ``min_itemsize=4`` counts narrower entries as
    float32 (XLA:CPU widens bf16)."""
    leaves, tree = jax.tree.flatten(step.state.params)
    rows = max(1, step.batch.shape[0] // step.n_devices)
    x = jax.ShapeDtypeStruct((rows, step.batch.shape[1]), jnp.int32)

    def vjp(leaves, x, y):
        return jax.vjp(lambda q: step.loss(jax.tree.unflatten(tree, q), x, y), leaves)

    closed, shapes = jax.make_jaxpr(vjp, return_shape=True)(leaves, x, x)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(shapes[1]))
    inputs = {id(v) for v in jaxpr.invars}
    return sum(int(np.prod(v.aval.shape, dtype=np.int64))
               * max(min_itemsize, v.aval.dtype.itemsize)
               for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:]
               if not isinstance(v, jax.extend.core.Literal) and id(v) not in inputs)


class StateBytes(NamedTuple):
    """The train state's bytes per device by part."""

    params: int
    opt_state: int  # without the masks
    masks: int
    other: int  # step, rng, running statistics

    @property
    def total(self) -> int:
        return self.params + self.opt_state + self.masks + self.other


def _masks(opt_state: Any) -> list[Any]:
    """The masks of every ``sparsify`` state in ``opt_state`` (abstract leaves welcome)."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparsifyState))
    return [n.masks for n in nodes if isinstance(n, SparsifyState)]


def state_bytes(step: AbstractStep) -> StateBytes:
    """:class:`StateBytes` of ``step``'s state."""
    sh = step.shardings
    part = (lambda name: None) if sh is None else (lambda name: getattr(sh, name))
    params = _nbytes(step.state.params, part("params"))
    opt = _nbytes(step.state.opt_state, part("opt_state"))
    masks = _nbytes(_masks(step.state.opt_state), None if sh is None else _masks(sh.opt_state))
    total = _nbytes(step.state, sh)
    return StateBytes(params, opt - masks, masks, total - params - opt)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """XLA's compiled memory analysis of one train step (per device), by part."""

    state: StateBytes
    batch: int  # inputs and targets
    arguments: int
    outputs: int
    aliases: int
    temporaries: int
    generated_code: int
    residuals: int  # activations autodiff saves for the backward (jaxpr; not in the peak)
    platform: str  # the backend that compiled it
    compile_s: float
    n_params: int  # parameter entries the model stores (all devices)

    @property
    def peak(self) -> int:
        """arguments + outputs - aliases + temporaries + generated code (module docstring)."""
        return (self.arguments + self.outputs - self.aliases + self.temporaries
                + self.generated_code)


def plan(spec: RunSpec, vocab_size: int, mesh: jax.sharding.Mesh | None = None
         ) -> MemoryPlan:
    """Compile ``spec``'s train step on abstract inputs for the default backend and return
    its :class:`MemoryPlan` (nothing is allocated but kernel layers' host-side masks)."""
    step = abstract_step(spec, vocab_size, mesh)
    t0 = time.perf_counter()
    # lower() of the step itself: on a mesh it is an OnMesh, which lowers under its mesh
    compiled = step.train_step.lower(step.state, step.batch, step.batch, None).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    return MemoryPlan(
        state=state_bytes(step), batch=2 * _nbytes(step.batch) // step.n_devices,
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliases=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
        generated_code=stats.generated_code_size_in_bytes, residuals=residual_bytes(step),
        platform=jax.default_backend(), compile_s=compile_s,
        n_params=sum(int(np.prod(a.shape, dtype=np.int64))
                     for a in jax.tree.leaves(step.state.params)))


class Estimate(NamedTuple):
    """Without compiling, per device: the state (a lower bound of the peak: it is resident)
    and ``upper`` = state + 2 x params (gradients and the update) + residuals (as float32,
    without remat) + batch."""

    state: int
    upper: int


def estimate(spec: RunSpec, vocab_size: int, mesh: jax.sharding.Mesh | None = None
             ) -> Estimate:
    """:class:`Estimate` from abstract shapes alone. Kernel layers store at most the dense
    weights, so their run is estimated by its dense twin (with masks: a bound); the residuals
    are those without ``model.remat`` (more than with it)."""
    model = dataclasses.replace(spec.model, linear="dense")
    if hasattr(model, "remat"):
        model = dataclasses.replace(model, remat="none")
    step = abstract_step(spec.replace(model=model), vocab_size, mesh)
    parts = state_bytes(step)
    batch = 2 * _nbytes(step.batch) // step.n_devices
    return Estimate(parts.total,
                    parts.total + 2 * parts.params + residual_bytes(step, 4) + batch)


def params_bytes(spec: RunSpec, vocab_size: int) -> int:
    """Bytes of the model's parameters on all devices, from an abstract model (nothing
    allocated; kernel layers by their dense twin, at most the same): the floor of any run's
    state, read before the train step is built (which, for a model with 2**31 parameters or
    more, counts them in int32)."""
    model = dataclasses.replace(spec.model, linear="dense")
    spec = spec.replace(model=model)
    bp = build.blueprint(spec)
    cfg = dataclasses.replace(bp.model_cfg, vocab_size=vocab_size)
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0),
                                          linear=build.linear_factory(spec, bp.wide)))
    return _nbytes(nnx.state(abstract, nnx.Param))


def device_memory() -> tuple[int, str]:
    """``(bytes, what)``: the memory of the first local device, as its allocator reports it
    (``memory_stats()["bytes_limit"]`` on GPU/TPU), or on CPU the host's physical memory
    shared by its CPU devices."""
    devices = jax.local_devices()
    dev = devices[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"device {dev.device_kind} ({dev.platform})"
    return physical_memory() // len(devices), (
        f"host memory / {len(devices)} CPU devices" if len(devices) > 1 else "host memory")


#: bytes per parameter (params are float32; model.dtype only sets the compute dtype)
PARAM_BYTES = 4
#: the largest model the on-device counts (int32: kept weights, N_avg's step count) can hold
MAX_PARAMS = 2**31 - 1

#: copies of the parameters a CPU run holds in host memory beside its train step: the built
#: model's own weights and the host copy train's setup takes (``jax.device_get``)
CPU_HOST_PARAM_COPIES = 2


def _on_cpu() -> bool:
    return jax.local_devices()[0].platform == "cpu"


def cpu_step_memory(params: int) -> tuple[int, str]:
    """``(bytes, what)`` a CPU device's train step may use: the host memory still available
    (:func:`available_host_memory`, not the physical memory: other processes hold some) less
    the :data:`CPU_HOST_PARAM_COPIES` copies of the ``params`` bytes a run keeps beside the
    step, shared by the process's CPU devices (0 when those copies alone do not fit)."""
    free, what = available_host_memory()
    n = len(jax.local_devices())
    left = max(free - CPU_HOST_PARAM_COPIES * params, 0) // n
    return left, (f"{size(free)} of {what} less {CPU_HOST_PARAM_COPIES} host copies of the "
                  f"parameters ({size(CPU_HOST_PARAM_COPIES * params)})"
                  + (f", / {n} CPU devices" if n > 1 else ""))


def check_fits(spec: RunSpec, limit: tuple[int, str] | None = None) -> Estimate | MemoryPlan:
    """Refuse (:class:`~sparsejax.errors.ConfigError`, naming the estimate and the memory)
    a run whose train step cannot fit one device of its mesh (``limit``: ``(bytes, what)``,
    default :func:`device_memory`, or on CPU :func:`cpu_step_memory`: the available host
    memory less the parameters' host copies); returns the estimate or plan that passed (module
    docstring: parameters alone first, then it compiles only between the two bounds)."""
    m = spec.mesh
    try:  # the mesh and batch split train makes and checks, as the config's error (exit 2)
        mesh = distributed.make_mesh(distributed.MeshShape(m.data, m.fsdp))
        distributed.check_batch("train.batch_size", spec.train.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    whole = params_bytes(spec, corpus_vocab(spec, exact=False))
    limit_bytes, where = cpu_step_memory(whole) if limit is None and _on_cpu() else (
        device_memory() if limit is None else limit)
    params = whole // m.fsdp
    if params > limit_bytes:  # refused before the step is built
        raise ConfigError(refusal(spec, size(params), "its parameters alone",
                                  f"{size(limit_bytes)} of {where}",
                                  fixes=("model.size", "mesh.fsdp")))
    if whole // PARAM_BYTES > MAX_PARAMS:  # a model that fits: before a device count overflows
        raise ConfigError(
            f"model.size={spec.model.size!r} has about {whole // PARAM_BYTES:,} parameters; "
            f"sparsejax counts parameters and kept weights in int32 on the device, so a model "
            f"holds at most {MAX_PARAMS:,}: use a smaller model.size")
    est = estimate(spec, corpus_vocab(spec, exact=False), mesh)
    if est.upper <= SKIP_COMPILE_FRACTION * limit_bytes:
        return est
    if est.state > limit_bytes:
        raise ConfigError(refusal(spec, size(est.state), "its train state alone: params, "
                                  "optimizer state, masks", f"{size(limit_bytes)} of {where}"))
    found = plan(spec, corpus_vocab(spec), mesh)
    if found.peak > limit_bytes:
        raise ConfigError(refusal(spec, size(found.peak),
                                  f"XLA:{found.platform.upper()}'s plan of its train step",
                                  f"{size(limit_bytes)} of {where}"))
    return found


def size(n: int) -> str:
    """``n`` bytes in GB (1e9), or MB below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def refusal(spec: RunSpec, need: str, how: str, capacity: str,
            fixes: tuple[str, ...] | None = None) -> str:
    """The one line that refuses a run: what it needs, how that was found, the memory it
    does not fit, and the config keys that lower it (``fixes``; default those of a train
    step's memory)."""
    fixes = fixes or (
        "train.batch_size", "train.seq_len",
        *(["model.dtype=bfloat16"] if spec.model.dtype == "float32" else []),
        *(["model.remat"] if hasattr(spec.model, "remat") else []), "mesh.fsdp")
    return (f"this run needs about {need} per device ({how}), more than the {capacity}; "
            f"lower it with {', '.join(fixes)} (sparsejax plan-memory shows the parts)")


# -- host memory: the token batches the data pipeline holds ----------------------------------
#: bytes per token of a drawn batch, int32 inputs and targets
HELD_BYTES_PER_TOKEN = 8
#: more bytes per token of a window (``seq_len + 1`` tokens) while a set of windows is drawn:
#: its int64 gather indices and int32 windows (:mod:`sparsejax.run.data`)
DRAW_BYTES_PER_TOKEN = 12


class HostBatches(NamedTuple):
    """The host memory of a run's token batches (:func:`host_batches`)."""

    parts: tuple[tuple[str, str, int], ...]  # (what, the keys that size it, bytes it holds)
    peak: int  # every part held, plus the largest one's transient while drawn


def host_batches(spec: RunSpec) -> HostBatches:
    """What the data pipeline holds on the host for the whole run: the train batch
    (``train.batch_size`` windows), the periodic evaluation set (``eval.batch_size ·
    eval.batches``) and the final one (``eval.final_batches``; the periodic set when equal),
    each :data:`HELD_BYTES_PER_TOKEN` per token of ``train.seq_len``, plus, while the largest
    is drawn, :data:`DRAW_BYTES_PER_TOKEN` per token of its windows."""
    t, ev = spec.train, spec.eval
    sets = [(f"the train batch (train.batch_size={t.batch_size}", "train.batch_size",
             t.batch_size),
            (f"the evaluation set (eval.batch_size={ev.batch_size} x eval.batches={ev.batches}",
             "eval.batch_size, eval.batches", ev.batch_size * ev.batches)]
    if ev.final_batches != ev.batches:
        sets.append((f"the final evaluation set (eval.batch_size={ev.batch_size} x "
                     f"eval.final_batches={ev.final_batches}", "eval.batch_size, "
                     "eval.final_batches", ev.batch_size * ev.final_batches))
    parts = tuple((f"{what} x train.seq_len={t.seq_len} tokens)", f"{keys} or train.seq_len",
                   HELD_BYTES_PER_TOKEN * n * t.seq_len) for what, keys, n in sets)
    draw = max(DRAW_BYTES_PER_TOKEN * n * (t.seq_len + 1) for _, _, n in sets)
    return HostBatches(parts, sum(b for _, _, b in parts) + draw)


def available_host_memory() -> tuple[int, str]:
    """``(bytes, what)``: the memory this process may still allocate: ``MemAvailable`` of
    ``/proc/meminfo`` (else the free pages, ``os.sysconf``), capped by a cgroup v2 limit
    (``memory.max`` less ``memory.current``: a container's, a cluster job's)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kb = next(int(line.split()[1]) for line in lines if line.startswith("MemAvailable:"))
        free, what = kb * 1024, "available host memory"
    except (OSError, StopIteration, ValueError, IndexError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        what = "free host memory"
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            if left < free:
                free, what = left, "host memory left under the cgroup's memory.max"
    except (OSError, ValueError):
        pass
    return max(free, 0), what


def check_host_batches(spec: RunSpec, available: tuple[int, str] | None = None) -> HostBatches:
    """Refuse (:class:`~sparsejax.errors.ConfigError`, one line naming the keys of the
    largest part, the estimate and the memory) a run whose token batches
    (:func:`host_batches`) cannot fit the host memory ``available`` (``(bytes, what)``,
    default :func:`available_host_memory`), before anything is allocated; returns the
    estimate that passed."""
    free, what = available_host_memory() if available is None else available
    need = host_batches(spec)
    if need.peak > free:
        part, keys, nbytes = max(need.parts, key=lambda p: p[2])
        raise ConfigError(
            f"this run's token batches need about {size(need.peak)} of host memory "
            f"({HELD_BYTES_PER_TOKEN} bytes per token held, {DRAW_BYTES_PER_TOKEN} more while "
            f"drawn), more than the {size(free)} of {what}: {part} holds {size(nbytes)}; "
            f"lower {keys}")
    return need
