"""Export of prunable kernels to BSR / N:M storage, npz round trip and summary table."""

from __future__ import annotations

import dataclasses
import json
import struct
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BSRMatrix, NMMatrix
from sparsejax.downstream import export, safetensors_io, validate
from sparsejax.downstream.export import (
    ExportRefused,
    export_params,
    read_export,
    save_export,
    summary_table,
)


def make_params():
    rng = np.random.default_rng(0)
    k1 = rng.standard_normal((32, 64)).astype(np.float32)
    k1[:16, :] = 0.0  # two of the four 16x32 blocks are zero
    keep = np.argsort(rng.random((8, 4, 16)), axis=1) < 2  # exactly 2:4 along K
    k2 = (rng.standard_normal((32, 16)) * keep.reshape(32, 16)).astype(np.float32)
    return {
        "embed": {"embedding": jnp.ones((10, 32))},
        "block0": {
            "mlp": {"kernel": jnp.asarray(k1, jnp.bfloat16), "bias": jnp.zeros(64)},
            "out": {"kernel": jnp.asarray(k2)},
        },
    }


def test_bsr_export_roundtrip(tmp_path):
    params = make_params()
    with pytest.warns(UserWarning, match=r"block0/out/kernel' kept dense: shape \(32, 16\)"):
        out = export_params(params, "bsr", block=(16, 32))
    assert isinstance(out["block0/out/kernel"], np.ndarray)
    assert isinstance(out["block0/mlp/kernel"], BSRMatrix)
    assert out["block0/mlp/kernel"].layout.nnz == 2
    assert isinstance(out["embed/embedding"], np.ndarray)  # not prunable: kept dense
    assert isinstance(out["block0/mlp/bias"], np.ndarray)
    loaded, _ = read_export(save_export(tmp_path / "e", out))
    assert loaded.keys() == out.keys()
    for name, obj in out.items():
        a = loaded[name]
        dense_a = a.to_dense() if hasattr(a, "to_dense") else a
        dense_o = obj.to_dense() if hasattr(obj, "to_dense") else obj
        assert np.asarray(dense_a).dtype == np.asarray(dense_o).dtype
        np.testing.assert_array_equal(np.asarray(dense_a), np.asarray(dense_o))
    np.testing.assert_array_equal(
        np.asarray(loaded["block0/mlp/kernel"].to_dense()),
        np.asarray(params["block0"]["mlp"]["kernel"]),
    )


def test_nm_export_refuses_weights_that_are_not_nm_and_never_reprunes(tmp_path):
    params = make_params()
    with pytest.raises(ExportRefused, match=r"block0/mlp/kernel.*never re-prunes.*pruned 2:4"):
        export_params(params, "nm")
    only_out = export_params(params, "nm", prunable=lambda p, x: "out" in str(p))
    assert isinstance(only_out["block0/out/kernel"], NMMatrix)
    np.testing.assert_array_equal(
        np.asarray(only_out["block0/out/kernel"].to_dense()),
        np.asarray(params["block0"]["out"]["kernel"]),
    )
    for suffix in (".npz", ".safetensors"):
        loaded, _ = read_export(save_export(tmp_path / f"e{suffix}", only_out))
        np.testing.assert_array_equal(np.asarray(loaded["block0/out/kernel"].to_dense()),
                                      np.asarray(params["block0"]["out"]["kernel"]))
        assert loaded["block0/mlp/kernel"].dtype == jnp.bfloat16
    summary = summary_table(only_out)
    assert "block0/out/kernel" in summary and "nm 2:4" in summary


def test_summary_reports_bytes_and_density():
    with pytest.warns(UserWarning, match="kept dense"):
        out = export_params(make_params(), "bsr", block=(16, 32))
    table = summary_table(out)
    line = next(r for r in table.splitlines() if r.startswith("block0/mlp/kernel"))
    # 2 of 4 bf16 blocks kept: 2*16*32*2 bytes values + 4*(2 + 2 + 1) bytes of int32 tables
    assert " 2068 " in line and " 4096 " in line
    density = float(line.split()[4])
    assert density == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="fmt must be one of"):
        export_params(make_params(), "csr")


def test_safetensors_stores_big_endian_arrays_little_endian(tmp_path):
    """The safetensors format is little-endian whatever the array's byte order: big-endian
    ``>f4`` / ``>i4`` arrays are written as the little-endian encoding of their values (bytes
    built here with ``struct``, not numpy), with the plain ``F32`` / ``I32`` dtypes, and read
    back equal (as native little-endian arrays)."""
    f = np.array([1.0, -2.5, 3.0e-3], dtype=">f4")
    i = np.array([[1, -2], [70000, -(2**31)]], dtype=">i4")
    path = safetensors_io.write(tmp_path / "be.safetensors", {"f": f, "i": i})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header == {"f": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                      "i": {"dtype": "I32", "shape": [2, 2], "data_offsets": [12, 28]}}
    assert raw[8 + n:] == (struct.pack("<3f", 1.0, -2.5, 3.0e-3)
                           + struct.pack("<4i", 1, -2, 70000, -(2**31)))
    assert raw[8 + n:8 + n + 4] == bytes([0x00, 0x00, 0x80, 0x3F])  # 1.0f, low byte first
    tensors, metadata = safetensors_io.read(path)
    assert metadata == {}
    for name, want in (("f", f), ("i", i)):
        assert tensors[name].dtype.str == "<" + want.dtype.str[1:]
        np.testing.assert_array_equal(tensors[name], want)


def _blocks_kept(n_blocks: int) -> np.ndarray:
    """A 64x64 float32 kernel whose first ``n_blocks`` 8x8 blocks (row-major) are non-zero."""
    w = np.zeros((8, 8, 8, 8), np.float32)  # (block row, row, block col, col)
    for b in range(n_blocks):
        w[b // 8, :, b % 8, :] = 1.0 + b
    return w.reshape(64, 64)


@pytest.mark.parametrize("n_blocks, embedding, kept", [
    # BSR bytes of the kernel: 256 per kept block + int32 tables 4 (blocks + 8 + 1) = 260 b + 36
    (56, False, True),   # 14596 / 16384 bytes: saves 10.9%
    (57, False, False),  # 14856 / 16384: saves 9.3%, between 0% and the threshold
    (55, True, True),    # + a dense 16x64 embedding: 18432 / 20480, saves exactly 10%
    (56, True, False),   # 18692 / 20480: saves 8.7% (the kernel alone would save 10.9%)
])
def test_export_refuses_below_ten_percent_savings_of_the_whole_model(tmp_path, monkeypatch,
                                                                     n_blocks, embedding, kept):
    """``export_run``'s threshold on hand-counted bytes: an export is refused (with the ratio,
    the saving and the kept-block count, and no file written) when the whole model, dense
    leaves included, saves less than ``MIN_SAVING`` = 10% of its dense bytes, and written when
    it saves 10% or more. The run is faked: a config and the dense params."""
    params = {"blocks": {"0": {"fc": {"kernel": _blocks_kept(n_blocks)}}}}
    if embedding:
        params["embed"] = {"embedding": np.ones((16, 64), np.float32)}

    @dataclasses.dataclass
    class Cfg:
        n_layer: int = 1

    loaded = SimpleNamespace(
        config=SimpleNamespace(model=SimpleNamespace(block=8), sparsity=SimpleNamespace(n=2, m=4)),
        model=SimpleNamespace(cfg=Cfg()), step=0)
    monkeypatch.setattr(export.loading, "load", lambda run_dir, step=None: loaded)
    monkeypatch.setattr(export, "dense_params", lambda model: params)
    out = tmp_path / "out"
    dense = 16384 + (4096 if embedding else 0)
    nbytes = 260 * n_blocks + 36 + (4096 if embedding else 0)
    if kept:
        result = export.export_run(tmp_path / "run", "bsr", out=out, block=(8, 8))
        assert (result.nbytes, result.dense_nbytes) == (nbytes, dense)
        assert result.path == out / "export_bsr.npz" and result.path.is_file()
    else:
        with pytest.raises(ExportRefused) as e:
            export.export_run(tmp_path / "run", "bsr", out=out, block=(8, 8))
        saves = 100 * (1 - nbytes / dense)
        assert (f"{nbytes / dense:.3f}x the dense size (saves {saves:.1f}% < 10%): "
                f"{n_blocks} of 64 blocks") in str(e.value)
        assert not out.exists()


# ---- Hugging Face GPT-2 folder ------------------------------------------------------------


def _gpt2_reference(t: dict[str, np.ndarray], hf: dict, tokens: np.ndarray) -> np.ndarray:
    """GPT-2's forward pass as ``transformers``' ``GPT2LMHeadModel`` computes it, in float64
    numpy on the state-dict tensors and ``config.json`` alone (Radford et al. 2019; HF
    ``modeling_gpt2``: Conv1D ``x @ W + b``, ``c_attn`` split into q, k, v, ``gelu_new``)."""
    f = {k: v.astype(np.float64) for k, v in t.items()}
    eps, n_head = hf["layer_norm_epsilon"], hf["n_head"]

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * f[p + ".weight"] + f[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    B, L = tokens.shape
    h = f["transformer.wte.weight"][tokens] + f["transformer.wpe.weight"][:L][None]
    D = h.shape[-1]
    for i in range(hf["n_layer"]):
        p = f"transformer.h.{i}."
        qkv = ln(h, p + "ln_1") @ f[p + "attn.c_attn.weight"] + f[p + "attn.c_attn.bias"]
        q, k, v = (a.reshape(B, L, n_head, D // n_head).transpose(0, 2, 1, 3)
                   for a in np.split(qkv, 3, axis=-1))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // n_head)
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v
        o = o.transpose(0, 2, 1, 3).reshape(B, L, D)
        h = h + o @ f[p + "attn.c_proj.weight"] + f[p + "attn.c_proj.bias"]
        m = gelu_new(ln(h, p + "ln_2") @ f[p + "mlp.c_fc.weight"] + f[p + "mlp.c_fc.bias"])
        h = h + m @ f[p + "mlp.c_proj.weight"] + f[p + "mlp.c_proj.bias"]
    h = ln(h, "transformer.ln_f")
    head = f["transformer.wte.weight"] if hf["tie_word_embeddings"] else f["lm_head.weight"]
    return h @ head.T


@pytest.mark.parametrize("tie", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_hf_gpt2_folder_computes_the_models_logits(tmp_path, tie):
    """A learned-position GPT written as a Hugging Face GPT-2 folder: GPT-2's forward pass
    (float64 numpy from the file's tensors and config.json, nothing of sparsejax) gives the
    model's logits; every tensor's SHA-256 is recorded."""
    from flax import nnx

    from sparsejax.downstream import hf
    from sparsejax.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(n_layer=2, d_model=16, n_head=2, d_ff=24, vocab_size=11, n_ctx=8,
                    pos="learned", tie_embeddings=tie)
    graphdef, state, rest = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))),
                                      nnx.Param, ...)
    rng = np.random.default_rng(3)  # every weight, norm scale and bias random (none trivial)
    params = jax.tree_util.tree_map(
        lambda x: (rng.standard_normal(x.shape) * (0.3 if len(x.shape) > 1 else 1.0)).astype(
            np.float32), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
    model = nnx.merge(graphdef, state, rest)
    path = hf.write_gpt2(tmp_path / "hf", cfg, params)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_inner"] == 24
    tensors, meta = safetensors_io.read(path)
    assert meta["format"] == "pt"
    assert ("lm_head.weight" in tensors) is not tie
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (16, 48)
    sha = json.loads(meta["sha256"])
    assert all(sha[k] == validate.tensor_sha256(v) for k, v in tensors.items())
    tokens = np.random.default_rng(0).integers(0, 11, (2, 8))
    ref = _gpt2_reference(tensors, config, tokens)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref).max() > 0.1  # logits that can tell a wrong mapping


def test_hf_gpt2_refuses_rotary_positions(tmp_path):
    from sparsejax.downstream import hf
    from sparsejax.models.gpt import GPTConfig

    cfg = GPTConfig(n_layer=1, d_model=8, n_head=2, d_ff=8, vocab_size=5, n_ctx=4)
    with pytest.raises(hf.NotGPT2, match=r"rotary positions \(model.pos=rope\).*--layout dense"):
        hf.write_gpt2(tmp_path / "hf", cfg, {})
    assert not (tmp_path / "hf").exists()
