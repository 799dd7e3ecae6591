"""torchvision / timm ResNet state dicts <-> eojax ResNet variables ({'params', 'batch_stats'}).

timm's resnet18 / resnet50 use torchvision's keys and shapes exactly (tests/fixtures/resnet/layouts.json),
so one table reads both. torch key -> eojax path (collection first):
  conv1.weight (O, I, 7, 7)                      params/conv1/kernel (7, 7, C, O), adapted to C bands
  bn1.weight | bias                              params/bn1/scale | bias
  bn1.running_mean | running_var                 batch_stats/bn1/mean | var
  layer{s}.{j}.conv{k}.weight, .bn{k}.*          .../layer{s}_{j}/conv{k}, bn{k}
  layer{s}.{j}.downsample.0.weight, .1.*         .../layer{s}_{j}/downsample_conv, downsample_bn
  fc.weight (N, D) | fc.bias                     params/fc/kernel (D, N) | bias (only with num_classes)
Ignored (reported): every `num_batches_tracked` (flax's BatchNorm keeps no step counter; torch uses it
only with momentum=None), `fc.*` for a model without a head, and keys outside the ResNet's prefix
(a 'backbone.' / 'encoder.' prefix is found from `layer1.0.conv1.weight`).

First conv for another band count (`adapt_input_conv`, timm's rule): a checkpoint's conv1 over I
input channels (3 for every published ResNet) becomes one over C: C = I keeps it; C = 1 sums it over
the I channels; otherwise its channel kernels repeat cyclically (R, G, B, R, G, ...) to C and every
kernel is scaled by I / C, so an input whose C bands all equal one image gives the same response
as that image. Files are read by weights.common.load_state_dict (.safetensors, .npz, or a .pth only
through torch.load(weights_only=True) when torch is installed).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import check_compatible
from eojax.models.resnet import EXPANSION, ResNet
from eojax.weights import common

NUM_BATCHES = "num_batches_tracked"


def adapt_input_conv(weight: np.ndarray, channels: int) -> np.ndarray:
    """timm's adapt_input_conv of a torch conv kernel (O, I, kh, kw) to (O, channels, kh, kw): the same
    kernel for channels = I; summed over I for one channel; else repeated cyclically over the input
    axis to `channels` and scaled by I / channels. (timm fixes I = 3; here I is the kernel's own.)"""
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 4:
        raise ValueError(f"adapt_input_conv: expected a conv kernel (O, I, kh, kw), got shape {weight.shape}")
    if channels < 1:
        raise ValueError(f"adapt_input_conv: channels must be >= 1, got {channels}")
    base = weight.shape[1]
    if channels == base:
        return weight
    if channels == 1:
        return weight.sum(axis=1, keepdims=True)
    reps = -(-channels // base)
    return np.tile(weight, (1, reps, 1, 1))[:, :channels] * np.float32(base / channels)


def _conv(tk: str, jp: tuple, cin: int, cout: int, k: int) -> common.Entry:
    """torch Conv2d without bias (O, I, k, k) -> flax kernel (k, k, I, O)."""
    return common.same(f"{tk}.weight", (cout, cin, k, k), ("params",) + jp + ("kernel",),
                       lambda w: w.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))


def _bn(tk: str, jp: tuple, n: int) -> list[common.Entry]:
    return [common.same(f"{tk}.weight", (n,), ("params",) + jp + ("scale",)),
            common.same(f"{tk}.bias", (n,), ("params",) + jp + ("bias",)),
            common.same(f"{tk}.running_mean", (n,), ("batch_stats",) + jp + ("mean",)),
            common.same(f"{tk}.running_var", (n,), ("batch_stats",) + jp + ("var",))]


def _entries(model: ResNet, channels: int, source_channels: int | None = None, pre: str = "") -> list[common.Entry]:
    """The key table of `model` for `channels` input bands; a checkpoint's conv1 over
    `source_channels` (default: channels) is adapted to them."""
    w, exp = model.width, EXPANSION[model.block]
    src = channels if source_channels is None else source_channels
    stem = common.same(f"{pre}conv1.weight", (w, src, 7, 7), ("params", "conv1", "kernel"),
                       lambda a: adapt_input_conv(a, channels).transpose(2, 3, 1, 0),
                       lambda a: a.transpose(3, 2, 0, 1))
    out = [stem, *_bn(f"{pre}bn1", ("bn1",), w)]
    inplanes = w
    for s, n in enumerate(model.stage_sizes):
        planes = w * 2 ** s
        for j in range(n):
            stride = 2 if s > 0 and j == 0 else 1
            tk, jp = f"{pre}layer{s + 1}.{j}", (f"layer{s + 1}_{j}",)
            if model.block == "basic":
                convs = [(inplanes, planes, 3), (planes, planes, 3)]
            else:
                convs = [(inplanes, planes, 1), (planes, planes, 3), (planes, planes * exp, 1)]
            for k, (cin, cout, size) in enumerate(convs, start=1):
                out += [_conv(f"{tk}.conv{k}", jp + (f"conv{k}",), cin, cout, size),
                        *_bn(f"{tk}.bn{k}", jp + (f"bn{k}",), cout)]
            if stride != 1 or inplanes != planes * exp:
                out += [_conv(f"{tk}.downsample.0", jp + ("downsample_conv",), inplanes, planes * exp, 1),
                        *_bn(f"{tk}.downsample.1", jp + ("downsample_bn",), planes * exp)]
            inplanes = planes * exp
    if model.num_classes:
        out += common.linear(f"{pre}fc", ("params", "fc"), inplanes, model.num_classes)
    return out


def _channels(model: ResNet, channels: int | None, fallback: int) -> int:
    if channels is not None:
        return int(channels)
    return len(model.input_bands) if model.input_bands is not None else fallback


def resnet_from_torch(state_dict: Mapping[str, np.ndarray], model: ResNet, *, channels: int | None = None,
                      strict: bool = True) -> tuple[dict, dict[str, Any]]:
    """State dict -> ({'params': ..., 'batch_stats': ...} of numpy arrays, report).

    channels: the model's input bands (default len(model.input_bands), else the checkpoint's); the
    checkpoint's conv1 is adapted to them by `adapt_input_conv` (report['adapted']). Missing keys,
    shape mismatches and (strict) unknown keys raise one CheckpointMismatchError naming each key and
    both shapes; report['ignored'] names what was left out and why."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    pre = common.find_prefix(sd, "layer1.0.conv1.weight", "ResNet checkpoint")
    stem = sd.get(f"{pre}conv1.weight")
    src = stem.shape[1] if stem is not None and stem.ndim == 4 else 3
    c = _channels(model, channels, src)
    entries = _entries(model, c, src, pre)
    problems = common.check_entries(sd, entries)
    report: dict[str, Any] = {"ignored": {}, "resized": {}, "adapted": {}}
    known = {e.key for e in entries}
    for k in sorted(set(sd) - known):
        if pre and not k.startswith(pre):
            report["ignored"][k] = f"outside the ResNet (prefix {pre!r})"
        elif k.endswith(NUM_BATCHES):
            report["ignored"][k] = "BatchNorm step counter (flax keeps none)"
        elif k[len(pre):].startswith("fc.") and not model.num_classes:
            report["ignored"][k] = "the classifier head (the model has num_classes=0)"
        elif strict:
            problems.append(f"not in this model: {k} {sd[k].shape}")
        else:
            report["ignored"][k] = "not in this model"
    if problems:
        common.raise_problems(problems, "ResNet checkpoint")
    if src != c:
        report["adapted"][f"{pre}conv1.weight"] = (src, c)
    flat = common.convert(sd, entries, jnp.float32)  # BatchNorm statistics stay float32, as flax keeps them
    flat = {k: v.astype(np.dtype(model.param_dtype)) if k[0] == "params" else v for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat), report


def resnet_to_torch(variables: Mapping, model: ResNet) -> dict[str, np.ndarray]:
    """eojax variables {'params', 'batch_stats'} -> torchvision's state dict (num_batches_tracked 0),
    for the model's own band count."""
    variables = nn.meta.unbox(variables)
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables)))
    channels = flat[("params", "conv1", "kernel")].shape[2]
    entries = _entries(model, channels)
    out = common.export(flat, entries, "eojax ResNet variables")
    for e in entries:
        if e.key.endswith(".running_mean"):
            out[e.key[: -len("running_mean")] + NUM_BATCHES] = np.zeros((), np.int64)
    return out


def abstract_variables(model: ResNet, channels: int) -> dict:
    """ShapeDtypeStructs of `model`'s unboxed variables for `channels` bands (jax.eval_shape: no compute)."""
    images = jax.ShapeDtypeStruct((1, 64, 64, channels), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))


def _log(what: str, report: Mapping[str, Any]) -> None:
    # Every torch BatchNorm saves a step counter: dropping them is expected, not worth a warning.
    quiet = {k: why for k, why in report.get("ignored", {}).items() if not k.endswith(NUM_BATCHES)}
    common.log_report(what, {**report, "ignored": quiet})
    for key, (src, dst) in report.get("adapted", {}).items():
        logging.warning("%s: %s adapted from %d to %d input bands (timm's adapt_input_conv)", what, key, src, dst)


def load_variables(path, model: ResNet, abstract: Any = None, *, channels: int | None = None,
                   strict: bool = True) -> tuple[dict, dict[str, Any]]:
    """({'params', 'batch_stats'} placed like `abstract`, report) from a torchvision / timm ResNet file
    (.safetensors, .npz, .pth). abstract: the model's variables or their shapes (with shardings, if
    any); default the model's own for `channels` (else input_bands, else the checkpoint's bands)."""
    sd = common.load_state_dict(path, "ResNet checkpoint")
    if abstract is not None:
        abstract = nn.meta.unbox(abstract)
        channels = abstract["params"]["conv1"]["kernel"].shape[2] if channels is None else channels
    variables, report = resnet_from_torch(sd, model, channels=channels, strict=strict)
    if abstract is None:
        abstract = abstract_variables(model, variables["params"]["conv1"]["kernel"].shape[2])
    abstract = {k: abstract[k] for k in ("params", "batch_stats")}
    check_compatible(variables, abstract, f"ResNet checkpoint {path}")
    _log(f"ResNet checkpoint {path}", report)
    return common.place(traverse_util.flatten_dict(variables), abstract), report


def load_pretrained(path, abstract_params: Any, encoder: ResNet, *, strict: bool = True):
    """The encoder converter contract (weights.common.load_encoder): (params placed like
    abstract_params, report). The running statistics, which that contract has no slot for, are in
    report['batch_stats'] (jax arrays); a caller that keeps model state must take them."""
    wrapped = set(abstract_params) == {"params"}
    params = nn.meta.unbox(abstract_params["params"] if wrapped else abstract_params)
    sd = common.load_state_dict(path, "ResNet checkpoint")
    variables, report = resnet_from_torch(sd, encoder, channels=params["conv1"]["kernel"].shape[2], strict=strict)
    check_compatible(variables["params"], params, f"ResNet checkpoint {path}")
    _log(f"ResNet checkpoint {path}", report)
    placed = common.place(traverse_util.flatten_dict(variables["params"]), params)
    report["batch_stats"] = jax.tree.map(jnp.asarray, variables["batch_stats"])
    return ({"params": placed} if wrapped else placed), report
