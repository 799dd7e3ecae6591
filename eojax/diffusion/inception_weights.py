"""InceptionV3 state dicts (pytorch-fid's pt_inception-2015-12-05 weights, or torchvision's inception_v3)
<-> eojax.diffusion.inception.InceptionV3 params.

Files: .safetensors and .npz are read without torch (and without pickle); .pth / .pt only through
torch.load(weights_only=True), when torch is installed. Keys are the PyTorch module paths:
  <block>.<branch>.conv.weight (O, I, kh, kw)   ->  <block>/<branch>/kernel (kh, kw, I, O)
  <block>.<branch>.bn.weight / bias             ->  bn_scale / bn_bias
  <block>.<branch>.bn.running_mean / var        ->  bn_mean / bn_var
The classifier (fc.*), the auxiliary head (AuxLogits.*) and num_batches_tracked are not used by the
pool3 features and are skipped. Missing, unexpected or reshaped keys are one error listing them all.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import key_problems, raise_mismatch
from eojax.diffusion.inception import InceptionV3

_BN = {"weight": "bn_scale", "bias": "bn_bias", "running_mean": "bn_mean", "running_var": "bn_var"}
_SKIP = ("fc.", "AuxLogits.")


def read_state_dict(path) -> dict[str, np.ndarray]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"InceptionV3 weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k], np.float32) for k in z.files}
        if path.endswith((".pth", ".pt")):
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"{path}: reading .pth needs torch; convert it to .safetensors or .npz") from e
            sd = torch.load(path, map_location="cpu", weights_only=True)
            return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:  # each reader raises its own types; name the file in all cases
        raise ValueError(f"{path} is not a readable weights file: {type(e).__name__}: {e}") from e
    raise ValueError(f"{path}: unknown weights format (use .safetensors, .npz or .pth)")


def expected_shapes(model: InceptionV3 | None = None) -> dict[tuple, tuple]:
    model = model or InceptionV3()
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.meta.unbox(abstract["params"])).items()}


def _to_path(key: str) -> tuple | None:
    *mods, layer, leaf = key.split(".")
    if layer == "conv" and leaf == "weight":
        return (*mods, "kernel")
    if layer == "bn" and leaf in _BN:
        return (*mods, _BN[leaf])
    return None


def from_state_dict(sd: dict[str, np.ndarray], model: InceptionV3 | None = None, where: str = "state dict") -> dict:
    flat, keys = {}, {}
    for key, value in sd.items():
        if key.startswith(_SKIP) or key.endswith("num_batches_tracked"):
            continue
        path = _to_path(key) or (key,)  # an unconvertible key is reported under its own name
        flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
        keys[path] = key
    name = lambda p: keys.get(p, "/".join(p))  # noqa: E731  (file keys where the file has them)
    raise_mismatch(key_problems({p: v.shape for p, v in flat.items()}, expected_shapes(model), "file", name),
                   f"{where} is not an InceptionV3")
    return traverse_util.unflatten_dict(flat)


def to_state_dict(params) -> dict[str, np.ndarray]:
    """The inverse of from_state_dict (PyTorch key names and layouts)."""
    inverse = {v: k for k, v in _BN.items()}
    out = {}
    for path, value in traverse_util.flatten_dict(nn.meta.unbox(params)).items():
        *mods, leaf = path
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            # contiguous: safetensors' save_file writes a transposed view's memory, not its values
            out[".".join(mods) + ".conv.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        else:
            out[".".join(mods) + ".bn." + inverse[leaf]] = value
    return out


def load(path, model: InceptionV3 | None = None) -> dict:
    """InceptionV3 params (numpy float32) from a weights file."""
    return from_state_dict(read_state_dict(path), model, os.fspath(path))
