"""Run configs: the ``ConfigDict`` schema shared by every recipe, argument parsing, validation.

Only entry points (the CLI, :func:`sparsejax.run.experiment.build`) read a ConfigDict; library
functions take explicit arguments. Recipes in ``configs/`` start from :func:`base` and change
values, never add keys: the base schema is the contract, and validation rejects unknown keys.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

import ml_collections

KEY_ALIASES = {"size": "model.size", "steps": "train.steps", "final": "sparsity.final"}
MAX_STEPS = 2**31 - 1  # the step counter is int32
# x eval.batch_size 16 = 3,840 windows of 128 tokens, nearly every disjoint one of the default
# validation split: val_loss_se ~0.3% (measured, tiny); the recipes in configs/sweeps/ reach
# 0.2% with data.val_fraction=0.2 and 768 batches (sparsejax.run.evaluation)
FINAL_EVAL_BATCHES = 240
# logging / placement only: resuming may change them
NON_RESULT_SECTIONS = ("wandb", "mesh", "resources")
WINDOW_SOLVE_BYTES_PER_STEP = 24  # measured peak ~19.2 B/step (sparsity.by="compute" solve)


def base() -> ml_collections.ConfigDict:
    """The full schema with defaults (a tiny dense model on the default corpus)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(size="tiny", n_ctx=128, pos="rope", tie_embeddings=True, dtype="float32",
                   linear="dense", block=32,
                   # Sparse-IFT (sparsejax.models.sparse_ift): "" (none), wide, parallel,
                   # factorized, doped
                   sparse_ift=dict(family="", sparsity=0.0))
    c.data = dict(source="", cache_dir="", val_fraction=0.05)
    c.train = dict(
        steps=300, batch_size=16, seq_len=128, lr=3e-3, min_lr_ratio=0.1, warmup_steps=30,
        weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, log_every=10,
    )
    # eval.batches: the cheap periodic eval; eval.final_batches: the final score, sized for a
    # standard error <= 0.2% (sparsejax.run.evaluation); eval.seed draws both, never the run's seed
    c.eval = dict(every=100, batches=4, batch_size=16, final_batches=FINAL_EVAL_BATCHES, seed=0)
    c.sparsity = dict(
        method="dense", final=0.0, schedule="window", start=0.25, end=0.75, by="compute",
        kind="geometric", begin_step=0, end_step=0, update_every=10, score="magnitude",
        allocation="global", power_scale=1.0, dense_from=1.0,
        # N:M family (nm, ste, sr_ste, mdgf, sdgf) and dynamic sparse training (set, rigl)
        n=2, m=4, warmup=0.0, hard_from=1.0, decay=2e-4, alpha=0.0, decay_kind="linear",
        frames=4, pattern="stepwise", drop_fraction=0.3,
    )
    c.checkpoint = dict(every=100, keep=3)
    # fine-tuning from a run dir (SPDF across runs; Thangarasa et al. 2023), SquareHead
    # distillation (Kurtic et al. 2023) and sparse model soups (Zimmer et al. 2023)
    c.init_from = ""  # run dir whose weights (and masks) start this run; "" = from scratch
    c.init_from_step = -1  # its checkpoint step; -1 = latest
    c.finetune = dict(mode="sparse", distill="", teacher="", teacher_step=-1, h_ce=1.0,
                      h_kl=1.0, h_sq=1.0, temperature=1.0)
    c.soup = dict(ingredients=3, select="greedy", cycles=1, prune_fraction=0.0)
    c.wandb = dict(enabled=False, project="sparsejax", mode="offline", name="", group="")
    # Device mesh (data, fsdp); -1: the devices the other axis leaves. Multi-host: coordinator
    # "host:port" of process 0 with num_processes/process_id, or ""/0/-1 to take them from the
    # environment (JAX_COORDINATOR_ADDRESS, SLURM, TPU pods); a single process otherwise.
    c.mesh = dict(data=-1, fsdp=1, coordinator="", num_processes=0, process_id=-1)
    # What one run of a sweep asks of a Ray cluster (sparsejax sweep --backend ray)
    c.resources = dict(cpus=1.0, gpus=0.0)
    return c


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
    """``dotted`` if it names a leaf of the schema, else ``ValueError`` naming it (with the
    closest valid keys)."""
    keys = list(_flatten(base()))
    if dotted not in keys:
        close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else (
            f"valid keys: {', '.join(keys)}")
        raise ValueError(f"unknown config key {dotted!r} ({hint})")
    return dotted


def set_key(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set ``config[dotted]`` (``"train.steps"``); strings are parsed to the key's type.

    Unknown keys raise ``ValueError`` naming the key."""
    dotted = check_key(KEY_ALIASES.get(dotted, dotted))
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    try:
        node[leaf] = _coerce(node[leaf], value) if isinstance(value, str) else value
    except (ValueError, TypeError) as e:
        raise ValueError(f"config key {dotted!r}: {e}") from None


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply ``"key=val,key2=val2"`` (dotted keys, or the aliases ``size``, ``steps`` and
    ``final`` for ``sparsity.final``) to ``config``; unknown keys raise ``ValueError``."""
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"config argument {item!r} must look like key=value")
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
    and fine-tune. Stored keys the schema no longer has are kept."""
    c = base()

    def overlay(node: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(node.get(k), ml_collections.ConfigDict):
                overlay(node[k], v)
            else:
                node[k] = v

    overlay(c, stored)
    return c


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``config.to_dict()`` or a
    run's ``config.json``), present in only one counting as differing; keys under
    ``NON_RESULT_SECTIONS`` (logging only) are ignored."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] not in NON_RESULT_SECTIONS and a.get(k, _MISSING) != b.get(
                      k, _MISSING))


_MISSING = object()


def _need(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"config.{key} must be {expected}, got {value!r}")


ENUMS = {
    "model.pos": ("rope", "learned"),
    "model.dtype": ("float32", "bfloat16"),
    "model.linear": ("dense", "bsr"),
    "model.sparse_ift.family": ("", "wide", "parallel", "factorized", "doped"),
    "sparsity.method": ("dense", "gradual", "static", "nm", "ste", "sr_ste", "mdgf", "sdgf",
                        "set", "rigl"),
    "sparsity.decay_kind": ("linear", "exp"),
    "sparsity.pattern": ("stepwise", "geometric"),
    "sparsity.schedule": ("window", "polynomial", "geometric", "constant"),
    "sparsity.by": ("compute", "steps"),
    "sparsity.kind": ("geometric", "polynomial"),
    "sparsity.score": ("magnitude", "random", "saliency"),
    "sparsity.allocation": ("global", "uniform", "erk", "er"),
    "wandb.mode": ("offline", "online", "disabled"),
    "finetune.mode": ("sparse", "dense"),
    "finetune.distill": ("", "squarehead"),
    "soup.select": ("greedy", "uniform"),
}
POSITIVE_INTS = ("model.n_ctx", "model.block", "train.steps", "train.batch_size", "train.seq_len",
                 "train.log_every", "eval.every", "eval.batches", "eval.batch_size",
                 "eval.final_batches",
                 "checkpoint.every", "checkpoint.keep", "sparsity.update_every", "sparsity.m",
                 "sparsity.frames", "soup.ingredients", "soup.cycles")
NON_NEGATIVE_INTS = ("seed", "eval.seed", "train.warmup_steps", "sparsity.begin_step",
                     "sparsity.end_step", "sparsity.n")


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail fast on unknown keys and bad values, naming the key and the valid range."""
    schema = _flatten(base())
    got = _flatten(config)
    unknown = sorted(set(got) - set(schema))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; see sparsejax.run.configlib.base()")
    missing = sorted(set(schema) - set(got))
    if missing:
        raise ValueError(f"missing config key(s) {missing}")
    for key, valid in ENUMS.items():
        _need(got[key] in valid, key, f"one of {valid}", got[key])
    for key in POSITIVE_INTS:
        v = got[key]
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, "an int >= 1", v)
    for key in NON_NEGATIVE_INTS:
        v = got[key]
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, key, "an int >= 0", v)
    _validate_mesh(got)
    for key, low in (("resources.cpus", "> 0"), ("resources.gpus", ">= 0")):
        v = got[key]
        _need(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
              and (v > 0 if low == "> 0" else v >= 0), key,
              f"a finite float {low} (per run, for Ray)", v)
    _validate_finetune(got)
    _need(got["eval.final_batches"] * got["eval.batch_size"] >= 2, "eval.final_batches",
          "an int with eval.final_batches * eval.batch_size >= 2 (the standard error of the "
          "final loss needs 2 sequences)", got["eval.final_batches"])
    _need(isinstance(got["wandb.group"], str), "wandb.group", "a string", got["wandb.group"])
    _need(got["train.steps"] <= MAX_STEPS, "train.steps", f"<= {MAX_STEPS} (int32 step counter)",
          got["train.steps"])
    for key in ("train.lr", "train.b1", "train.b2", "train.weight_decay", "train.grad_clip",
                "train.min_lr_ratio", "data.val_fraction", "sparsity.final", "sparsity.start",
                "sparsity.end", "sparsity.power_scale", "sparsity.dense_from", "sparsity.warmup",
                "sparsity.hard_from", "sparsity.decay", "sparsity.alpha",
                "sparsity.drop_fraction", "model.sparse_ift.sparsity"):
        v = got[key]
        _need(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v), key,
              "a finite float", v)
    for key in ("train.weight_decay", "train.grad_clip"):
        _need(got[key] >= 0, key, "a float >= 0", got[key])
    _need(0 < got["train.lr"], "train.lr", "a finite float > 0", got["train.lr"])
    for key in ("train.b1", "train.b2"):
        _need(0 <= got[key] < 1, key, "a float in [0, 1)", got[key])
    _need(0 <= got["train.min_lr_ratio"] <= 1, "train.min_lr_ratio", "in [0, 1]",
          got["train.min_lr_ratio"])
    _need(0 < got["data.val_fraction"] < 1, "data.val_fraction", "in (0, 1)",
          got["data.val_fraction"])
    _validate_sparse_ift(got)
    _need(0 <= got["sparsity.final"] < 1, "sparsity.final", "a float in [0, 1)",
          got["sparsity.final"])
    method = got["sparsity.method"]
    _need(got["sparsity.n"] <= got["sparsity.m"], "sparsity.n", "<= sparsity.m",
          got["sparsity.n"])
    _need(0 <= got["sparsity.warmup"] < got["sparsity.hard_from"] <= 1,
          "sparsity.warmup/hard_from", "0 <= warmup < hard_from <= 1 (fractions of steps)",
          (got["sparsity.warmup"], got["sparsity.hard_from"]))
    _need(got["sparsity.decay"] >= 0, "sparsity.decay", "a float >= 0 (SR-STE's lambda_W)",
          got["sparsity.decay"])
    if method == "mdgf":
        _need(got["sparsity.alpha"] > 0, "sparsity.alpha", "a float > 0 (MDGF's decay rate)",
              got["sparsity.alpha"])
    _need(0 < got["sparsity.drop_fraction"] <= 1, "sparsity.drop_fraction", "in (0, 1]",
          got["sparsity.drop_fraction"])
    if method in ("set", "rigl"):
        _need(got["sparsity.allocation"] in ("uniform", "erk"), "sparsity.allocation",
              "'uniform' or 'erk' for set/rigl", got["sparsity.allocation"])
    _need(0 < got["sparsity.dense_from"] <= 1, "sparsity.dense_from",
          "a fraction of train.steps in (0, 1] (SPDF's switch to dense; 1: never)",
          got["sparsity.dense_from"])
    if got["sparsity.dense_from"] < 1:
        _need(got["sparsity.method"] in ("static", "gradual") and got["model.linear"] == "dense",
              "sparsity.dense_from", "1 unless a static or gradual method masks dense layers",
              got["sparsity.dense_from"])
        _need(round(got["sparsity.dense_from"] * got["train.steps"]) >= 1,
              "sparsity.dense_from", "a fraction that leaves >= 1 sparse step",
              got["sparsity.dense_from"])
    _need(0 <= got["sparsity.start"] < got["sparsity.end"] <= 1, "sparsity.start/end",
          "0 <= start < end <= 1", (got["sparsity.start"], got["sparsity.end"]))
    _need(got["train.seq_len"] <= got["model.n_ctx"], "train.seq_len",
          f"<= model.n_ctx ({got['model.n_ctx']})", got["train.seq_len"])
    _need(got["train.warmup_steps"] < got["train.steps"], "train.warmup_steps",
          f"< train.steps ({got['train.steps']})", got["train.warmup_steps"])
    if got["sparsity.method"] == "gradual" and got["sparsity.schedule"] in ("polynomial",
                                                                            "geometric"):
        _need(got["sparsity.begin_step"] < got["sparsity.end_step"] <= got["train.steps"],
              "sparsity.begin_step/end_step", "begin_step < end_step <= train.steps",
              (got["sparsity.begin_step"], got["sparsity.end_step"]))
    if got["model.linear"] == "bsr":  # block-sparse kernels: a static random block mask
        _need(got["sparsity.method"] == "static" and got["sparsity.score"] == "random",
              "model.linear", "'dense' unless sparsity.method='static' with score='random' "
              "(the BSR layers hold a static random block mask)", got["model.linear"])
    if got["sparsity.method"] in ("static", "gradual", "set", "rigl"):
        _need(got["sparsity.final"] > 0, "sparsity.final", "> 0 for a sparse method",
              got["sparsity.final"])
    if (got["sparsity.method"] == "gradual" and got["sparsity.schedule"] == "window"
            and got["sparsity.by"] == "compute"):
        need, have = WINDOW_SOLVE_BYTES_PER_STEP * got["train.steps"], _physical_memory()
        _need(need <= have, "train.steps", f"<= {have // WINDOW_SOLVE_BYTES_PER_STEP} on this "
              f"machine (placing the sparsity window by compute takes about "
              f"{WINDOW_SOLVE_BYTES_PER_STEP} bytes per step; {have / 2**30:.0f} GiB of memory; "
              "sparsity.by='steps' needs none)", got["train.steps"])


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


IFT_METHODS = ("static", "set", "rigl")  # constant sparsity: iso-FLOP at every step


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
    _need(got["sparsity.method"] in IFT_METHODS, "sparsity.method",
          f"one of {IFT_METHODS} for a Sparse-IFT model (constant sparsity keeps it iso-FLOP)",
          got["sparsity.method"])
    _need(got["sparsity.final"] == s, "sparsity.final",
          f"model.sparse_ift.sparsity ({s}): the mask method trains the sparse parts at the "
          "Sparse-IFT sparsity", got["sparsity.final"])


def _physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
