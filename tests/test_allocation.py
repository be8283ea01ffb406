"""Allocations against JaxPruner's measured ERK numbers, count invariants and the jit allocator."""

from __future__ import annotations

import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import allocation as A
from sparsejax.prunable import path_str


def test_doctests():
    assert doctest.testmod(A, extraglobs={"np": np}).failed == 0


def ndim2(path, leaf):
    """The reference data's predicate: every leaf with ndim >= 2 (embed included)."""
    return leaf.ndim >= 2


def build(shapes: dict[str, list[int]]) -> dict:
    """Nested params from ``{"a/b": shape}`` (zeros; allocation only reads shapes)."""
    params: dict = {}
    for name, shape in shapes.items():
        *outer, last = name.split("/")
        node = params
        for part in outer:
            node = node.setdefault(part, {})
        node[last] = np.zeros(shape, np.float32)
    return params


def by_name(tree) -> dict:
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def reference(reference_data):
    return json.loads((reference_data / "erk_reference.json").read_text())


@pytest.mark.parametrize(
    "key,call",
    [
        ("erk_power_1.0", lambda p, s: A.erk(p, s, prunable=ndim2)),
        ("erk_power_0.5", lambda p, s: A.erk(p, s, power_scale=0.5, prunable=ndim2)),
        ("uniform", lambda p, s: A.uniform(p, s, prunable=ndim2)),
    ],
)
def test_reproduces_jaxpruner_reference(reference, key, call):
    params = build(reference["shapes"])
    got = by_name(call(params, reference["target_sparsity"]))
    for name, want in reference[key].items():
        assert abs(got[name] - want) < 1e-9, name
        assert type(got[name]) is float
    assert got["bias"] == 0.0  # ndim < 2: not prunable


def test_reproduces_clamp_example(reference):
    example = reference["clamp_example"]
    got = by_name(A.erk(build(example["shapes"]), example["target_sparsity"], prunable=ndim2))
    for name, want in example["erk_power_1.0"].items():
        assert abs(got[name] - want) < 1e-9, name
    assert got["small"] == 0.0  # the clamp: its ERK density would exceed 1


SHAPES = {
    "conv": [3, 3, 8, 16],
    "tiny": [2, 3],
    "a/fc": [64, 48],
    "a/out": [48, 10],
    "a/bias": [48],
    "embed": [100, 8],
}


@pytest.mark.parametrize("s", [0.05, 0.3, 0.5, 0.8, 0.97])
@pytest.mark.parametrize("name,power", [("erk", 1.0), ("erk", 0.5), ("er", 1.0)])
def test_erk_invariants(s, name, power):
    """Independent float64 checks: kept count equals uniform's, densities proportional to the
    (power-scaled) ratio among the non-dense leaves, and only the largest ratios go dense."""
    params = build(SHAPES)
    got = by_name(getattr(A, name)(params, s, power_scale=power))
    assert got["a/bias"] == 0.0 and got["embed"] == 0.0  # the default predicate (docs/design.md)
    prunable = ["conv", "tiny", "a/fc", "a/out"]
    sizes = {k: math.prod(SHAPES[k]) for k in prunable}
    dims = {k: SHAPES[k][-2:] if name == "er" else SHAPES[k] for k in prunable}
    raw = {k: (sum(dims[k]) / math.prod(dims[k])) ** power for k in prunable}
    kept = sum((1 - got[k]) * sizes[k] for k in prunable)
    assert kept == pytest.approx(sum(n - math.floor(s * n) for n in sizes.values()), rel=1e-12)
    sparse = [k for k in prunable if got[k] > 0]
    dense = [k for k in prunable if got[k] == 0]
    ratios = [(1 - got[k]) / raw[k] for k in sparse]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)  # one eps for all
    if dense and sparse:
        assert min(raw[k] for k in dense) > max(raw[k] for k in sparse)
    assert all(0 <= got[k] < 1 for k in prunable)


def test_er_uses_last_two_dims_only():
    params = {"conv": np.zeros((5, 5, 8, 8)), "fc": np.zeros((8, 8))}
    assert by_name(A.er(params, 0.5)) == {"conv": 0.5, "fc": 0.5}  # same (8, 8) ratio
    erk = by_name(A.erk(params, 0.5))
    assert erk["conv"] > erk["fc"]  # ERK counts the 5x5 kernel: sparser conv


def test_uniform_and_explicit():
    params = {"w": np.zeros((4, 4)), "v": np.zeros((4, 2)), "bias": np.zeros(4)}
    assert A.uniform(params, 0.25) == {"w": 0.25, "v": 0.25, "bias": 0.0}
    got = A.explicit(params, {"w": 0.75}, default=0.5)
    assert got == {"w": 0.75, "v": 0.5, "bias": 0.0}
    with pytest.raises(ValueError, match="'u' is not a prunable leaf.*'v', 'w'"):
        A.explicit(params, {"u": 0.5})
    with pytest.raises(ValueError, match="'bias' is not a prunable leaf"):
        A.explicit(params, {"bias": 0.5})
    with pytest.raises(ValueError, match=r"per_leaf\['w'\] must be in \[0, 1\)"):
        A.explicit(params, {"w": 1.0})


@pytest.mark.parametrize("name,power", [("uniform", 1.0), ("erk", 1.0), ("erk", 0.5), ("er", 1.0)])
def test_allocator_matches_python_under_jit(name, power):
    params = build(SHAPES)
    alloc = jax.jit(A.allocator(name, params, power_scale=power))
    python = getattr(A, name)
    for k in range(32):  # s = k/32 is exact in float32, so floor(s * n) agrees exactly
        s = k / 32
        kw = {} if name == "uniform" else {"power_scale": power}
        want = by_name(python(params, s, **kw))
        got = by_name(alloc(jnp.float32(s)))
        assert set(got) == set(want)
        for leaf, v in got.items():
            assert v.dtype == jnp.float32 and v.shape == ()
            assert float(v) == pytest.approx(want[leaf], abs=1e-6), (s, leaf)


def test_allocator_clamp_and_vmap(reference):
    example = reference["clamp_example"]
    params = build(example["shapes"])
    alloc = A.allocator("erk", params, prunable=ndim2)
    got = by_name(jax.jit(alloc)(example["target_sparsity"]))
    for leaf, want in example["erk_power_1.0"].items():
        assert float(got[leaf]) == pytest.approx(want, abs=1e-6)
    grid = jnp.linspace(0.0, 0.95, 7)
    batched = by_name(jax.jit(jax.vmap(alloc))(grid))
    for i, s in enumerate(np.asarray(grid)):
        want = by_name(A.erk(params, float(s), prunable=ndim2))
        for leaf in want:
            assert float(batched[leaf][i]) == pytest.approx(want[leaf], abs=1e-6)


def always_false(path, leaf):
    return False


BAD = [
    (lambda p: A.uniform(p, 1.0), "sparsity must be in"),
    (lambda p: A.erk(p, -0.1), "sparsity must be in"),
    (lambda p: A.er(p, "0.5"), "sparsity must be a float"),
    (lambda p: A.erk(p, 0.5, power_scale=-1.0), "power_scale"),
    (lambda p: A.erk(p, 0.5, prunable=always_false), "selects no leaf"),
    (lambda p: A.uniform(p, 0.5, prunable=always_false), "selects no leaf"),
    (lambda p: A.explicit(p, {}, default=2.0), "default"),
    (lambda p: A.allocator("global", p), "one of \\['uniform', 'erk', 'er'\\]"),
    (lambda p: A.allocator("erk", p, prunable=always_false), "selects no leaf"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(build(SHAPES))
