"""``sparsejax fit SWEEP_DIR_OR_CSV [--law chinchilla|frantar] [--bootstrap 1000] [--out DIR]
[--fix NAME=VALUE ...] [--force] [--compare-n] [--holdout largest-D|largest-N|sparse|GLOB]
[--objective huber|huber_likelihood] [--weights se|column] [--flops C [--plan-sparsity S]]``.

Fits a scaling law to a sweep dir or a CSV, prints the coefficients (with the bounds they were
confined to) and bootstrap confidence intervals and writes the diagnostic plots. A fit the data
do not support is flagged degenerate (``scaling.identify``): the table says why, a
``sparsejax: warning:`` line repeats it, and the compute-optimal exponents and the iso-FLOP
plot are withheld unless ``--force``. ``--fix E=1.7`` (repeatable) pins a coefficient.
``--compare-n`` fits the law with N = N_avg, the final non-zero count and the total count and
prints their objective, in-sample and leave-one-out RMSE side by side. ``--law frantar`` uses
the final non-zero count (``n_active``) and the sparsity by default, as Frantar et al. 2023 do.
``--holdout`` fits on the runs it does not name and predicts those it does (``scaling.holdout``).
With a bootstrap the table is followed by each parameter's relative interval width (flagged
WEAK above ``scaling.weak.WEAK_WIDTH``) and, for the Chinchilla law, intervals on the
compute-optimal exponents, N_opt / D_opt at ``--flops`` and the sparse plan at
``--plan-sparsity`` (``scaling.derived``).
``main(argv)`` takes the arguments after ``fit``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from scaling import logs, plots, weak
from scaling.compare import COMPARED, compare_n, fit_table, format_comparison
from scaling.derived import derived_intervals, format_derived
from scaling.fit import OBJECTIVES, kept_rows
from scaling.holdout import format_holdout, holdout
from scaling.isoflop import fit_isoflop
from scaling.kaplan import fit_kaplan
from scaling.uncertainty import bootstrap, leave_one_out
from scaling.weights import table_weights


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsejax fit",
        description="Fit L = E + A/N^alpha + B/D^beta (N = N_avg for sparse runs; Jin et al. "
        "2025) or the sparse law of Frantar et al. 2023 to a sweep dir or CSV.",
    )
    p.add_argument("source", help="sweep dir (run dirs with summary.json) or CSV (N, D, loss)")
    p.add_argument("--law", choices=("chinchilla", "frantar", "kaplan", "isoflop"),
                   default="chinchilla",
                   help="kaplan: Kaplan et al. 2020's L(N, D); isoflop: Chinchilla Approach 2 "
                   "(a parabola per budget C = 6 N D, power laws through the minima)")
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
        help="summary field used as N for sweep dirs (default n_avg; n_active for --law "
        "frantar)",
    )
    p.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pin a coefficient (E, A, B, alpha, beta; Frantar: a..g); repeatable",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="report the compute-optimal split and iso-FLOP plot of a degenerate fit anyway",
    )
    p.add_argument(
        "--compare-n",
        action="store_true",
        help="fit with N = n_avg, n_active and n_params and compare objective, in-sample "
        "and leave-one-out RMSE of log loss",
    )
    p.add_argument(
        "--drop-highest",
        type=int,
        default=0,
        metavar="K",
        help="drop the K highest-loss points before fitting",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="huber",
        help="huber: the sum of Huber losses (default); huber_likelihood: the Huber "
        "likelihood with a free scale (Besiroglu et al. 2024's headline estimator)",
    )
    p.add_argument(
        "--weights",
        choices=("se", "column"),
        default=None,
        help="per-point weights: se = 1/SE^2 of the log loss (val_loss_se of each run, or an "
        "se column); column = a CSV's weight column",
    )
    p.add_argument(
        "--holdout",
        default=None,
        metavar="largest-D|largest-N|sparse|GLOB",
        help="fit on the other runs and report the held-out RMSE of log loss (per N "
        "definition with --compare-n) and each held-out run's error",
    )
    p.add_argument(
        "--flops",
        type=float,
        default=None,
        metavar="C",
        help="also give N_opt and D_opt at this budget (C = 6 N D), with bootstrap intervals",
    )
    p.add_argument(
        "--plan-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="with --flops: the sparse plan (dense size, N_avg, tokens) for final sparsity S "
        "pruned gradually from 25%% to 75%% of the compute (geometric), with intervals",
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


def parse_fix(items: list[str]) -> dict[str, float]:
    """``["E=1.7", "alpha=0.3"]`` -> ``{"E": 1.7, "alpha": 0.3}`` (ValueError naming the item)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--fix takes NAME=VALUE (e.g. E=1.7); got {item!r}") from None
    return out


def _warn(fit) -> None:
    if fit.degenerate:
        print(f"sparsejax: warning: {fit.warning()}", file=sys.stderr)
    if fit.weak:
        print(f"sparsejax: warning: weak identification: {'; '.join(fit.weak_reasons)}",
              file=sys.stderr)


def _kaplan(table, weights, args) -> str:
    if weights is not None:
        raise ValueError("--law kaplan takes no --weights")
    fit = fit_kaplan(table.N, table.D, table.loss, huber_delta=args.huber_delta)
    law = fit.law
    return (f"KaplanFit (Kaplan et al. 2020, L = ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D; "
            f"Huber delta={fit.huber_delta:g})\n"
            f"  alpha_N {law.alpha_N:>12.6g}\n  alpha_D {law.alpha_D:>12.6g}\n"
            f"  N_c     {law.N_c:>12.6g}\n  D_c     {law.D_c:>12.6g}\n"
            f"  objective {fit.objective:.6e} (sum over {fit.n_points} points); "
            f"{fit.n_at_best} of {fit.n_starts} starts at the best")


def _isoflop(table, weights, args) -> str:
    fit = fit_isoflop(table.N, table.D, table.loss, weights=weights)
    rows = ["Chinchilla Approach 2 (Hoffmann et al. 2022): iso-FLOP parabolas in log N",
            f"  {'C (FLOPs)':>12} {'runs':>5} {'N_opt':>12} {'D_opt':>12} {'loss there':>11}"]
    for b in fit.budgets:
        where = "" if b.inside else "  (outside the runs: extrapolated)"
        rows.append(f"  {b.flops:>12.4g} {b.n_points:>5} {b.n_opt:>12.5g} {b.d_opt:>12.5g} "
                    f"{b.loss_opt:>11.4f}{where}")
    rows.append(f"compute-optimal exponents: N_opt ~ C^{fit.a:.4f}, D_opt ~ C^{fit.b:.4f}")
    if args.flops is not None:
        rows.append(f"at C = {args.flops:.4g}: N_opt {float(fit.n_opt(args.flops)):.5g}, "
                    f"D_opt {float(fit.d_opt(args.flops)):.5g}")
    return "\n".join(rows)


OTHER_LAWS = {"kaplan": _kaplan, "isoflop": _isoflop}


def _check_args(args) -> str:
    """The first problem with the arguments ('' when none)."""
    if args.flops is not None and not (math.isfinite(args.flops) and args.flops > 0):
        return f"--flops must be finite and > 0; got {args.flops}"
    if args.plan_sparsity is not None:
        if args.flops is None:
            return "--plan-sparsity needs --flops (the training budget to plan for)"
        if not 0 <= args.plan_sparsity < 1:
            return f"--plan-sparsity must be in [0, 1); got {args.plan_sparsity}"
    if args.flops is not None and args.law not in ("chinchilla", "isoflop"):
        return "--flops needs --law chinchilla or isoflop (the compute-optimal split)"
    if args.law in OTHER_LAWS and (args.holdout or args.compare_n):
        return f"--holdout and --compare-n take --law chinchilla or frantar, not {args.law}"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Run ``sparsejax fit``; returns the exit status (0 ok, 2 bad input: one line
    ``sparsejax: error: ...``). ``scaling`` reports its own errors: it does not import
    ``sparsejax``, whose CLI calls this."""
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
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"sparsejax: error: --out {args.out} is not a folder", file=sys.stderr)
        return 2
    bad = _check_args(args)
    if bad:
        print(f"sparsejax: error: {bad}", file=sys.stderr)
        return 2
    kwargs = {"grid": args.grid, "huber_delta": args.huber_delta,
              "drop_highest": args.drop_highest, "objective": args.objective}
    try:
        fixed = parse_fix(args.fix)
        if args.holdout is not None:
            n_keys = COMPARED if args.compare_n else (args.n_key,)
            results = holdout(args.source, args.holdout, law=args.law, n_keys=n_keys,
                              fixed=fixed, weights=args.weights, **kwargs)
            print(format_holdout(results, args.holdout))
            for r in results:
                if r.reasons:
                    print(f"sparsejax: warning: N = {r.n_key} (fit on the rest): "
                          f"{r.fit.warning()}", file=sys.stderr)
            return 0
        if args.compare_n:
            rows = compare_n(args.source, law=args.law, fixed=fixed, weights=args.weights,
                             **kwargs)
            print(f"{rows[0].n_points} runs from {args.source}, law {args.law}; N compared:")
            print(format_comparison(rows))
            for r in rows:
                if r.reasons:
                    print(f"sparsejax: warning: N = {r.n_key}: {r.fit.warning()}", file=sys.stderr)
            return 0
        table = logs.load_table(args.source, n_key=args.n_key)
        if args.law in OTHER_LAWS:
            print(f"{len(table.loss)} points from {args.source} (N = {table.n_key})")
            print(OTHER_LAWS[args.law](table, table_weights(table, args.weights), args))
            return 0
        if args.law == "frantar" and args.n_key is None and table.n_key == "n_avg":
            # Frantar et al. count final non-zero parameters (a CSV's own N column is kept)
            table = logs.load_table(args.source, n_key="n_active")
        fit = fit_table(table, args.law, fixed=fixed, weights=table_weights(table, args.weights),
                        **kwargs)
    except (ValueError, OSError) as err:  # a source that cannot be read or fitted: the user's
        print(f"sparsejax: error: {' '.join(str(err).split())}", file=sys.stderr)
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
        extra = fit.with_bootstrap(boot)
        for reason in extra.reasons[len(fit.reasons):]:
            print(f"  DEGENERATE: {reason}")
        print("identification (95% interval width / estimate; weak above "
              f"{weak.WEAK_WIDTH:g}):")
        print(weak.format_widths(extra.widths))
        for reason in extra.weak_reasons:
            print(f"  WEAK: {reason}")
        fit = extra
    if args.law == "chinchilla" and fit.alpha > 0 and fit.beta > 0:
        if fit.degenerate and not args.force:
            print("compute-optimal exponents: not reported for a degenerate fit (--force to "
                  "print them)")
        else:
            a, b = fit.law.exponents
            print(f"compute-optimal exponents: N_opt ~ C^{a:.4f}, D_opt ~ C^{b:.4f}")
            if args.bootstrap:
                print(format_derived(derived_intervals(
                    fit, boot, flops=args.flops, final_sparsity=args.plan_sparsity)))
            elif args.flops is not None:
                opt = fit.law.compute_optimal(args.flops)
                print(f"at C = {args.flops:.4g}: N_opt {float(opt.N):.5g}, "
                      f"D_opt {float(opt.D):.5g} (no intervals without --bootstrap)")
    if args.loo:
        loo = leave_one_out(fit)
        print(
            f"leave-one-out: rms log error {loo.rmse_log:.4g}, "
            f"mean |relative error| {loo.mean_abs_rel:.4g}"
        )
    if args.out:
        kept = kept_rows(table.loss, args.drop_highest)
        s = None if table.S is None else table.S[kept]
        info = plots.point_info(args.source, [table.names[i] for i in kept])
        paths = plots.plot_all(fit, Path(args.out), n_key=table.n_key, sparsity=s,
                               loss_se=info.loss_se, unit=info.unit, force=args.force)
        for path in paths:
            print(f"wrote {path}")
        if fit.degenerate and not args.force:
            print("isoflop plot not written for a degenerate fit (--force to write it)")
    _warn(fit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
