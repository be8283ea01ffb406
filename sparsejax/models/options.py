"""The model's computation settings as names (no heavy imports, so the config schema can list
them without loading Flax): attention implementations (:mod:`sparsejax.models.attention`) and
rematerialisation policies (:mod:`sparsejax.models.stack`)."""

ATTENTION: tuple[str, ...] = ("auto", "xla", "cudnn")  # the model's settings
REMAT: tuple[str, ...] = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
