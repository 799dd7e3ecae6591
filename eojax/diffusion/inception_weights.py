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


def torch_shapes(model: InceptionV3 | None = None) -> dict[str, tuple]:
    """{PyTorch state-dict key: shape} of the weights the pool3 features use (no fc, AuxLogits or
    num_batches_tracked)."""
    inverse = {v: k for k, v in _BN.items()}
    out = {}
    for (*mods, leaf), shape in expected_shapes(model).items():
        if leaf == "kernel":
            kh, kw, i, o = shape
            out[".".join(mods) + ".conv.weight"] = (o, i, kh, kw)
        else:
            out[".".join(mods) + ".bn." + inverse[leaf]] = shape
    return out


def random_state_dict(seed: int = 0, model: InceptionV3 | None = None) -> dict[str, np.ndarray]:
    """Seeded random InceptionV3 weights in the PyTorch layout, float32, from numpy alone: the
    network of the pytorch-fid parity fixture (scripts/fixtures/make_inception_fixture.py loads the
    same arrays into pytorch-fid's model; the published weights are ~95 MB). Keys in sorted order,
    each drawn from one default_rng(seed) stream: conv He-normal (std sqrt(2 / fan_in)); BatchNorm
    scale U(0.5, 1.5), bias N(0, 0.1^2), running mean N(0, 0.1^2), running var U(0.5, 2), so that the
    inference-mode BatchNorm is really exercised."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(torch_shapes(model).items()):
        n = shape[0]
        if key.endswith("conv.weight"):
            std = np.sqrt(2.0 / np.prod(shape[1:]))
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        elif key.endswith("bn.weight"):
            value = 0.5 + rng.random(n, dtype=np.float32)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * rng.standard_normal(n, dtype=np.float32)
        else:  # running_var
            value = 0.5 + 1.5 * rng.random(n, dtype=np.float32)
        out[key] = value.astype(np.float32)
    return out


def load(path, model: InceptionV3 | None = None) -> dict:
    """InceptionV3 params (numpy float32) from a weights file."""
    return from_state_dict(read_state_dict(path), model, os.fspath(path))
