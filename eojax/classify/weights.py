"""Published classifier checkpoints -> Classifier params {'encoder', 'fc_norm', 'head'}.

SatMAE++'s fine-tuned GroupChannelsVisionTransformer (techmn/satmae_pp models_vit_group_channels.py,
the 'model' of what main_finetune.py saves), D width, K classes:
  encoder keys (patch_embed.i, blocks.k, cls_token, pos_embed, channel_embed, channel_cls_embed)
                                 encoder/... through eojax.mae.weights (its fine-tuning 'vit' layout;
                                 trained embeddings need encoder_args.learned_embed=True)
  fc_norm.weight / .bias (D,)    fc_norm/ln/scale / bias
  head.weight (K, D) / .bias (K,) head/kernel (D, K) / bias

The two heads of the reference and the Classifier settings that compute them:
  global_pool=True (main_finetune.py's default): mean of the last block's tokens without cls, then
      fc_norm, then head: pool='avg', head_norm='layer'. The reference deletes the encoder's final
      `norm`, so the file has no norm.*: the model's encoder/norm keeps its initial values (unused by
      'avg' pooling) and is reported in report['not_loaded'].
  global_pool=False (--cls_token): the final norm's cls token, then head: pool='cls', head_norm='none'.
Any other combination, a missing or reshaped key (a head of another class count included) and, as
for the encoder import, an unexpected key is one CheckpointMismatchError naming every key at fault.

SatMAE++'s fine-tuned fMoW-RGB classifier (models_vit.py: timm's VisionTransformer, global_pool) has
the same head and the plain ViT encoder keys (cls_token, pos_embed, patch_embed.proj, blocks.k): it
loads into a Classifier on encoder 'mae' (eojax.mae.weights.plain_vit_from_torch; its trained
pos_embed needs encoder_args.learned_embed=True). A file of the other layout than the encoder's, or
of other sizes, is a one-line error saying so.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import CheckpointMismatchError, check_compatible
from eojax.mae import weights as satmae_weights
from eojax.mae.satmae import GroupChannelViT
from eojax.models.vit import ViTEncoder
from eojax.weights import common

_NORM = ("norm.weight", "norm.bias")
_NOT_LOADED = ("not in a global_pool checkpoint (the reference deletes the final norm); kept as initialised, "
               "unused by 'avg' pooling")


def checkpoint_keys(path) -> set[str]:
    """The state-dict keys of a published file, read from the header where the format allows
    (safetensors, npz), so a large checkpoint is not read twice."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(path, "np") as f:
            keys = set(f.keys())
    elif os.path.isfile(path) and suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    else:  # .pth (wrapped, pickled) or a missing file: the full reader and its errors
        return set(common.load_state_dict(path))
    if keys and all(k.startswith("module.") for k in keys):  # as common.load_state_dict strips it
        keys = {k[len("module."):] for k in keys}
    return keys


def is_classifier_checkpoint(path) -> bool:
    """Whether a published file holds a classifier (the reference's `head`), not just an encoder."""
    return "head.weight" in checkpoint_keys(path)


def _head_problems(sd, model, d: int) -> list[str]:
    """Problems of the head part that the key table alone would report without saying why."""
    has_norm, has_fc = "norm.weight" in sd, "fc_norm.weight" in sd
    problems = []
    if model.head_norm == "batch":
        problems.append("head_norm='batch' (MAE's linear-probe BatchNorm): SatMAE++ classifiers have fc_norm "
                        "(global_pool) or no head norm (cls token); use head_norm='layer' or 'none'")
    if model.pool == "avg" and has_norm and not has_fc:
        problems.append("the checkpoint is a cls-token classifier (norm.*, no fc_norm: global_pool=False); "
                        "set model.pool='cls' and model.head_norm='none'")
    if model.pool == "cls" and not has_norm:
        problems.append("missing in checkpoint: norm.weight (%d,), norm.bias (%d,): a global_pool classifier "
                        "(the final norm deleted) cannot give the normed cls token; set model.pool='avg' "
                        "and model.head_norm='layer'" % (d, d))
    return problems


def load_classifier(path, init_params: Any, model, *, strict: bool = True) -> tuple[Any, dict]:
    """(params, report) of a Classifier (eojax.classify.model) from a fine-tuned SatMAE++ checkpoint.

    init_params: the model's initialised params ({'encoder', ['fc_norm'], 'head'}, or wrapped in
    'params'), whose shapes, dtypes and shardings the result takes; parts the file lacks (the
    encoder's final norm of a global_pool checkpoint) are these arrays unchanged. report:
    'not_loaded' {key: why}, 'ignored' {key: why} (from the encoder import) and, for an encoder with
    named bands, the band plan (as eojax.mae.weights.load_encoder)."""
    encoder = model.encoder
    _require_vit(path, encoder)
    wrapped = set(init_params) == {"params"}
    init = nn.meta.unbox(init_params["params"] if wrapped else init_params)  # a fresh init is boxed
    d, k = encoder.width, model.num_classes
    sd = satmae_weights.load_state_dict(path)
    what = f"SatMAE++ classifier checkpoint {path}"
    _check_layout(sd, encoder, what)

    # The head: fc_norm (head_norm 'layer') and the Dense head, from the shared key table entries.
    entries = common.linear("head", ("head",), d, k)
    entries += common.ln("fc_norm", ("fc_norm",), d) if model.head_norm == "layer" else []
    problems = _head_problems(sd, model, d) + common.check_entries(sd, entries)
    head_keys = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    stray = [key for key in ("fc_norm.weight", "fc_norm.bias") if key in sd and model.head_norm != "layer"]
    if strict:  # the reference applies it: without it the logits differ
        problems += [f"not in this model (head_norm={model.head_norm!r}): {key} {sd[key].shape}" for key in stray]
    if problems:
        common.raise_problems(problems, what)

    abstract = _abstract(init)
    enc_sd = {key: v for key, v in sd.items() if key not in head_keys}
    placed, ignored, not_loaded = _encoder(path, enc_sd, init["encoder"], abstract["encoder"], encoder,
                                           model.pool, strict)

    head = common.convert(sd, entries, np.float32)
    head_abstract = {key: abstract[key] for key in ("head", "fc_norm") if key in abstract}
    check_compatible(traverse_util.unflatten_dict(head), head_abstract, what)
    out = {**init, "encoder": placed, **common.place(head, head_abstract)}

    ignored.update({key: f"head_norm={model.head_norm!r} has no fc_norm" for key in stray})
    report = {"not_loaded": not_loaded, "ignored": ignored}
    if getattr(encoder, "bands", None) is not None:  # named bands: matched by common name / wavelength
        source, missing, unused = encoder.plan_bands()
        report.update(zero_filled_bands=missing, unused_bands=unused,
                      band_sources=common.band_sources(encoder, source))
    common.log_report(what, report)
    for key, why in not_loaded.items():
        logging.warning("%s: %s %s", what, key, why)
    logging.info("initialised the classifier from %s", what)
    return ({"params": out} if wrapped else out), report


def _encoder(path, enc_sd, init_encoder, abstract_encoder, encoder, pool: str, strict: bool):
    """(encoder params, ignored keys, not-loaded keys) from the encoder keys of a classifier's state
    dict, through eojax.mae.weights. A global_pool file has no final norm: a placeholder passes the key
    table, and the model's own initial norm is put back."""
    d = encoder.width
    missing_norm = pool == "avg" and not any(key in enc_sd for key in _NORM)
    if missing_norm:
        enc_sd = {**enc_sd, **{key: np.zeros((d,), np.float32) for key in _NORM}}
    group = isinstance(encoder, GroupChannelViT)
    cls = GroupChannelViT if group else ViTEncoder
    kwargs = {f: getattr(encoder, f) for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
    try:
        if group:
            enc_params, ignored = satmae_weights.satmae_from_torch(enc_sd, kwargs, target="vit", strict=strict)
        else:
            enc_params, ignored = satmae_weights.plain_vit_from_torch(enc_sd, kwargs, target="vit", strict=strict)
    except CheckpointMismatchError as e:  # its message names the keys; add the file
        raise CheckpointMismatchError(f"{path}: {e}") from e
    check_compatible(enc_params, abstract_encoder, f"SatMAE++ classifier checkpoint {path}")
    placed = common.place(traverse_util.flatten_dict(enc_params), abstract_encoder)
    if not missing_norm:
        return placed, ignored, {}
    return {**placed, "norm": init_encoder["norm"]}, ignored, {key: _NOT_LOADED for key in _NORM}


def _require_vit(path, encoder):
    if not isinstance(encoder, (GroupChannelViT, ViTEncoder)):
        raise ValueError(f"{path}: a classifier checkpoint (head.weight) is converted for SatMAE++'s encoders "
                         f"('satmae', and 'mae' for its fMoW-RGB ViT) only, not {type(encoder).__name__}; load "
                         "its encoder through config.model.encoder_init or a pretraining checkpoint")


def _check_layout(sd, encoder, what):
    """One line for a file of the other SatMAE++ layout than the encoder's, or (plain ViT) other sizes,
    before the head's checks could report a symptom of it."""
    plain = not isinstance(encoder, GroupChannelViT)
    satmae_weights.check_layout(sd, plain, what)
    if plain:
        kwargs = {f: getattr(encoder, f) for f in ViTEncoder.__dataclass_fields__ if f not in ("parent", "name")}
        satmae_weights.check_plain_sizes(sd, satmae_weights.plain_config(kwargs, "vit"), "vit", what)


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                        tree)


def load_classifier_encoder(path, init_encoder: Any, model) -> Any:
    """The encoder params of a fine-tuned SatMAE++ classifier, for fine-tuning it on other classes
    (`model.encoder_init`); its head is left out (reported as ignored), as the reference's
    main_finetune drops a head of another class count and loads the rest (fc_norm: load_fc_norm)."""
    _require_vit(path, model.encoder)
    init_encoder = nn.meta.unbox(init_encoder)
    sd = satmae_weights.load_state_dict(path)
    _check_layout(sd, model.encoder, f"SatMAE++ classifier checkpoint {path}")
    enc_sd = {key: v for key, v in sd.items() if not key.startswith(("head.", "fc_norm."))}
    placed, ignored, not_loaded = _encoder(path, enc_sd, init_encoder, _abstract(init_encoder), model.encoder,
                                           model.pool, strict=True)
    ignored.update({key: "a new head is trained (model.encoder_init)" for key in sd if key.startswith("head.")})
    common.log_report(f"SatMAE++ classifier checkpoint {path} (encoder)",
                      {"not_loaded": not_loaded, "ignored": ignored})
    return placed


def load_fc_norm(path, init_fc_norm: Any) -> Any:
    """The fc_norm params (head_norm='layer') of a fine-tuned SatMAE++ global_pool classifier."""
    init_fc_norm = nn.meta.unbox(init_fc_norm)
    width = init_fc_norm["ln"]["scale"].shape[0]
    entries = common.ln("fc_norm", (), width)
    sd = satmae_weights.load_state_dict(path)
    what = f"SatMAE++ classifier checkpoint {path}"
    common.raise_problems(common.check_entries(sd, entries), what)
    flat = common.convert(sd, entries, np.float32)
    abstract = _abstract(init_fc_norm)
    check_compatible(traverse_util.unflatten_dict(flat), abstract, what)
    return common.place(flat, abstract)
