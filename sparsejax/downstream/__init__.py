"""What a finished run dir is used for: :mod:`~sparsejax.downstream.loading` (``load``),
:mod:`~sparsejax.downstream.finetune` (``init_from``), :mod:`~sparsejax.downstream.export`
and :mod:`~sparsejax.downstream.safetensors_io`, :mod:`~sparsejax.downstream.oneshot`,
:mod:`~sparsejax.downstream.soup`.
"""
