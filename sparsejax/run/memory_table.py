"""A :class:`~sparsejax.run.memory.MemoryPlan` as a table against an accelerator's memory
(``sparsejax plan-memory``): the devices it knows, their memory in the units their makers
state (GB = 1e9 bytes for GPUs, GiB = 2**30 bytes for TPUs), and the verdict."""

from __future__ import annotations

from typing import NamedTuple

from sparsejax.errors import InputError
from sparsejax.run.memory import MemoryPlan
from sparsejax.run.spec import RunSpec

GB, GIB = 10**9, 2**30


class Device(NamedTuple):
    """An accelerator's memory: ``bytes`` and the unit its maker states it in."""

    name: str
    bytes: int
    unit: str  # "GB" or "GiB"
    gpu: bool = False

    @property
    def stated(self) -> str:
        scale = GB if self.unit == "GB" else GIB
        return f"{self.bytes / scale:g} {self.unit}"


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100", 80 * GB, "GB", gpu=True),
    Device("h200", 141 * GB, "GB", gpu=True),
    Device("a100-40", 40 * GB, "GB", gpu=True),
    Device("a100-80", 80 * GB, "GB", gpu=True),
    Device("b200", 192 * GB, "GB", gpu=True),
    Device("v4", 32 * GIB, "GiB"),
    Device("v5e", 16 * GIB, "GiB"),
    Device("v5p", 95 * GIB, "GiB"),
    Device("v6e", 32 * GIB, "GiB"),
)}


def device(name: str) -> Device:
    """A name of :data:`DEVICES` (case-insensitive) or a number of bytes;
    :class:`~sparsejax.errors.InputError` otherwise."""
    key = name.strip().lower()
    if key in DEVICES:
        return DEVICES[key]
    if key.isdigit() and int(key) > 0:
        return Device(f"{int(key)} bytes", int(key), "GB")
    raise InputError(f"--device must be one of {', '.join(DEVICES)} or a number of bytes > 0, "
                     f"got {name!r}")


def _size(n: int, unit: str) -> str:
    return f"{n / (GB if unit == 'GB' else GIB):10.2f}"


def describe(spec: RunSpec, n_params: int) -> str:
    """One line: the model and batch a plan is for."""
    m, t = spec.model, spec.train
    remat = getattr(m, "remat", None)  # model.remat, where the schema has it
    return (f"model {m.size} ({n_params / 1e6:,.1f}M params), linear={m.linear}, "
            f"dtype={m.dtype}" + (f", remat={remat}" if remat is not None else "")
            + f", sparsity.method={spec.sparsity.method}, batch {t.batch_size} x {t.seq_len} "
            "tokens")


def table(plan: MemoryPlan, dev: Device, spec: RunSpec) -> str:
    """The plan's parts, its peak and the verdict against ``dev``; ``spec``: the run planned."""
    u = dev.unit
    s = plan.state
    other = plan.arguments - s.params - s.opt_state - s.masks
    backend = f"XLA:{plan.platform.upper()}"
    rows = [
        ("arguments", plan.arguments),
        ("  params", s.params),
        ("  optimizer state (Adam moments, ...)", s.opt_state),
        ("  masks", s.masks),
        ("  batch, step counters, rng", other),
        ("temporaries (activations, gradients, workspace)", plan.temporaries),
        ("outputs not aliased to the donated state", plan.outputs - plan.aliases),
        ("generated code", plan.generated_code),
        ("peak = arguments + temporaries + outputs - aliases + code", plan.peak),
    ]
    width = max(len(r[0]) for r in rows)
    bf16_on_cpu = plan.platform == "cpu" and spec.model.dtype == "bfloat16"
    lines = [
        f"memory of one train step, per device: {describe(spec, plan.n_params)}",
        f"{backend}'s compiled plan of the same program (compiled here in "
        f"{plan.compile_s:.1f} s), an estimate of the accelerator's: fusion and layouts differ"
        + ("; XLA:CPU keeps some bf16 intermediates in f32" if bf16_on_cpu else ""),
        "",
        f"  {'part':<{width}} {u:>10}",
        *(f"  {name:<{width}} {_size(n, u)}" for name, n in rows),
        f"  not in the sum: the activations autodiff saves for the backward pass (jaxpr, before "
        f"XLA fuses, in the compute dtype): {_size(plan.residuals, u).strip()} {u}",
        "",
        verdict(plan.peak, dev),
    ]
    if dev.gpu:
        lines.append("  (JAX's GPU client may use only a fraction of it: XLA_CLIENT_MEM_FRACTION;"
                     " `sparsejax train` checks the limit the device reports)")
    return "\n".join(lines)


def verdict(peak: int, dev: Device) -> str:
    """``fits`` with the headroom, or ``does NOT fit`` with the excess."""
    scale = GB if dev.unit == "GB" else GIB
    room = dev.bytes - peak
    if room >= 0:
        return (f"device {dev.name} ({dev.stated}): fits, headroom {room / scale:.2f} "
                f"{dev.unit} ({room / dev.bytes:.0%})")
    return (f"device {dev.name} ({dev.stated}): does NOT fit, {-room / scale:.2f} {dev.unit} "
            f"over ({peak / dev.bytes:.2f}x its memory)")
