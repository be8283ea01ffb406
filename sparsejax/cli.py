"""Command line: ``sparsejax train | fit | export`` (also ``python -m sparsejax``).

``sparsejax train --config configs/gradual_magnitude.py:size=tiny --workdir runs/x
[--config.train.steps=200 --config.checkpoint.every=50 ...]`` trains (resuming when the
workdir holds checkpoints); ``sparsejax fit SWEEP_DIR_OR_CSV`` fits a scaling law;
``sparsejax export --format bsr|nm RUN_DIR`` packs a pruned checkpoint for the sparse kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """usage: sparsejax COMMAND [ARGS]

commands:
  train   --config FILE.py[:key=val,...] --workdir DIR [--config.KEY=VALUE ...]
  fit     SWEEP_DIR_OR_CSV [--law chinchilla|frantar] [--bootstrap N] [--out DIR]
  sweep   --config FILE.py[:arg] --workdir SWEEP_DIR [--set KEY=VALUE ...] [--dry-run]
  export  --format bsr|nm RUN_DIR [--out DIR] [--block BK,BN] [--n N --m M] [--force]
"""


def train_main(argv: list[str]) -> int:
    """Parse ml_collections config flags, build the experiment, run it; print the result."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py[:arg]).",
                                    flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (resumed if it holds checkpoints).",
                        flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show progress output.", flag_values=fv)
    try:
        fv(["sparsejax train", *argv])
    except flags.Error as e:
        print(f"sparsejax train: {e}", file=sys.stderr)
        return 2
    if fv.config is None or not fv.workdir:
        print("sparsejax train: --config and --workdir are required", file=sys.stderr)
        return 2
    from sparsejax import configlib, experiment

    config = fv.config
    try:
        configlib.validate(config)
    except ValueError as e:
        print(f"sparsejax train: invalid config: {e}", file=sys.stderr)
        return 2
    print(f"run dir: {Path(fv.workdir).absolute()}", flush=True)
    summary = experiment.run(config, fv.workdir, progress=fv.progress)
    print(f"run dir: {Path(fv.workdir).absolute()}")
    print(f"final validation loss: {summary['final_val_loss']:.4f} "
          f"(step {summary['step']}, sparsity {summary['sparsity']:.3f}, "
          f"N_avg {summary['n_avg']:.0f} of {summary['n_params']})")
    return 0


def sweep_main(argv: list[str]) -> int:
    """Run every run of a recipe's ``sweep(add)`` into one sweep dir."""
    p = argparse.ArgumentParser(prog="sparsejax sweep")
    p.add_argument("--config", required=True, help="recipe FILE.py[:arg] defining sweep(add)")
    p.add_argument("--workdir", required=True, help="sweep dir (one run dir per run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--noprogress", action="store_true")
    args = p.parse_args(argv)
    from sparsejax import sweep

    extra = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        extra[key] = value
    try:
        entries = sweep.launch(args.config, args.workdir, extra=extra, dry_run=args.dry_run,
                               progress=not args.noprogress)
    except ValueError as e:
        print(f"sparsejax sweep: {e}", file=sys.stderr)
        return 2
    for e in entries:
        print(f"{e['name']}: {e.get('status', 'planned')} {e.get('final_val_loss', '')}")
    return 0


def export_main(argv: list[str]) -> int:
    """Pack the latest checkpoint's prunable kernels as BSR or N:M matrices."""
    p = argparse.ArgumentParser(prog="sparsejax export")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=("bsr", "nm"))
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    p.add_argument("--block", default="32,32", help="BSR block BK,BN")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--force", action="store_true", help="N:M: prune kernels that are not N:M")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    args = p.parse_args(argv)
    from pallas_kernels import export
    from sparsejax import checkpoint

    params, _ = checkpoint.load_for_finetuning(args.run_dir, dense=True, step=args.step)
    try:
        block = tuple(int(b) for b in args.block.split(","))
    except ValueError:
        p.error(f"--block must be two ints BK,BN, got {args.block!r}")
    opts = {"block": block} if args.format == "bsr" else {"n": args.n, "m": args.m,
                                                            "force": args.force}
    export.main(params, args.format, args.out or Path(args.run_dir) / "export", **opts)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "fit":
        from scaling import cli as scaling_cli

        return scaling_cli.main(rest)
    if command == "export":
        return export_main(rest)
    if command == "sweep":
        return sweep_main(rest)
    print(f"sparsejax: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
