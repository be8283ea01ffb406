"""``sparsejax fit SWEEP_DIR_OR_CSV [--law chinchilla|frantar] [--bootstrap 1000] [--out DIR]``.

Fits a scaling law to a sweep dir or a CSV, prints the coefficients with bootstrap confidence
intervals and writes the diagnostic plots. ``main(argv)`` takes the arguments after ``fit``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scaling import logs, plots
from scaling.fit import fit_chinchilla, fit_frantar
from scaling.uncertainty import bootstrap, leave_one_out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsejax fit",
        description="Fit L = E + A/N^alpha + B/D^beta (N = N_avg for sparse runs; Jin et al. "
        "2025) or the sparse law of Frantar et al. 2023 to a sweep dir or CSV.",
    )
    p.add_argument("source", help="sweep dir (run dirs with summary.json) or CSV (N, D, loss)")
    p.add_argument("--law", choices=("chinchilla", "frantar"), default="chinchilla")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="R",
        help="bootstrap replicates for the intervals (0: none)",
    )
    p.add_argument("--out", default=None, help="directory for the plots (default: none)")
    p.add_argument(
        "--n-key",
        choices=logs.N_KEYS,
        default=None,
        help="summary field used as N for sweep dirs (default n_avg)",
    )
    p.add_argument(
        "--drop-highest",
        type=int,
        default=0,
        metavar="K",
        help="drop the K highest-loss points before fitting",
    )
    p.add_argument("--grid", default="epoch", help="start grid: epoch (default) or coarse")
    p.add_argument("--huber-delta", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loo", action="store_true", help="also report the leave-one-out error")
    p.add_argument(  # deprecated: the solver has a single (numba) implementation
        "--backend", choices=("auto", "numba"), default=None, help=argparse.SUPPRESS
    )
    return p


def _progress(stream):
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("nan")
        end = "\n" if done == total else ""
        print(
            f"\rbootstrap {done}/{total}  ({rate:.0f}/s, eta {eta:.0f} s)",
            end=end,
            file=stream,
            flush=True,
        )

    return report


def main(argv: list[str] | None = None) -> int:
    """Run ``sparsejax fit``; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    if args.backend is not None:
        print(
            "sparsejax: warning: --backend is deprecated and ignored (one compiled solver; the "
            "numpy passes were removed)",
            file=sys.stderr,
        )
    if args.bootstrap < 0 or args.bootstrap == 1:
        print("sparsejax: error: --bootstrap must be 0 or >= 2", file=sys.stderr)
        return 2
    try:
        table = logs.load_table(args.source, n_key=args.n_key)
        if args.law == "chinchilla":
            fit = fit_chinchilla(
                table.N,
                table.D,
                table.loss,
                grid=args.grid,
                huber_delta=args.huber_delta,
                drop_highest=args.drop_highest,
            )
        else:
            if table.S is None:
                raise ValueError("--law frantar needs a sparsity column (S or sparsity)")
            grid = "default" if args.grid == "epoch" else args.grid
            fit = fit_frantar(
                table.S,
                table.N,
                table.D,
                table.loss,
                grid=grid,
                huber_delta=args.huber_delta,
                drop_highest=args.drop_highest,
            )
    except ValueError as err:
        print(f"sparsejax: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(table.loss)} points from {args.source} (N = {table.n_key})")
    print(fit)
    if args.bootstrap:
        boot = bootstrap(
            fit,
            n_boot=args.bootstrap,
            seed=args.seed,
            progress=_progress(sys.stderr),
        )
        print(boot)
    if args.law == "chinchilla" and fit.alpha > 0 and fit.beta > 0:
        a, b = fit.law.exponents
        print(f"compute-optimal exponents: N_opt ~ C^{a:.4f}, D_opt ~ C^{b:.4f}")
    if args.loo:
        loo = leave_one_out(fit)
        print(
            f"leave-one-out: rms log error {loo.rmse_log:.4g}, "
            f"mean |relative error| {loo.mean_abs_rel:.4g}"
        )
    if args.out:
        for path in plots.plot_all(fit, Path(args.out)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
