"""What a researcher looks at after training: a sweep as a table, a run's or a sweep's curves.

* :func:`sweep_frame` (:mod:`~sparsejax.results.frame`): a pandas DataFrame of a sweep dir,
  one row per run: its overrides as columns, its status and its ``summary.json`` fields.
* :func:`read_curves` (:mod:`~sparsejax.results.curves`): a metric of ``metrics.jsonl``
  against step, tokens or FLOPs, for a run dir or every run of a sweep dir, with the sweep's
  axes (the overrides that differ between its runs).
* :func:`plot` (:mod:`~sparsejax.results.figures`): those curves in one figure, a sweep's
  runs overlaid and grouped by its axes (colour, line style, marker); ``sparsejax plot`` is
  its command line.

Everything reads run dirs through :class:`~sparsejax.run.rundir.RunDir` and
:class:`~sparsejax.run.rundir.SweepDir` (docs/design.md, "Results").
"""

from sparsejax.results.curves import METRICS, XS, Curve, Curves, read_curves
from sparsejax.results.figures import figure, plot
from sparsejax.results.frame import sweep_frame

__all__ = ["METRICS", "XS", "Curve", "Curves", "figure", "plot", "read_curves", "sweep_frame"]
