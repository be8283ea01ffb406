"""The tests compile for speed (conftest): no XLA backend optimizations, and no CPU MLIR fusion
emitters where the installed XLA has that flag."""

from __future__ import annotations

import os

import jax
from conftest import _NO_FUSION_EMITTERS, _xla_knows


def test_the_tests_compile_for_speed():
    jax.jit(lambda x: x + 1)(1)  # the option is defined once jax compiles
    assert jax.config.values["jax_disable_most_optimizations"]
    assert (_NO_FUSION_EMITTERS in os.environ.get("XLA_FLAGS", "")) is _xla_knows(
        _NO_FUSION_EMITTERS)


def test_a_flag_xla_does_not_have_is_never_set():
    assert not _xla_knows("--xla_cpu_no_such_flag_anywhere=true")
