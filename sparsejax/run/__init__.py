"""The run framework: config schema -> build -> train -> run dir.

:mod:`~sparsejax.run.configlib` (the schema), :mod:`~sparsejax.run.build` (config -> model
config, schedules, mask method, optimizer), :mod:`~sparsejax.run.experiment` (the entry point),
:mod:`~sparsejax.run.train` (the loop), :mod:`~sparsejax.run.checkpoint`,
:mod:`~sparsejax.run.rundir` (the run directory's files), :mod:`~sparsejax.run.data`,
:mod:`~sparsejax.run.evaluation`, :mod:`~sparsejax.run.accounting`,
:mod:`~sparsejax.run.distributed`, :mod:`~sparsejax.run.distill`.
"""
