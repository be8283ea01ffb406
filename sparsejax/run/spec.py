"""The run spec: a run's config as typed, frozen sections, read once at the entry point.

These dataclasses are the schema. :func:`sparsejax.run.configlib.base` is their defaults as
an ``ml_collections.ConfigDict`` (what recipes in ``configs/`` start from and the command line
overrides); :func:`sparsejax.run.configlib.validate` checks such a ConfigDict (unknown keys,
types and ranges, each error naming the key) and returns it as a :class:`RunSpec`.
Everything past the entry points (the CLI, :func:`sparsejax.run.experiment.run`, the sweep
planner) reads the spec's typed fields, never a ConfigDict. :meth:`RunSpec.to_dict` is what
``config.json`` holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import ml_collections


class _Section:
    """``to_dict`` for a spec section (nested sections become nested dicts)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclasses.dataclass(frozen=True)
class SparseIFTSpec(_Section):
    """Sparse-IFT (:mod:`sparsejax.models.sparse_ift`; Thangarasa et al. 2023)."""

    family: str = ""  # "" (none), wide, parallel, factorized, doped
    sparsity: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Section):
    size: str = "tiny"  # a GPT variant (sparsejax.models.gpt.VARIANTS) or "LxD[xFF]"
    n_ctx: int = 128
    pos: str = "rope"  # rope | learned
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    linear: str = "dense"  # dense | bsr | nm (block-sparse / N:M kernels, pallas_kernels)
    block: int = 32  # BSR block size (CPU default; configs/gpt_accel.py uses 128 on GPU/TPU)
    sparse_ift: SparseIFTSpec = SparseIFTSpec()
    # how the model computes, never its params (sparsejax.models.attention / .stack):
    attention: str = "auto"  # auto (cuDNN flash attention where it runs, else XLA) | xla | cudnn
    remat: str = "none"  # per block: none | full | dots_saveable | dots_with_no_batch_dims_saveable
    scan: bool = False  # one lax.scan over the blocks: compile time independent of depth


@dataclasses.dataclass(frozen=True)
class DataSpec(_Section):
    # "" = the built-in corpus; a text file/dir, a uint16 token .bin or a prepared folder
    # (sparsejax data prepare)
    source: str = ""
    cache_dir: str = ""
    val_fraction: float = 0.05
    vocab_size: int = 0  # 0 = the data's (256 bytes, a prepared folder's, a .bin's max + 1)


@dataclasses.dataclass(frozen=True)
class TrainSpec(_Section):
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class EvalSpec(_Section):
    """``batches``: the cheap periodic eval; ``final_batches``: the final score, sized for a
    standard error <= 0.2% (:mod:`sparsejax.run.evaluation`); ``seed`` draws both, never the
    run's seed."""

    every: int = 100
    batches: int = 4
    batch_size: int = 16
    # x batch_size 16 = 3,840 windows of 128 tokens, nearly every disjoint one of the default
    # validation split: val_loss_se ~0.3% (measured, tiny)
    final_batches: int = 240
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class AcdcSpec(_Section):
    """AC/DC's phases in steps (:func:`sparsejax.methods.acdc`; Peste et al. 2021): a dense
    warm-up, alternating sparse and dense phases, a final sparse fine-tune of
    ``finetune_steps`` ending the run."""

    warmup_steps: int = 30
    dense_steps: int = 30
    sparse_steps: int = 30
    finetune_steps: int = 60


@dataclasses.dataclass(frozen=True)
class SparsitySpec(_Section):
    """The mask method and its settings; which keys a method reads is declared where it is
    registered (:mod:`sparsejax.run.mask_methods`)."""

    method: str = "dense"
    final: float = 0.0
    schedule: str = "window"
    start: float = 0.25
    end: float = 0.75
    by: str = "compute"
    kind: str = "geometric"
    begin_step: int = 0
    end_step: int = 0
    update_every: int = 10
    score: str = "magnitude"
    allocation: str = "global"
    power_scale: float = 1.0
    dense_from: float = 1.0
    # N:M family (nm, ste, sr_ste, mdgf, sdgf) and dynamic sparse training (set, rigl)
    n: int = 2
    m: int = 4
    warmup: float = 0.0
    hard_from: float = 1.0
    decay: float = 2e-4
    alpha: float = 0.0
    decay_kind: str = "linear"
    frames: int = 4
    pattern: str = "stepwise"
    drop_fraction: float = 0.3
    # block (its block is model.block, square: what `sparsejax export --format bsr` reads)
    pooling: str = "l2"
    acdc: AcdcSpec = AcdcSpec()
    packed_masks: bool = False  # masks bit-packed in the optimizer state (sparsify's option)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec(_Section):
    every: int = 100
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class FinetuneSpec(_Section):
    """Fine-tuning from a run dir (SPDF across runs; Thangarasa et al. 2023) and SquareHead
    distillation (Kurtic et al. 2023)."""

    mode: str = "sparse"  # sparse: keep init_from's masks; dense: every weight trains
    distill: str = ""  # "" | squarehead
    teacher: str = ""
    teacher_step: int = -1
    h_ce: float = 1.0
    h_kl: float = 1.0
    h_sq: float = 1.0
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class SoupSpec(_Section):
    """Sparse model soups (Zimmer et al. 2023)."""

    ingredients: int = 3
    select: str = "greedy"
    cycles: int = 1
    prune_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class WandbSpec(_Section):
    enabled: bool = False
    project: str = "sparsejax"
    mode: str = "offline"
    name: str = ""
    group: str = ""


@dataclasses.dataclass(frozen=True)
class MeshSpec(_Section):
    """Device mesh ``(data, fsdp)``; -1: the devices the other axis leaves. Multi-host:
    ``coordinator`` "host:port" of process 0 with ``num_processes``/``process_id``, or ""/0/-1
    to take them from the environment (JAX_COORDINATOR_ADDRESS, SLURM, TPU pods)."""

    data: int = -1
    fsdp: int = 1
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class ResourcesSpec(_Section):
    """What one run of a sweep asks of a Ray cluster (``sparsejax sweep --backend ray``)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunSpec(_Section):
    """A whole run's settings (module docstring)."""

    seed: int = 0
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    sparsity: SparsitySpec = SparsitySpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    init_from: str = ""  # run dir whose weights (and masks) start this run; "" = from scratch
    init_from_step: int = -1  # its checkpoint step; -1 = latest
    finetune: FinetuneSpec = FinetuneSpec()
    soup: SoupSpec = SoupSpec()
    wandb: WandbSpec = WandbSpec()
    mesh: MeshSpec = MeshSpec()
    resources: ResourcesSpec = ResourcesSpec()

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with top-level fields (or whole sections) replaced."""
        return dataclasses.replace(self, **changes)

    def to_config(self) -> ml_collections.ConfigDict:
        """The spec as a ConfigDict (for recipes and the sweep planner's overrides)."""
        return ml_collections.ConfigDict(self.to_dict())


S = TypeVar("S")


def _build(cls: type[S], values: dict[str, Any]) -> S:
    """``cls`` from a validated dict: nested sections built recursively, numbers coerced to
    the field's declared type (a config may say ``lr=1`` for a float field)."""
    kwargs = {}
    defaults = cls()
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = values[field.name]
        default = getattr(defaults, field.name)
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value)
        elif isinstance(default, float) and not isinstance(value, bool):
            value = float(value)
        kwargs[field.name] = value
    return cls(**kwargs)
