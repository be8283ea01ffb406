"""A Hugging Face-style folder (``config.json`` + ``model.safetensors``) for runs whose model
*is* GPT-2 (Radford et al. 2019, as ``transformers``' ``GPT2LMHeadModel`` implements it), and
the reason when it is not. Neither ``torch`` nor ``transformers`` is needed: the folder is
JSON and a safetensors file (:mod:`~sparsejax.downstream.safetensors_io`).

The tiny GPT maps onto GPT-2 exactly when its positions are learned (``model.pos=learned``):
pre-norm blocks with LayerNorm (scale and bias, epsilon 1e-5) before attention and MLP and a
final LayerNorm; causal multi-head attention with biases, scores scaled by
``1/sqrt(head_dim)``; a two-layer MLP with biases and the tanh GELU (GPT-2's ``gelu_new``);
learned absolute positions added to the token embeddings; no embedding scaling; the LM head
tied to the token embedding (or, untied, ``lm_head.weight``). GPT-2's ``Conv1D`` stores
``(in, out)`` weights like the ``nnx.Linear`` kernels, and its fused ``c_attn`` is the query,
key and value kernels side by side (split in that order, heads contiguous).

Rotary positions (``model.pos=rope``, the default) have no place in GPT-2, which only adds a
learned position table; other architectures with rotary embeddings (GPT-NeoX, Llama) differ
in other parts (fused per-head QKV layouts, RMSNorm, gated MLPs, no biases) and could not be
checked here without ``transformers``, so they are not written: such runs are refused with
the reason (:class:`NotGPT2`), and ``--layout dense`` exports them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sparsejax import errors
from sparsejax.downstream import safetensors_io, validate
from sparsejax.models.gpt import GPTConfig
from sparsejax.run.rundir import RunDir

HF_DIR = "hf"  # the folder under the export dir
# transformers reads the model's config from a file named as a run dir's config (config.json)
HF_CONFIG = RunDir.CONFIG


class NotGPT2(errors.InputError):
    """The model is not GPT-2 (the message says which part differs; exit status 2)."""


def gpt2_config(cfg: GPTConfig) -> dict[str, Any]:
    """``config.json`` of ``transformers``' ``GPT2LMHeadModel`` for ``cfg`` (dropouts 0: the
    run's model has none). Tokens are the run's own ids (bytes for the byte corpus): no BOS /
    EOS token, no tokenizer files."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_ctx, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None, "eos_token_id": None, "torch_dtype": cfg.param_dtype,
    }


def gpt2_tensors(cfg: GPTConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """``GPT2LMHeadModel`` state-dict tensors from a dense GPT's params (``nnx.to_pure_dict``
    tree, :func:`sparsejax.downstream.export.dense_params`); :class:`NotGPT2` naming what
    differs (rotary positions, or leaves GPT-2 has no place for, e.g. Sparse-IFT layers)."""
    if cfg.pos != "learned":
        raise NotGPT2(f"the model uses rotary positions (model.pos={cfg.pos}); GPT-2 has only "
                      "a learned position table, so no Hugging Face GPT-2 folder can hold it "
                      "(train with model.pos=learned, or export --layout dense)")
    used: set[str] = set()

    def take(*keys: Any) -> np.ndarray:
        node: Any = params
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise NotGPT2(f"the model has no leaf {'/'.join(map(str, keys))}, which GPT-2 "
                              "needs")
            node = node[k]
        used.add("/".join(map(str, keys)))
        return np.asarray(node)

    t = {"transformer.wte.weight": take("embed", "embedding"),
         "transformer.wpe.weight": take("pos_embed")}
    for i in range(cfg.n_layer):
        b, h = (lambda *k, i=i: take("blocks", i, *k)), f"transformer.h.{i}."
        t[h + "ln_1.weight"], t[h + "ln_1.bias"] = b("attn_norm", "scale"), b("attn_norm", "bias")
        qkv = ("query", "key", "value")
        t[h + "attn.c_attn.weight"] = np.concatenate([b("attn", p, "kernel") for p in qkv], 1)
        t[h + "attn.c_attn.bias"] = np.concatenate([b("attn", p, "bias") for p in qkv])
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = (b("attn", "out", "kernel"),
                                                                  b("attn", "out", "bias"))
        t[h + "ln_2.weight"], t[h + "ln_2.bias"] = b("mlp_norm", "scale"), b("mlp_norm", "bias")
        for ours, theirs in (("fc_in", "c_fc"), ("fc_out", "c_proj")):
            t[h + f"mlp.{theirs}.weight"] = b("mlp", ours, "kernel")
            t[h + f"mlp.{theirs}.bias"] = b("mlp", ours, "bias")
    t["transformer.ln_f.weight"] = take("final_norm", "scale")
    t["transformer.ln_f.bias"] = take("final_norm", "bias")
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = take("unembed", "kernel").T
    leaves = {"/".join(map(str, p)) for p in _paths(params)}
    if leaves - used:
        raise NotGPT2(f"GPT-2 has no place for the model's leaves {sorted(leaves - used)}")
    return t


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _paths(v, (*prefix, k))]
    return [prefix]


def write_gpt2(folder: str | Path, cfg: GPTConfig, params: dict[str, Any]) -> Path:
    """Write ``FOLDER/config.json`` and ``FOLDER/model.safetensors`` (GPT-2 names, metadata
    ``format: pt`` as ``transformers`` expects, and a SHA-256 per tensor under ``sha256``);
    returns the safetensors path. :class:`NotGPT2` before anything is written when the model
    is not GPT-2."""
    tensors = gpt2_tensors(cfg, params)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HF_CONFIG).write_text(json.dumps(gpt2_config(cfg), indent=2) + "\n")
    sha = {k: validate.tensor_sha256(v) for k, v in tensors.items()}
    return safetensors_io.write(folder / "model.safetensors", tensors,
                                {"format": "pt", "sha256": json.dumps(sha)})
