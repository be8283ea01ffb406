"""The fast tier (``-m "not slow"``) compiles for speed; the full suite, which CI runs, keeps
XLA's defaults (conftest's ``pytest_configure``)."""

from __future__ import annotations

import os
import re

import jax
from conftest import _NO_FUSION_EMITTERS, _xla_knows


def test_only_the_fast_tier_compiles_for_speed(request):
    fast = bool(re.search(r"\bnot\s+slow\b", request.config.getoption("markexpr") or ""))
    jax.jit(lambda x: x + 1)(1)  # the flag is defined once jax compiles
    optimized = not jax.config.values["jax_disable_most_optimizations"]
    emitters = _NO_FUSION_EMITTERS not in os.environ.get("XLA_FLAGS", "")
    if fast:
        assert not optimized
        assert emitters is not _xla_knows(_NO_FUSION_EMITTERS)
    elif "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
        assert optimized and emitters


def test_a_flag_xla_does_not_have_is_never_set():
    assert not _xla_knows("--xla_cpu_no_such_flag_anywhere=true")
