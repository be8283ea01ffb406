"""The whole bf16 train step lowers for GPU (``cuda``) and TPU on this host, with dense, BSR
and N:M linears: :func:`sparsejax.run.abstract_step.abstract_step` (abstract state, donated)
traced and lowered with ``lowering_platforms=(platform,)``, nothing run or allocated on a
device.

The kernel layers pick their implementation from the default device's platform
(``pallas_kernels.backend.default_platform``), which here is the CPU; the test points it at
the target so the step holds the compiled Pallas kernels (Triton on GPU, Mosaic on TPU) that
an accelerator would run. Shapes tile for both: BSR blocks of 128 (TPU lanes), d_model 1024
so that 2:4 groups give 128-multiples per TPU tile (K/m/2 = 128)."""

from __future__ import annotations

import pytest

import pallas_kernels.backend
from sparsejax.run import abstract_step, configlib

pytestmark = pytest.mark.slow  # compiles whole train steps

TARGET = {"cuda": "@__gpu$xla.gpu.triton", "tpu": "@tpu_custom_call"}
PLATFORM = {"cuda": "gpu", "tpu": "tpu"}
BASE = ("model.n_ctx=128,train.seq_len=128,train.batch_size=2,model.dtype=bfloat16,"
        "model.block=128")
LINEAR = {
    "dense": "",
    "bsr": ",model.linear=bsr,sparsity.method=static,sparsity.score=random,sparsity.final=0.5",
    "nm": ",model.linear=nm,sparsity.method=nm,sparsity.n=2,sparsity.m=4",
}


@pytest.mark.parametrize("linear", ["dense", "bsr", "nm"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bf16_train_step_lowers(platform, linear, monkeypatch):
    monkeypatch.setattr(pallas_kernels.backend, "default_platform", lambda: PLATFORM[platform])
    config = configlib.apply_arg(configlib.base(), BASE + LINEAR[linear])
    configlib.set_key(config, "model.size", "1,1024,8,4096")  # 1 layer, d 1024, 8 heads, ff 4096
    step = abstract_step.abstract_step(configlib.validate(config), vocab_size=256)
    lowered = step.train_step.trace(step.state, step.batch, step.batch, None).lower(
        lowering_platforms=(platform,))
    text = lowered.as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert any("bf16>" in line for line in dots)  # the model's matmuls compute in bf16
    assert (TARGET[platform] in text) == (linear != "dense")  # the Pallas kernels, compiled
    assert "jax.buffer_donor" in text or "tf.aliasing_output" in text  # the state is donated
