"""One ``(data, fsdp)`` device mesh for training, its shardings, and multi-host start-up.

docs/design.md, "Distributed". Params are sharded along their largest dim that the ``fsdp`` axis
divides (replicated when none does); every state leaf shaped like a param (masks, Adam
moments, accumulators) gets that param's sharding, every other leaf (counters, keys,
scalars) is replicated; batches are split over both axes, ``(data, fsdp)``, as in ZeRO-3 /
FSDP (Rajbhandari et al. 2020, "ZeRO"; Xu et al. 2021, "GSPMD"). The training state is built
with ``jax.eval_shape`` and initialised under ``jit(out_shardings=...)`` (:func:`init_sharded`),
so Adam moments never land on one device.

Multi-host: :func:`initialize` calls ``jax.distributed.initialize`` when the config names a
coordinator or several processes (``mesh.coordinator``, ``mesh.num_processes``,
``mesh.process_id``) or the environment sets ``JAX_COORDINATOR_ADDRESS``; what the config
leaves unset, JAX takes from the environment (its cluster detection: SLURM, Open MPI, TPU
pods). Every process builds the same global batch from ``(seed, step)``
(:mod:`sparsejax.run.data`) and hands XLA only its addressable shards (:func:`put`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")  # the batch dim is split over every device
ENV_VARS = ("JAX_COORDINATOR_ADDRESS",)


class MeshShape(NamedTuple):
    """Requested mesh: ``-1`` on one axis means "the devices the other axis leaves"."""

    data: int = -1
    fsdp: int = 1


def resolve(shape: MeshShape, n_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with the ``-1`` filled in; ``ValueError`` naming ``mesh.*`` when the
    product is not ``n_devices``."""
    data, fsdp = shape
    for name, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= 1):
            raise ValueError(f"config.{name} must be -1 (the rest) or an int >= 1, got {v!r}")
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh.data and config.mesh.fsdp cannot both be -1")
    known = data if fsdp == -1 else fsdp
    if data == -1 or fsdp == -1:
        if n_devices % known:
            other = "mesh.fsdp" if data == -1 else "mesh.data"
            raise ValueError(f"config.{other}={known} must divide the {n_devices} devices")
        rest = n_devices // known
        data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
    if data * fsdp != n_devices:
        raise ValueError(f"config.mesh.data * config.mesh.fsdp = {data} * {fsdp} must equal the "
                         f"number of devices ({n_devices}); use -1 on one axis for the rest")
    return data, fsdp


def make_mesh(shape: MeshShape = MeshShape(), devices: list[Any] | None = None) -> Mesh:
    """The ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    data, fsdp = resolve(MeshShape(*shape), len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dim that ``fsdp`` divides (the first of equal ones); else replicate."""
    if fsdp > 1:
        order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
        for d in order:
            if shape[d] % fsdp == 0:
                return P(*(["fsdp" if i == d else None for i in range(len(shape))]))
    return P()


def state_shardings(mesh: Mesh, abstract_state: Any, params: Any) -> Any:
    """Shardings for a state pytree: a leaf shaped like some param gets :func:`param_spec` of
    that shape (so a param, its mask and its moments share one sharding), any other leaf is
    replicated."""
    fsdp = mesh.shape["fsdp"]
    shapes = {tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params) if np.ndim(x)}

    def leaf(x):
        shape = tuple(np.shape(x))
        spec = param_spec(shape, fsdp) if shape in shapes else P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(leaf, abstract_state)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Split ``batch_dim`` of an ``ndim`` array over every device (``(data, fsdp)``)."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class OnMesh:
    """A jitted function called (and lowered) with ``mesh`` as JAX's context mesh
    (``jax.set_mesh``), so what it traces sees the mesh (``jax.sharding.get_abstract_mesh()``):
    the sparse kernel layers split their batch over it (:mod:`pallas_kernels.sharding`)."""

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jitted.lower`` under the mesh (for HLO checks)."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def check_batch(name: str, size: int, mesh: Mesh) -> None:
    """``ValueError`` naming the config key when ``size`` does not split over the mesh."""
    n = mesh.size
    if size % n:
        raise ValueError(f"config.{name} ({size}) must be a multiple of the mesh's {n} devices "
                         f"(mesh.data * mesh.fsdp = {mesh.shape['data']} * "
                         f"{mesh.shape['fsdp']})")


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full: each process transfers
    only the slices its own devices hold."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def init_sharded(init_fn, args: tuple[Any, ...], mesh: Mesh, params: Any) -> Any:
    """``init_fn(*args)`` evaluated under ``jit(out_shardings=...)``: shapes first
    (``jax.eval_shape``), then :func:`state_shardings`, then one compiled init, so no output
    (optimizer moments included) is ever materialised whole on one device. ``args`` are host
    arrays every process holds in full (replicated in)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(mesh, abstract, params)
    args = jax.tree_util.tree_map(lambda a: put(np.asarray(a), replicated(mesh)), args)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


class Distributed(NamedTuple):
    """Multi-host settings (config ``mesh.coordinator/num_processes/process_id``)."""

    coordinator: str = ""  # "host:port" of process 0; "" = from the environment, or single
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment


def check_distributed(d: Distributed) -> None:
    """``ValueError`` naming ``mesh.*`` for inconsistent multi-host settings."""
    if not isinstance(d.coordinator, str):
        raise ValueError(f"config.mesh.coordinator must be 'host:port' or '', got "
                         f"{d.coordinator!r}")
    if d.coordinator and (":" not in d.coordinator
                          or not d.coordinator.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"config.mesh.coordinator must look like 'host:port', got "
                         f"{d.coordinator!r}")
    if d.num_processes < 0:
        raise ValueError(f"config.mesh.num_processes must be >= 0 (0: from the environment), "
                         f"got {d.num_processes}")
    if d.process_id < -1:
        raise ValueError(f"config.mesh.process_id must be >= -1 (-1: from the environment), "
                         f"got {d.process_id}")
    if d.process_id >= 0 and d.num_processes and d.process_id >= d.num_processes:
        raise ValueError(f"config.mesh.process_id ({d.process_id}) must be < "
                         f"config.mesh.num_processes ({d.num_processes})")
    if d.coordinator and (d.num_processes == 0) != (d.process_id == -1):
        raise ValueError("config.mesh.num_processes and config.mesh.process_id must be set "
                         "together (or both left to the environment)")


def wanted(d: Distributed) -> bool:
    """Whether this process should join a multi-process job."""
    return bool(d.coordinator) or d.num_processes > 1 or any(v in os.environ for v in ENV_VARS)


def initialize(d: Distributed) -> bool:
    """``jax.distributed.initialize`` once, when the config or the environment asks for it;
    returns whether this process is part of a multi-process job. Must run before anything
    touches a device."""
    check_distributed(d)
    if not wanted(d):
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(
        coordinator_address=d.coordinator or None,
        num_processes=d.num_processes or None,
        process_id=None if d.process_id < 0 else d.process_id,
    )
    return True


def is_main() -> bool:
    """Process 0 writes the run dir's files (``metrics.jsonl``, ``summary.json``, wandb)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
