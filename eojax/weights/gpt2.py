"""Hugging Face GPT-2 checkpoints (a local directory: config.json + model.safetensors) <-> eojax GPT2.

No torch: the weights are read and written with safetensors.numpy. Both key spellings are accepted:
'transformer.h.0...' (GPT2LMHeadModel.save_pretrained) and 'h.0...' (the hub's gpt2 / distilgpt2 files),
and the causal-mask buffers some of them store (h.{i}.attn.bias, h.{i}.attn.masked_bias) are skipped.

HF key (D width, H heads, Dh = D/H, M mlp)        eojax path
  wte.weight (V, D)                                wte/embedding (the output matrix too: tied)
  wpe.weight (P, D)                                wpe/embedding
  h.i.ln_1|ln_2.weight / .bias (D,)                h_i/ln_1|ln_2/scale / bias
  h.i.attn.c_attn.weight (D, 3D)                   h_i/attn/c_attn/kernel (D, 3, H, Dh)
  h.i.attn.c_attn.bias (3D,)                       h_i/attn/c_attn/bias (3, H, Dh)
  h.i.attn.c_proj.weight (D, D)                    h_i/attn/c_proj/kernel (H, Dh, D)
  h.i.mlp.c_fc.weight (D, M), c_proj.weight (M, D) h_i/mlp/c_fc|c_proj/kernel, unchanged
  ln_f.weight / .bias                              ln_f/scale / bias
HF's Conv1D stores its weight (in, out), the same orientation as a flax kernel, so nothing is
transposed; the fused c_attn output (3D) is (q|k|v, head, head_dim) row-major, hence the reshapes.
An untied lm_head.weight (different from wte) has no place in eojax's model and is an error.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import jax
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import CheckpointMismatchError, key_problems, raise_mismatch
from eojax.models.gpt2 import GPT2

CONFIG, WEIGHTS = "config.json", "model.safetensors"
_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# config.json settings that would change the computation and that eojax's GPT2 does not implement.
_UNSUPPORTED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
                "add_cross_attention": (False,), "tie_word_embeddings": (True,)}


def load_config(directory) -> dict:
    """GPT2 keyword arguments from a checkpoint directory's config.json."""
    path = os.path.join(os.fspath(directory), CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 checkpoint directory {directory} has no {CONFIG}")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from e
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}: model_type {hf['model_type']!r} is not gpt2")
    for key, ok in _UNSUPPORTED.items():
        if key in hf and hf[key] not in ok:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (eojax GPT2 implements {ok})")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in hf]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return dict(vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
                n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
                dropout=float(hf.get("resid_pdrop", 0.1)), layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)))


def read_state_dict(directory) -> dict[str, np.ndarray]:
    """{HF key without 'transformer.': float32 array} from model.safetensors; mask buffers dropped."""
    path = os.path.join(os.fspath(directory), WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 checkpoint directory {directory} has no {WEIGHTS} "
                                "(convert a pytorch_model.bin with save_pretrained(safe_serialization=True))")
    from safetensors.numpy import load_file
    try:
        raw = load_file(path)
    except Exception as e:  # safetensors raises its own error types; name the file in all cases
        raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    out = {}
    for key, value in raw.items():
        key = key.removeprefix("transformer.")
        if _BUFFERS.match(key):
            continue
        out[key] = np.asarray(value, np.float32)  # bf16 / f16 checkpoints are exact in float32
    return out


def _hf_to_eojax(sd: Mapping[str, np.ndarray], cfg: dict) -> dict:
    d, h = cfg["n_embd"], cfg["n_head"]
    flat = {("wte", "embedding"): sd["wte.weight"], ("wpe", "embedding"): sd["wpe.weight"],
            ("ln_f", "scale"): sd["ln_f.weight"], ("ln_f", "bias"): sd["ln_f.bias"]}
    for i in range(cfg["n_layer"]):
        p, b = f"h.{i}.", (f"h_{i}",)
        for ln in ("ln_1", "ln_2"):
            flat[b + (ln, "scale")], flat[b + (ln, "bias")] = sd[p + ln + ".weight"], sd[p + ln + ".bias"]
        flat[b + ("attn", "c_attn", "kernel")] = sd[p + "attn.c_attn.weight"].reshape(d, 3, h, d // h)
        flat[b + ("attn", "c_attn", "bias")] = sd[p + "attn.c_attn.bias"].reshape(3, h, d // h)
        flat[b + ("attn", "c_proj", "kernel")] = sd[p + "attn.c_proj.weight"].reshape(h, d // h, d)
        flat[b + ("attn", "c_proj", "bias")] = sd[p + "attn.c_proj.bias"]
        for name in ("c_fc", "c_proj"):
            flat[b + ("mlp", name, "kernel")] = sd[f"{p}mlp.{name}.weight"]
            flat[b + ("mlp", name, "bias")] = sd[f"{p}mlp.{name}.bias"]
    return traverse_util.unflatten_dict(flat)


def _eojax_to_hf(params: Mapping, cfg: dict) -> dict[str, np.ndarray]:
    f = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    d = cfg["n_embd"]
    sd = {"wte.weight": f["wte/embedding"], "wpe.weight": f["wpe/embedding"],
          "ln_f.weight": f["ln_f/scale"], "ln_f.bias": f["ln_f/bias"]}
    for i in range(cfg["n_layer"]):
        p, b = f"h.{i}.", f"h_{i}/"
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = f[b + ln + "/scale"], f[b + ln + "/bias"]
        sd[p + "attn.c_attn.weight"] = f[b + "attn/c_attn/kernel"].reshape(d, 3 * d)
        sd[p + "attn.c_attn.bias"] = f[b + "attn/c_attn/bias"].reshape(3 * d)
        sd[p + "attn.c_proj.weight"] = f[b + "attn/c_proj/kernel"].reshape(d, d)
        sd[p + "attn.c_proj.bias"] = f[b + "attn/c_proj/bias"]
        for name in ("c_fc", "c_proj"):
            sd[f"{p}mlp.{name}.weight"] = f[f"{b}mlp/{name}/kernel"]
            sd[f"{p}mlp.{name}.bias"] = f[f"{b}mlp/{name}/bias"]
    return sd


def _expected_hf_shapes(cfg: dict) -> dict[str, tuple]:
    d, m = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]
    shapes = {"wte.weight": (cfg["vocab_size"], d), "wpe.weight": (cfg["n_positions"], d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                       p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                       p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "mlp.c_fc.weight": (d, m), p + "mlp.c_fc.bias": (m,),
                       p + "mlp.c_proj.weight": (m, d), p + "mlp.c_proj.bias": (d,)})
    return shapes


def _check_state_dict(sd: dict, cfg: dict, where: str) -> None:
    """Every missing, unexpected or reshaped key at once, before anything is converted."""
    if "lm_head.weight" in sd:
        lm = sd.pop("lm_head.weight")
        if "wte.weight" in sd and (lm.shape != sd["wte.weight"].shape or not np.array_equal(lm, sd["wte.weight"])):
            raise CheckpointMismatchError(f"{where}: lm_head.weight differs from wte.weight; eojax GPT2 ties them")
    raise_mismatch(key_problems({k: v.shape for k, v in sd.items()}, _expected_hf_shapes(cfg)),
                   f"{where} does not match its config.json")


def load_params(directory, model: GPT2 | None = None) -> dict:
    """The checkpoint's params as an eojax GPT2 param tree (numpy float32, unboxed).

    With `model`, its sizes must be the checkpoint's (a CheckpointMismatchError lists what differs)."""
    cfg = load_config(directory)
    if model is not None:
        ours = {k: getattr(model, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
        ours["n_inner"] = model.n_inner or 4 * model.n_embd
        theirs = dict(cfg, n_inner=cfg["n_inner"] or 4 * cfg["n_embd"])
        diff = {k: (theirs[k], v) for k, v in ours.items() if theirs[k] != v}
        if diff:
            raise CheckpointMismatchError(f"{directory}: checkpoint vs model sizes differ: {diff}")
    sd = read_state_dict(directory)
    _check_state_dict(sd, cfg, os.path.join(os.fspath(directory), WEIGHTS))
    return _hf_to_eojax(sd, cfg)


def load_pretrained(directory, **overrides) -> tuple[GPT2, dict]:
    """(GPT2 built from config.json + overrides such as dtype or dropout, its params)."""
    cfg = load_config(directory)
    sizes = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"}
    if sizes & set(overrides):
        raise ValueError(f"cannot override the checkpoint's sizes {sorted(sizes & set(overrides))}")
    model = GPT2(**{**cfg, **overrides})
    return model, load_params(directory, model)


def export(params: Mapping, model: GPT2, directory) -> None:
    """Writes `directory`/config.json + model.safetensors in GPT2LMHeadModel's layout (keys prefixed
    'transformer.', as save_pretrained writes them): transformers' from_pretrained reads it back."""
    from safetensors.numpy import save_file

    params = jax.tree.map(np.asarray, nn.meta.unbox(params))  # boxed (fresh init) or plain
    cfg = {k: getattr(model, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")}
    sd = _eojax_to_hf(params, cfg)
    _check_state_dict(dict(sd), cfg, "exported params")
    os.makedirs(directory, exist_ok=True)
    save_file({f"transformer.{k}": np.ascontiguousarray(v) for k, v in sd.items()},
              os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new",
              tie_word_embeddings=True, layer_norm_epsilon=model.layer_norm_epsilon,
              resid_pdrop=model.dropout, embd_pdrop=model.dropout, attn_pdrop=model.dropout, **cfg)
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(hf, f, indent=2)


def load_tokenizer(directory):
    """transformers' GPT-2 tokenizer from local files only: tokenizer.json (fast) or vocab.json +
    merges.txt. transformers is imported here, not at module import: the model path never needs it."""
    directory = os.fspath(directory)
    has_fast = os.path.isfile(os.path.join(directory, "tokenizer.json"))
    has_bpe = all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt"))
    if not (has_fast or has_bpe):
        raise FileNotFoundError(f"{directory} has no GPT-2 tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    try:
        from transformers import GPT2TokenizerFast
    except ImportError as e:
        raise ImportError("loading a GPT-2 BPE tokenizer needs the transformers package") from e
    return GPT2TokenizerFast.from_pretrained(directory, local_files_only=True)
