"""Run configs: the ``ConfigDict`` face of the run spec, argument parsing, validation.

The schema is :class:`sparsejax.run.spec.RunSpec` (typed, frozen sections); :func:`base` is
its defaults as a ConfigDict, which recipes in ``configs/`` start from and change (never adding
keys: validation rejects unknown ones). :func:`validate` checks a ConfigDict (types, ranges,
and what each mask method asks: :mod:`sparsejax.run.mask_methods`) and returns it as a
:class:`~sparsejax.run.spec.RunSpec`: the one place a config is read. Only entry points (the
CLI, :func:`sparsejax.run.experiment.run`, the sweep planner) hold a ConfigDict; everything
after them takes the spec's typed sections or explicit arguments.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import ml_collections

from sparsejax.errors import ConfigError, InputError
from sparsejax.models.options import ATTENTION, REMAT
from sparsejax.run import mask_methods
from sparsejax.run.spec import EvalSpec, RunSpec, _build

KEY_ALIASES = {"size": "model.size", "steps": "train.steps", "final": "sparsity.final"}
MAX_STEPS = 2**31 - 1  # the step counter is int32
# the final eval's default size (sparsejax.run.evaluation: val_loss_se ~0.3% on tiny)
FINAL_EVAL_BATCHES = EvalSpec().final_batches
# logging / placement only: resuming may change them
NON_RESULT_SECTIONS = ("wandb", "mesh", "resources")
# how the model computes, not what (same params tree, same results to float rounding): a run
# may resume with other values, and run dirs written before these keys existed still match
NON_RESULT_KEYS = ("model.attention", "model.remat", "model.scan")


def base() -> ml_collections.ConfigDict:
    """The full schema with defaults (a tiny dense model on the default corpus): the
    defaults of :class:`sparsejax.run.spec.RunSpec` as a ConfigDict."""
    return RunSpec().to_config()


def _coerce(old: Any, text: str) -> Any:
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a bool, got {text!r}")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    return text


def check_key(dotted: str) -> str:
    """``dotted`` if it names a leaf of the schema, else
    :class:`~sparsejax.errors.ConfigError` naming it (with the closest valid keys)."""
    keys = list(_flatten(base()))
    if dotted not in keys:
        close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else (
            f"valid keys: {', '.join(keys)}")
        raise ConfigError(f"unknown config key {dotted!r} ({hint})")
    return dotted


def set_key(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set ``config[dotted]`` (``"train.steps"``); strings are parsed to the key's type.

    Unknown keys raise :class:`~sparsejax.errors.ConfigError` naming the key."""
    dotted = check_key(KEY_ALIASES.get(dotted, dotted))
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    try:
        node[leaf] = _coerce(node[leaf], value) if isinstance(value, str) else value
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key {dotted!r}: {e}") from None


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply ``"key=val,key2=val2"`` (dotted keys, or the aliases ``size``, ``steps`` and
    ``final`` for ``sparsity.final``) to ``config``; unknown keys raise
    :class:`~sparsejax.errors.ConfigError`."""
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} must look like key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        set_key(config, key, value)
    return config


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, ml_collections.ConfigDict | dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_defaults(stored: dict[str, Any]) -> ml_collections.ConfigDict:
    """A run's stored config (its ``config.json``) on top of :func:`base`: keys the schema
    gained after the run was written take their defaults, which for model keys reproduce what
    the run built (``model.sparse_ift`` absent = no Sparse-IFT), so older run dirs still load
    and fine-tune. Stored keys the schema no longer has are dropped (no code reads them)."""
    c = base()

    def overlay(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str) -> None:
        for k, v in values.items():
            section = isinstance(node.get(k), ml_collections.ConfigDict)
            if isinstance(v, dict) and section:
                overlay(node[k], v, f"{prefix}{k}.")
            elif section:
                raise InputError(f"{prefix}{k} must be an object (a config section), got {v!r}")
            elif k in node:
                node[k] = v

    overlay(c, stored, "")
    return c


def stored_spec(stored: Any, where: str) -> RunSpec:
    """The :class:`RunSpec` of a run's stored config (:func:`with_defaults`, then
    :func:`validate`); :class:`~sparsejax.errors.InputError` naming ``where`` (the file) and
    the key when it is not a config (not an object, a section that is not one) or fails
    validation."""
    if not isinstance(stored, dict):
        raise InputError(f"{where}: expected a JSON object (a run's config), got "
                         f"{type(stored).__name__}")
    try:
        return validate(with_defaults(stored))
    except (ConfigError, InputError, TypeError, AttributeError) as e:
        raise InputError(f"{where}: {e}") from None


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``config.to_dict()`` or a
    run's ``config.json``), present in only one counting as differing; keys under
    ``NON_RESULT_SECTIONS`` (logging only) and ``NON_RESULT_KEYS`` are ignored."""
    a, b = _flatten(old), _flatten(new)
    defaults = _flatten(base().to_dict())
    for flat in (a, b):  # a run dir written before the key existed ran as its default
        for k in defaults:
            if k in ADDED_KEYS or k.startswith(tuple(p + "." for p in ADDED_KEYS)):
                flat.setdefault(k, defaults[k])
    return sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] not in NON_RESULT_SECTIONS and k not in NON_RESULT_KEYS
                  and a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()

# Keys (or sections) added after run dirs were written whose default reproduces those runs
# exactly: a stored config without the key reads as its default in :func:`base` (so such runs
# still resume). A key whose default changes results (e.g. ``eval.seed``) must not be listed:
# it stays a difference.
ADDED_KEYS: tuple[str, ...] = (
    "data.vocab_size",  # 0: the vocab from the data, as before
    "sparsity.pooling", "sparsity.acdc",  # read only by the block and acdc methods, added with them
    "sparsity.packed_masks",  # False: bool masks, as before (packing is bit-exact anyway)
)


_need = mask_methods.need  # ConfigError("config.KEY must be EXPECTED, got VALUE")


ENUMS = {
    "model.pos": ("rope", "learned"),
    "model.dtype": ("float32", "bfloat16"),
    "model.linear": ("dense", "bsr", "nm"),
    "model.attention": ATTENTION,
    "model.remat": REMAT,
    "model.sparse_ift.family": ("", "wide", "parallel", "factorized", "doped"),
    "sparsity.decay_kind": ("linear", "exp"),
    "sparsity.pattern": ("stepwise", "geometric"),
    "sparsity.schedule": ("window", "polynomial", "geometric", "constant"),
    "sparsity.by": ("compute", "steps"),
    "sparsity.kind": ("geometric", "polynomial"),
    "sparsity.score": ("magnitude", "random", "saliency"),
    "sparsity.allocation": ("global", "uniform", "erk", "er"),
    "sparsity.pooling": ("l2", "max"),
    "wandb.mode": ("offline", "online", "disabled"),
    "finetune.mode": ("sparse", "dense"),
    "finetune.distill": ("", "squarehead"),
    "soup.select": ("greedy", "uniform"),
}
POSITIVE_INTS = ("model.n_ctx", "model.block", "train.steps", "train.batch_size", "train.seq_len",
                 "train.log_every", "eval.every", "eval.batches", "eval.batch_size",
                 "eval.final_batches",
                 "checkpoint.every", "checkpoint.keep", "sparsity.update_every", "sparsity.m",
                 "sparsity.n",  # 0 of every M kept would train an all-zero model
                 "sparsity.frames", "soup.ingredients", "soup.cycles")
NON_NEGATIVE_INTS = ("seed", "eval.seed", "train.warmup_steps", "sparsity.begin_step",
                     "sparsity.end_step", "data.vocab_size")


def validate(config: ml_collections.ConfigDict | dict[str, Any]) -> RunSpec:
    """Check ``config`` and return it as a :class:`~sparsejax.run.spec.RunSpec`.

    Fails fast on unknown or missing keys, wrong types and values out of range, and on what
    the chosen mask method asks (:mod:`sparsejax.run.mask_methods`), raising
    :class:`~sparsejax.errors.ConfigError` naming the key and the valid range."""
    schema = _flatten(base())
    got = _flatten(config)
    unknown = sorted(set(got) - set(schema))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; see sparsejax.run.configlib.base()")
    missing = sorted(set(schema) - set(got))
    if missing:
        raise ConfigError(f"missing config key(s) {missing}")
    _check_types(got, schema)
    for key, valid in {**ENUMS, "sparsity.method": mask_methods.names()}.items():
        _need(got[key] in valid, key, f"one of {valid}", got[key])
    for key in POSITIVE_INTS:
        _need(got[key] >= 1, key, "an int >= 1", got[key])
    for key in NON_NEGATIVE_INTS:
        _need(got[key] >= 0, key, "an int >= 0", got[key])
    _validate_mesh(got)
    for key, low in (("resources.cpus", "> 0"), ("resources.gpus", ">= 0")):
        v = got[key]
        _need(v > 0 if low == "> 0" else v >= 0, key, f"a finite float {low} (per run, for Ray)",
              v)
    _validate_finetune(got)
    _validate_train(got)
    _validate_sparse_ift(got)
    _validate_model(got)
    spec = _build(RunSpec, config.to_dict() if isinstance(config, ml_collections.ConfigDict)
                  else config)
    _validate_sparsity(spec)
    return spec


def _check_types(got: dict[str, Any], schema: dict[str, Any]) -> None:
    """Every value has its default's type (an int may stand for a float; floats finite)."""
    for key, default in schema.items():
        v = got[key]
        if isinstance(default, bool):
            _need(isinstance(v, bool), key, "a bool", v)
        elif isinstance(default, int):
            _need(isinstance(v, int) and not isinstance(v, bool), key, "an int", v)
        elif isinstance(default, float):
            _need(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
                  key, "a finite float", v)
        elif isinstance(default, str):
            _need(isinstance(v, str), key, "a string", v)


def _validate_train(got: dict[str, Any]) -> None:
    _need(got["eval.final_batches"] * got["eval.batch_size"] >= 2, "eval.final_batches",
          "an int with eval.final_batches * eval.batch_size >= 2 (the standard error of the "
          "final loss needs 2 sequences)", got["eval.final_batches"])
    _need(got["train.steps"] <= MAX_STEPS, "train.steps", f"<= {MAX_STEPS} (int32 step counter)",
          got["train.steps"])
    for key in ("train.weight_decay", "train.grad_clip"):
        _need(got[key] >= 0, key, "a float >= 0", got[key])
    _need(0 < got["train.lr"], "train.lr", "a finite float > 0", got["train.lr"])
    for key in ("train.b1", "train.b2"):
        _need(0 <= got[key] < 1, key, "a float in [0, 1)", got[key])
    _need(0 <= got["train.min_lr_ratio"] <= 1, "train.min_lr_ratio", "in [0, 1]",
          got["train.min_lr_ratio"])
    _need(0 < got["data.val_fraction"] < 1, "data.val_fraction", "in (0, 1)",
          got["data.val_fraction"])
    _need(got["train.seq_len"] <= got["model.n_ctx"], "train.seq_len",
          f"<= model.n_ctx ({got['model.n_ctx']})", got["train.seq_len"])
    _need(got["train.warmup_steps"] < got["train.steps"], "train.warmup_steps",
          f"< train.steps ({got['train.steps']})", got["train.warmup_steps"])


def _validate_sparsity(spec: RunSpec) -> None:
    """The ``sparsity.*`` ranges shared by every method, then the method's own check
    (:data:`sparsejax.run.mask_methods.REGISTRY`)."""
    s, steps = spec.sparsity, spec.train.steps
    _need(0 <= s.final < 1, "sparsity.final", "a float in [0, 1)", s.final)
    _need(s.n <= s.m, "sparsity.n", "<= sparsity.m", s.n)
    _need(0 <= s.warmup < s.hard_from <= 1, "sparsity.warmup/hard_from",
          "0 <= warmup < hard_from <= 1 (fractions of steps)", (s.warmup, s.hard_from))
    _need(s.decay >= 0, "sparsity.decay", "a float >= 0 (SR-STE's lambda_W)", s.decay)
    _need(0 < s.drop_fraction <= 1, "sparsity.drop_fraction", "in (0, 1]", s.drop_fraction)
    _need(0 < s.dense_from <= 1, "sparsity.dense_from",
          "a fraction of train.steps in (0, 1] (SPDF's switch to dense; 1: never)", s.dense_from)
    _need(0 <= s.start < s.end <= 1, "sparsity.start/end", "0 <= start < end <= 1",
          (s.start, s.end))
    if spec.model.linear == "bsr":  # block-sparse kernels: a static random block mask
        _need(s.method == "static" and s.score == "random", "model.linear",
              "'dense' unless sparsity.method='static' with score='random' (the BSR layers "
              "hold a static random block mask)", spec.model.linear)
    if spec.model.linear == "nm":  # N:M kernels: a static N:M mask chosen by magnitude at init
        _need(s.method == "nm" and s.score == "magnitude", "model.linear",
              "'dense' unless sparsity.method='nm' with score='magnitude' (the N:M layers hold "
              "a static sparsity.n:sparsity.m mask, the largest initial weights)",
              spec.model.linear)
        _need(1 <= s.n < s.m, "sparsity.n", f"in [1, sparsity.m) = [1, {s.m}) for N:M layers",
              s.n)
    if s.method == "dense":
        _need(s.dense_from == 1, "sparsity.dense_from",
              "1 unless a static or gradual method masks dense layers", s.dense_from)
        return
    entry = mask_methods.REGISTRY[s.method]
    if s.dense_from < 1:
        spdf = tuple(n for n, e in mask_methods.REGISTRY.items() if e.spdf)
        _need(entry.spdf and spec.model.linear == "dense", "sparsity.dense_from",
              f"1 unless a method of {spdf} masks dense layers", s.dense_from)
        _need(round(s.dense_from * steps) >= 1, "sparsity.dense_from",
              "a fraction that leaves >= 1 sparse step", s.dense_from)
    if entry.trains_final:
        _need(s.final > 0, "sparsity.final", "> 0 for a sparse method", s.final)
    if entry.check is not None:
        entry.check(spec)


def _validate_mesh(got: dict[str, Any]) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("mesh.data", "mesh.fsdp"):
        _need(is_int(got[key]) and (got[key] == -1 or got[key] >= 1), key,
              "-1 (the devices the other axis leaves) or an int >= 1", got[key])
    _need(not (got["mesh.data"] == -1 and got["mesh.fsdp"] == -1), "mesh.data/fsdp",
          "at most one -1", (got["mesh.data"], got["mesh.fsdp"]))
    n, pid, coord = got["mesh.num_processes"], got["mesh.process_id"], got["mesh.coordinator"]
    _need(is_int(n) and n >= 0, "mesh.num_processes", "an int >= 0 (0: from the environment)", n)
    _need(is_int(pid) and pid >= -1, "mesh.process_id", "an int >= -1 (-1: from the environment)",
          pid)
    _need(isinstance(coord, str) and (coord == "" or (":" in coord and coord.rsplit(":", 1)[1]
                                                       .isdigit())),
          "mesh.coordinator", "'host:port' or '' (from the environment)", coord)
    if pid >= 0 and n:
        _need(pid < n, "mesh.process_id", f"< mesh.num_processes ({n})", pid)
    if coord:
        _need((n == 0) == (pid == -1), "mesh.num_processes/process_id",
              "both set or both left to the environment (0 / -1)", (n, pid))


def _validate_finetune(got: dict[str, Any]) -> None:
    for key in ("init_from", "finetune.teacher"):
        _need(isinstance(got[key], str), key, "a run dir path (a str; '' = none)", got[key])
    for key in ("init_from_step", "finetune.teacher_step"):
        v = got[key]
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= -1, key,
              "a checkpoint step (an int >= 0, or -1 for the latest)", v)
    if got["init_from"]:
        _need(got["sparsity.method"] == "dense", "sparsity.method",
              "'dense' with init_from (the masks come from the init_from run: "
              "finetune.mode='sparse' keeps them, 'dense' frees them)", got["sparsity.method"])
    for key in ("finetune.h_ce", "finetune.h_kl", "finetune.h_sq", "finetune.temperature",
                "soup.prune_fraction"):
        v = got[key]
        _need(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
              and v >= 0, key, "a finite float >= 0", v)
    _need(got["finetune.temperature"] > 0, "finetune.temperature", "a float > 0",
          got["finetune.temperature"])
    if got["finetune.distill"]:
        _need(bool(got["finetune.teacher"]), "finetune.teacher",
              "a dense run dir when finetune.distill is set", got["finetune.teacher"])
    _need(got["soup.prune_fraction"] < 1, "soup.prune_fraction",
          "a fraction in [0, 1) of the remaining weights pruned before each soup cycle after "
          "the first", got["soup.prune_fraction"])
    if got["soup.cycles"] > 1:
        _need(got["soup.prune_fraction"] > 0, "soup.prune_fraction",
              "> 0 when soup.cycles > 1 (each further cycle prunes the soup again)",
              got["soup.prune_fraction"])


def _validate_model(got: dict[str, Any]) -> None:
    """Combinations of the accelerator keys (``model.attention``, ``model.scan``) that cannot
    run; the head dim is checked where ``model.size`` is decoded (``run.build.blueprint``) and
    the device when the model runs."""
    _need(not (got["model.attention"] == "cudnn" and got["model.dtype"] == "float32"),
          "model.attention/model.dtype", "'auto' or 'xla' with model.dtype='float32' (cuDNN "
          "flash attention computes in bfloat16)", (got["model.attention"], got["model.dtype"]))
    _need(not (got["model.scan"] and got["model.linear"] == "bsr"), "model.scan/model.linear",
          "False with model.linear='bsr' (each BSR layer holds its own static block layout, "
          "so the blocks cannot be stacked into one scan)", (got["model.scan"],
                                                            got["model.linear"]))


def _validate_sparse_ift(got: dict[str, Any]) -> None:
    """Sparse-IFT: the mask method's sparsity is the transformation's ``s``, held constant."""
    family, s = got["model.sparse_ift.family"], got["model.sparse_ift.sparsity"]
    _need(0 <= s < 1, "model.sparse_ift.sparsity", "a float in [0, 1)", s)
    if not family:
        _need(s == 0, "model.sparse_ift.sparsity", "0.0 unless model.sparse_ift.family is set",
              s)
        return
    if s == 0:
        _need(got["sparsity.method"] == "dense", "sparsity.method",
              "'dense' for a Sparse-IFT model at model.sparse_ift.sparsity=0",
              got["sparsity.method"])
        return
    constant = tuple(n for n, e in mask_methods.REGISTRY.items() if e.constant)
    _need(got["sparsity.method"] in constant, "sparsity.method",
          f"one of {constant} for a Sparse-IFT model (constant sparsity keeps it iso-FLOP)",
          got["sparsity.method"])
    _need(got["sparsity.final"] == s, "sparsity.final",
          f"model.sparse_ift.sparsity ({s}): the mask method trains the sparse parts at the "
          "Sparse-IFT sparsity", got["sparsity.final"])
