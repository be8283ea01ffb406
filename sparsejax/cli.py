"""Command line: ``sparsejax train | sweep | status | fit | export | sample | data`` (also
``python -m sparsejax``).

``sparsejax train --config configs/gradual_magnitude.py:size=tiny --workdir runs/x
[--config.train.steps=200 --config.checkpoint.every=50 ...]`` trains (resuming when the
workdir holds checkpoints); ``sparsejax sweep`` runs a recipe's ``sweep(add)`` with the same
``--config.KEY=VALUE`` overrides; ``sparsejax status RUN_OR_SWEEP_DIR`` prints each run's
status; ``sparsejax fit SWEEP_DIR_OR_CSV`` fits a scaling law; ``sparsejax export --format
bsr|nm|safetensors|npz RUN_DIR`` exports a run's model with its sparse layout (refused when
that saves < 10%); ``sparsejax soup --config configs/soup.py --workdir DIR`` makes sparse
model soups; ``sparsejax plan-memory --config FILE.py [--device h100]`` prints the memory plan
of a config's train step (:mod:`sparsejax.run.memory`); ``sparsejax sample RUN_DIR --prompt
TEXT`` prints what the model writes; ``sparsejax data prepare SOURCE --tokenizer
bytes|bpe:VOCAB_SIZE|PATH --out DIR`` writes token shards (``data verify DIR`` checks them).

Every command takes ``--help``. The exit status comes from the error's type
(:mod:`sparsejax.errors`): a bad key, value, file or run dir (``ConfigError``, ``InputError``,
a usage error) prints one line ``sparsejax: error: ...`` and exits with status 2; a run that
failed or diverged (``RunFailed``) prints ``sparsejax: run STATUS: ...`` and exits with 1;
Ctrl-C exits with 130 and SIGTERM with 143 (a run saves at the next step boundary and is
``interrupted``); any other exception is a bug: one line ``sparsejax: internal error: ...``
and status 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from sparsejax import errors
from sparsejax.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, EXIT_USAGE
from sparsejax.run.rundir import RunDir, RunStatus, SweepDir, duration, number

USAGE = """usage: sparsejax [--debug] COMMAND [ARGS]   (sparsejax COMMAND --help for details)

commands:
  train   --config FILE.py[:key=val,...] --workdir DIR [--config.KEY=VALUE ...]
  sweep   --config FILE.py[:key=val,...] --workdir SWEEP_DIR [--config.KEY=VALUE ...]
          [--parallel N] [--only GLOB] [--dry-run] [--backend local|ray [--address ADDR]]
  status  RUN_DIR|SWEEP_DIR
  fit     SWEEP_DIR_OR_CSV [--law chinchilla|frantar] [--bootstrap N] [--out DIR]
  export  --format bsr|nm|safetensors|npz|hf RUN_DIR [--layout auto|bsr|nm|dense]
          [--out DIR] [--block BK,BN] [--n N --m M] [--step S]
  soup    --config FILE.py[:key=val,...] --workdir DIR [--config.KEY=VALUE ...]
  oneshot RUN_DIR [--sparsities S,...] [--score magnitude|wanda|gblm] [--structure STRUCTURE]
  plot    RUN_DIR|SWEEP_DIR [--metric val_loss|train_loss|sparsity|n_avg|mfu]
          [--x step|tokens|flops] [--out FILE]
  plan-memory --config FILE.py[:key=val,...] [--config.KEY=VALUE ...]
          [--device h100|h200|a100-40|a100-80|b200|v4|v5e|v5p|v6e|BYTES]
  sample  RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]
  data prepare SOURCE --tokenizer bytes|bpe:VOCAB_SIZE|PATH --out DIR [--val-fraction F]
          [--shard-tokens N] [--noprogress]
  data verify DIR
"""
OVERRIDES_HELP = ("Overrides: --config.KEY=VALUE for any key of sparsejax.run.configlib.base(), "
                  "e.g. --config.train.steps=200 --config.sparsity.final=0.75. "
                  "FILE.py:arg takes key=val,... (dotted keys, or size, steps, final).")


class UsageError(errors.InputError):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, **kwargs: Any):
        super().__init__(prog=f"sparsejax {prog}", allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog.split()[-1]}: {message}")


def _config_parser(prog: str, description: str, workdir_help: str) -> _Parser:
    p = _Parser(prog, description=description, epilog=OVERRIDES_HELP)
    p.add_argument("--config", required=True, metavar="FILE.py[:arg]", help="recipe file")
    p.add_argument("--workdir", required=True, help=workdir_help)
    p.add_argument("--noprogress", action="store_true", help="no progress bar")
    return p


def _parse_config(spec: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """The recipe's config with ``--config.KEY=VALUE`` overrides applied (ml_collections
    ``config_flags``), and the overrides as ``{key: typed value}``."""
    from sparsejax.run import configlib  # the schema: cheap next to what follows

    for item in overrides:
        m = re.fullmatch(r"--config\.([A-Za-z0-9_.]+)=(.*)", item, re.S)
        if m is None:
            raise UsageError(f"unrecognized argument {item!r} (overrides look like "
                             "--config.KEY=VALUE)")
        configlib.check_key(m.group(1))
    file = spec.partition(":")[0]
    if not Path(file).is_file():
        raise errors.MissingInputError(f"--config: config file {file!r} does not exist")
    # argument errors are out: now the recipe (it may import the model, flax, ...)
    from absl import flags
    from ml_collections import config_flags

    from sparsejax.sweep.plan import load_recipe
    module, arg = load_recipe(spec)
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ValueError as e:  # the recipe refuses its argument (other exceptions are its bugs)
        raise errors.ConfigError(f"--config {spec}: {_one_line(e)}") from e
    argv = ["sparsejax", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, "recipe", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise UsageError(_one_line(e)) from e
    return fv.config, dict(config_flags.get_override_values(fv["config"]))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(number(value), spec)


def train_main(argv: list[str], command: str) -> int:
    """Parse the config and its overrides, build the experiment, run it; print the result."""
    p = _config_parser("train", "Train one run (resumes when the workdir holds checkpoints).",
                       "run dir (resumed if it holds checkpoints)")
    args, rest = p.parse_known_args(argv)
    run = RunDir(args.workdir)
    _check_workdir(run)
    config, _ = _parse_config(args.config, rest)
    from sparsejax.run import experiment

    try:
        summary = experiment.run(config, args.workdir, progress=not args.noprogress)
    except KeyboardInterrupt as stop:
        return _interrupted(run, command, stop)
    return _report(summary, run)


def _check_workdir(folder: RunDir | SweepDir) -> None:
    """Before the recipe is imported and anything written: the workdir can be (or become) a
    folder this process writes, and its files read as the command will read them (one line
    naming the file or key otherwise)."""
    folder.check_usable()
    if not folder.path.is_dir():
        return
    folder.check_files()
    if isinstance(folder, RunDir) and (stored := folder.read_config()) is not None:
        from sparsejax.run import configlib

        configlib.stored_spec(stored, str(folder.config_file))  # a run's config, or refused


def _report(summary: dict[str, Any], run: RunDir) -> int:
    """Print a finished run's result; :class:`~sparsejax.errors.RunDiverged` for a diverged
    one (a rerun returns the summary it finds)."""
    if summary["status"] == "diverged":
        raise errors.RunDiverged(f"loss {summary.get('train_loss')} at step "
                                 f"{summary.get('diverged_step')}; status 'diverged' in "
                                 f"{run.summary_file}")
    print(f"run dir: {run.path.absolute()}")
    print(f"final validation loss: {_fmt(summary.get('final_val_loss'))} "
          f"(step {summary['step']}, sparsity {_fmt(summary.get('sparsity'), '.3f')}, "
          f"N_avg {_fmt(summary.get('n_avg'), '.0f')} of {summary['n_params']})")
    return 0


def _interrupted(run: RunDir, command: str, stop: KeyboardInterrupt) -> int:
    """Say where a run a signal stopped stands; exit status 128 + the signal (130: SIGINT)."""
    if run.has_summary():
        s = run.status()
        where = f"status '{s.status}', last checkpoint at step {s.checkpoint or 0} in {run}"
    else:
        where = f"before training started in {run}"
    print(f"\nsparsejax: interrupted; {where}\nrun the same command to resume: {command}",
          file=sys.stderr)
    return _exit_code(stop)


def _exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command (:class:`~sparsejax.errors.Interrupted`);
    130 for a plain ``KeyboardInterrupt``."""
    return getattr(stop, "exit_code", EXIT_INTERRUPTED)


def sweep_main(argv: list[str], command: str) -> int:
    """Run every run of a recipe's ``sweep(add)`` into one sweep dir, each in its own process.

    Exit status 0 when every selected run completed, 1 otherwise (failed, diverged)."""
    p = _config_parser("sweep", "Run every run a recipe's sweep(add) lists, one run dir and "
                       "one process each; completed runs are skipped, partial ones resume. "
                       "The overrides apply to every run.", "sweep dir (one run dir per run)")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs at once, each pinned to its share of the cores (default 1; "
                   "local backend)")
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="local: worker processes here; ray: one Ray task per run with its "
                   "resources.cpus/gpus (pip install sparsejax[ray])")
    p.add_argument("--address", default=None,
                   help="--backend ray: the Ray cluster (default: start a local one)")
    p.add_argument("--only", default=None, metavar="GLOB[,GLOB...]",
                   help="only the runs whose name matches one of these globs, e.g. "
                   "'size-nano_*,*steps-600'")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs and what a launch would do (run, resume, skip)")
    args, rest = p.parse_known_args(argv)
    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"sweep: --parallel must be an int >= 1, got {args.parallel}")
    _check_workdir(SweepDir(args.workdir))
    if args.backend == "ray" and not args.dry_run:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UsageError("sweep: --backend ray needs Ray: pip install 'sparsejax[ray]'")
    _, overrides = _parse_config(args.config, rest)
    from sparsejax import sweep

    try:
        entries = sweep.launch(args.config, args.workdir, extra=overrides, only=args.only,
                               parallel=args.parallel, dry_run=args.dry_run,
                               progress=not args.noprogress, backend=args.backend,
                               address=args.address)
    except KeyboardInterrupt as stop:
        print(f"\nsparsejax: sweep interrupted; run the same command to resume: {command}",
              file=sys.stderr)
        return _exit_code(stop)
    if args.dry_run:
        print(f"{'run':<48} {'action':<8} {'from step':>9} {'steps':>7}")
        for e in entries:
            print(f"{e['name']:<48} {e['action']:<8} {e['done_steps']:>9} {e['steps']:>7}")
        return 0
    print(f"{'run':<48} {'status':<12} {'loss':>8} {'se':>8} {'wall_s':>9}")
    for e in entries:
        print(f"{e['name']:<48} {e['status']:<12} {_fmt(e.get('final_val_loss')):>8} "
              f"{_fmt(e.get('val_loss_se')):>8} {_fmt(e.get('wall_time_s'), '.1f'):>9}")
    bad = [f"{e['name']} ({e['status']})" for e in entries if e["status"] != "completed"]
    if bad:
        print(f"sparsejax: {len(bad)} of {len(entries)} run(s) did not complete: "
              f"{', '.join(bad)}; see the reasons in {SweepDir(args.workdir).sweep_file} and "
              f"each run's {RunDir.WORKER_LOG}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def status_main(argv: list[str]) -> int:
    """Print each run's status, latest logged step with its loss, latest checkpoint, wall time,
    ETA and failure reason: of a run dir, or of every run of a sweep dir (pending ones too)."""
    p = _Parser("status", description="Status, latest logged step and its loss, latest "
                "checkpoint (where a resume starts), wall time and ETA of each run of a run or "
                f"sweep dir ({SweepDir.SWEEP}'s runs, pending ones too); a run left 'running' by "
                "a process that is gone reads as 'interrupted'.")
    p.add_argument("path", metavar="RUN_DIR|SWEEP_DIR")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        raise errors.MissingInputError(f"status: {path} is not a directory")
    rows = _status_rows(path)
    if not rows:
        raise errors.InputError(f"status: {path} holds no run (no {RunDir.SUMMARY} in it or its "
                                f"subfolders, no {SweepDir.SWEEP})")
    w = max(len("run"), *(len(name) for name, _, _ in rows))
    print(f"{'run':<{w}}  {'status':<11} {'step':>7} {'ckpt':>7} {'loss':>8} {'wall_s':>9} "
          f"{'eta':>7}  reason")
    for name, s, reason in rows:
        eta = s.eta_s()
        line = (f"{name:<{w}}  {s.status:<11} {_int(s.step):>7} {_int(s.checkpoint):>7} "
                f"{_fmt(s.loss):>8} {_fmt(s.wall_time_s, '.1f'):>9} "
                f"{'-' if eta is None else duration(eta):>7}")
        print(f"{line}  {reason}" if reason else line)
    return 0


def _status_rows(path: Path) -> list[tuple[str, RunStatus, str | None]]:
    """``(name, status, failure reason)`` of the run dir ``path``, or of every run of the
    sweep dir ``path``: ``sweep.json``'s runs in its order (a run that never wrote a summary
    with the status the sweep gave it, e.g. ``pending``), then other run dirs by name."""
    if RunDir(path).has_summary():
        s = RunDir(path).status()
        return [(RunDir(path).name, s, s.error)]
    sweep = SweepDir(path)
    book = {e["name"]: e for e in (sweep.read_sweep() or {}).get("runs", [])
            if isinstance(e, dict) and isinstance(e.get("name"), str)}
    names = [*book, *(r.name for r in sweep.runs() if r.name not in book)]
    rows = []
    for name in names:
        entry, run = book.get(name, {}), sweep.run(name)
        s = run.status() if run.has_summary() else RunStatus(
            str(entry.get("status", "pending")), None, None, None, run.latest_checkpoint_step())
        reason = entry.get("reason") or s.error if s.status in ("failed", "interrupted") else None
        rows.append((name, s, reason))
    return rows


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def export_main(argv: list[str]) -> int:
    """Export a run's model with its sparse layout; refuse when that saves < 10%."""
    p = _Parser("export", description="Export a run's model (BSR or N:M layout, npz or "
                "safetensors file) without changing a weight; refuses, with the reason and the "
                "fix, when the structure would save less than 10%% of the dense size.")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=("bsr", "nm", "safetensors", "npz", "hf"),
                   help="bsr / nm: that layout in an .npz; safetensors / npz: that file with "
                   "--layout; hf: a Hugging Face GPT-2 folder (model.pos=learned runs)")
    p.add_argument("--layout", default="auto", choices=("auto", "bsr", "nm", "dense"),
                   help="for safetensors / npz (auto: N:M if the kernels are N:M, else BSR; "
                   "dense: plain dense tensors, masks applied, for any run)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: RUN_DIR/{RunDir.EXPORT})")
    p.add_argument("--block", default=None, help="BSR block BK,BN (default: the run's "
                   "model.block, square)")
    p.add_argument("--n", type=int, default=None, help="N of N:M (default: sparsity.n)")
    p.add_argument("--m", type=int, default=None, help="M of N:M (default: sparsity.m)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    args = p.parse_args(argv)
    block = None
    if args.block is not None:
        try:
            block = tuple(int(b) for b in args.block.split(","))
            if len(block) != 2 or min(block) < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"export: --block must be two ints >= 1 BK,BN, got "
                             f"{args.block!r}") from None
    from sparsejax.downstream import export, loading

    run = loading.check_run_dir(args.run_dir, "export: run dir")
    if run.latest_checkpoint_step() is None:
        raise errors.MissingInputError(f"export: {run} holds no checkpoint ({run.checkpoints})")
    result = export.export_run(run, args.format, out=args.out, layout=args.layout,
                               block=block, n=args.n, m=args.m, step=args.step)
    print(result.table)
    print(f"wrote {result.path} ({result.layout}): {result.nbytes} bytes, "
          f"{result.ratio:.3f}x the dense size ({result.dense_nbytes} bytes)")
    return 0


def soup_main(argv: list[str], command: str) -> int:
    """Fine-tune ingredients of one pruned run and average them (Sparse Model Soups)."""
    p = _config_parser("soup", "Sparse Model Soups (Zimmer et al. 2023): soup.ingredients "
                       "sparse fine-tunes of init_from (seeds differ, mask shared), uniform "
                       "and greedy soup, optional prune-and-repeat cycles.",
                       "soup dir (one run dir per ingredient and soup)")
    args, rest = p.parse_known_args(argv)
    config, _ = _parse_config(args.config, rest)
    SweepDir(args.workdir).check_usable()
    from sparsejax.downstream import soup

    try:
        result = soup.soup(config, args.workdir, progress=not args.noprogress)
    except KeyboardInterrupt as stop:
        print(f"\nsparsejax: soup interrupted; run the same command to resume: {command}",
              file=sys.stderr)
        return _exit_code(stop)
    print(soup.table(result))
    print(f"soup dir: {Path(args.workdir).absolute()} ({SweepDir.SOUP})")
    return 0


def oneshot_main(argv: list[str]) -> int:
    """Prune the latest checkpoint in one shot at each sparsity; the essential-sparsity knee."""
    from sparsejax.downstream import oneshot

    p = _Parser("oneshot", description="Prune a run's checkpoint without retraining at each "
                "sparsity, evaluate on the validation split, write "
                f"RUN_DIR/{RunDir.ONESHOT} and {RunDir.ONESHOT_PLOT}, report the knee "
                "(Jaiswal et al. 2023).")
    p.add_argument("run_dir")
    p.add_argument("--sparsities", default=",".join(map(str, oneshot.DEFAULT_SPARSITIES)),
                   help="comma-separated values in [0, 1] (ignored by N:M)")
    p.add_argument("--score", default="magnitude", choices=oneshot.SCORES)
    p.add_argument("--structure", default="unstructured", help="unstructured, N:M or block")
    p.add_argument("--allocation", default=None, choices=oneshot.ALLOCATIONS,
                   help="default: global for magnitude, layerwise for wanda/gblm")
    p.add_argument("--block", default="16,16", help="block size BK,BN (--structure block)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="knee tolerance, relative to the dense loss (default 0.01 = 1%%)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--eval-batches", type=int, default=None, help="default: the run's config")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="training-split batches for wanda/gblm")
    p.add_argument("--alpha", type=float, default=1.0, help="gblm gradient weight")
    p.add_argument("--out", default=None, help=f"JSON path (default RUN_DIR/{RunDir.ONESHOT})")
    args = p.parse_args(argv)
    try:
        block = tuple(int(b) for b in args.block.split(","))
        if len(block) != 2 or min(block) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"oneshot: --block must be two ints >= 1 BK,BN, got {args.block!r}"
                         ) from None
    sparsities = oneshot.parse_sparsities(args.sparsities)
    oneshot.parse_structure(args.structure)
    for name in ("eval_batches", "eval_batch_size", "seq_len", "calibration_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"oneshot: --{name.replace('_', '-')} must be >= 1, got {value}")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise errors.MissingInputError(f"oneshot: run dir {run_dir} does not exist")
    oneshot.oneshot(run_dir, sparsities, score=args.score, structure=args.structure,
                    allocation=args.allocation, block=block, tolerance=args.tolerance,
                    step=args.step, eval_batches=args.eval_batches,
                    eval_batch_size=args.eval_batch_size, seq_len=args.seq_len,
                    calibration_batches=args.calibration_batches, alpha=args.alpha,
                    out=args.out)
    return 0


def plot_main(argv: list[str]) -> int:
    """Plot a run's metric curve, or a sweep's runs overlaid and grouped by its axes."""
    from sparsejax import results

    p = _Parser("plot", description=f"Plot a metric of {RunDir.METRICS} against step, tokens "
                "or FLOPs: a run's curve, or a sweep's runs overlaid, grouped by the sweep's axes "
                "(size: colour, sparsity: line style, steps: marker); loss axes in nats/byte or "
                "nats/token as the runs' data says.")
    p.add_argument("path", metavar="RUN_DIR|SWEEP_DIR")
    p.add_argument("--metric", default="val_loss", choices=results.METRICS)
    p.add_argument("--x", default="step", choices=results.XS)
    p.add_argument("--out", default=None, metavar="FILE",
                   help="image file, its suffix the format (default ./NAME_METRIC_vs_X.png)")
    args = p.parse_args(argv)
    out, curves = results.plot(args.path, args.metric, args.x, args.out)
    if curves.skipped:
        print(f"left out {len(curves.skipped)} run(s): {', '.join(curves.skipped)}")
    print(f"wrote {out} ({args.metric} vs {args.x}, {len(curves.curves)} "
          f"{'run' if len(curves.curves) == 1 else 'runs'})")
    return 0


def plan_memory_main(argv: list[str]) -> int:
    """Print the memory plan of a config's train step against a device; exit status 2 when
    it does not fit."""
    p = _Parser("plan-memory", description="Compile the config's whole train step on abstract "
                "inputs (no weights) and print XLA's memory plan per device: params, "
                "optimizer state, masks, temporaries, peak, against a device's memory. "
                "Compiled by this host's backend (XLA:CPU without an accelerator): an "
                "estimate of the accelerator's. Exit status 2 when it does not fit.",
                epilog=OVERRIDES_HELP)
    p.add_argument("--config", required=True, metavar="FILE.py[:arg]", help="recipe file")
    p.add_argument("--device", default="h100", help="h100 (default), h200, a100-40, a100-80, "
                   "b200, v4, v5e, v5p, v6e, or its memory in bytes")
    args, rest = p.parse_known_args(argv)
    config, _ = _parse_config(args.config, rest)
    from sparsejax.run import configlib, memory, memory_table

    dev = memory_table.device(args.device)
    spec = configlib.validate(config)
    plan = memory.plan(spec, memory.corpus_vocab(spec))
    print(memory_table.table(plan, dev, spec))
    if plan.peak > dev.bytes:
        scale = memory_table.GB if dev.unit == "GB" else memory_table.GIB
        raise errors.ConfigError(memory.refusal(
            spec, f"{plan.peak / scale:.2f} {dev.unit}",
            f"XLA:{plan.platform.upper()}'s plan of its train step", f"{dev.stated} of {dev.name}"))
    return 0


def sample_main(argv: list[str]) -> int:
    """Print what a run's model writes after a prompt (:mod:`sparsejax.downstream.generate`)."""
    p = _Parser("sample", description="Load a run's latest checkpoint and print the prompt "
                "followed by the text the model writes after it (the run's tokenizer; greedy "
                "at --temperature 0).")
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to write (100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise errors.MissingInputError(f"sample: run dir {run_dir} does not exist")
    from sparsejax.downstream import generate, loading

    loaded = loading.load(run_dir, step=args.step)
    text = generate.generate(loaded, args.prompt, args.max_new_tokens, args.temperature,
                             args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def data_main(argv: list[str]) -> int:
    """``data prepare``: text to token shards; ``data verify``: check a prepared folder."""
    if not argv or argv[0] not in ("prepare", "verify"):
        raise UsageError("data: expected 'data prepare SOURCE ...' or 'data verify DIR'")
    if argv[0] == "verify":
        p = _Parser("data verify", description="Check a prepared folder: the metadata, every "
                    "shard's size and sha256.")
        p.add_argument("dir")
        args = p.parse_args(argv[1:])
        from sparsejax.run import shards

        prep = shards.load_prepared(args.dir, verify=True)
        print(f"{args.dir}: ok, {prep.meta['token_count']} {prep.meta['dtype']} tokens in "
              f"{len(prep.meta['shards'])} shards, vocab {prep.vocab_size}")
        return 0
    from sparsejax.run import prepare

    p = _Parser("data prepare", description="Tokenize SOURCE (a text file, a folder of text "
                f"files, or the built-in corpus '{prepare.BUILTIN}' / 'stdlib-tests') into "
                "token shards with a metadata file; train with --config.data.source=DIR.")
    p.add_argument("source")
    p.add_argument("--tokenizer", required=True, metavar="bytes|bpe:VOCAB_SIZE|PATH",
                   help="bytes, a byte-level BPE trained here, or a local tokenizer.json")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="validation share (default 0.05; a run's data.val_fraction must match)")
    p.add_argument("--shard-tokens", type=int, default=prepare.SHARD_TOKENS,
                   help=f"tokens per shard (default {prepare.SHARD_TOKENS:,})")
    p.add_argument("--noprogress", action="store_true", help="no progress output")
    args = p.parse_args(argv[1:])
    meta = prepare.prepare(args.source, args.tokenizer, args.out,
                           val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                           progress=not args.noprogress)
    print(f"wrote {args.out}: {meta['token_count']:,} {meta['dtype']} tokens "
          f"({meta['n_files']} files, vocab {meta['vocab_size']}, split {meta['split']}) in "
          f"{len(meta['shards'])} shards; train with --config.data.source={args.out}")
    return 0


def _dispatch(argv: list[str], command: str) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name == "train":
        return train_main(rest, command)
    if name == "sweep":
        return sweep_main(rest, command)
    if name == "status":
        return status_main(rest)
    if name == "export":
        return export_main(rest)
    if name == "soup":
        return soup_main(rest, command)
    if name == "oneshot":
        return oneshot_main(rest)
    if name == "plan-memory":
        return plan_memory_main(rest)
    if name == "sample":
        return sample_main(rest)
    if name == "data":
        return data_main(rest)
    if name == "plot":
        return plot_main(rest)
    if name == "fit":
        from scaling import cli as scaling_cli

        return scaling_cli.main(rest)
    raise UsageError(f"unknown command {name!r} (commands: train, sweep, status, fit, export, "
                     "oneshot, soup, plan-memory, sample, data, plot)")


def main(argv: list[str] | None = None) -> int:
    """The ``sparsejax`` entry point; returns the exit status, which the error's type decides
    (module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = shlex.join(["sparsejax", *argv])
    try:
        return _dispatch(argv, command)
    except Exception as e:
        if debug:
            raise
        code, line = _error_line(e)
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt as stop:  # a command that does not say how to resume
        if debug:
            raise
        print("\nsparsejax: interrupted", file=sys.stderr)
        return _exit_code(stop)


def _error_line(e: Exception) -> tuple[int, str]:
    """The exit status and the one line to print for an exception out of a command."""
    if isinstance(e, errors.RunFailed):
        return e.exit_code, f"sparsejax: run {e.status}: {_one_line(e)}"
    if isinstance(e, errors.SparsejaxError):
        return e.exit_code, f"sparsejax: error: {_one_line(e)}"
    return EXIT_RUN_FAILED, (f"sparsejax: internal error: {type(e).__name__}: {_one_line(e)} "
                             "(run with --debug for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
