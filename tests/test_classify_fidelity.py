"""The classifier against SatMAE++'s fine-tuning model (techmn/satmae_pp GroupChannelsVisionTransformer):
fixtures written by scripts/fixtures/make_satmae_finetune_fixture.py running the reference (timm 0.4.12,
eval mode) at the 'mu' size. Neither torch nor the reference is needed here."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from eojax import weights
from eojax.checkpoint import CheckpointMismatchError
from eojax.classify import weights as cls_weights
from eojax.classify.model import Classifier
from eojax.classify.task import ClassifyTask
from eojax.models import encoders
from eojax.models.encoders.mae import SATMAE_S2_BANDS
from eojax.tasks.base import DataSpec, elements, load_pretrained_parts
from eojax.weights import common
from helpers import load_config

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HERE = os.path.join(FIX, "satmae_finetune")
TOL = 1e-4


def _meta():
    with open(os.path.join(HERE, "reference.json")) as f:
        return json.load(f)


def _io():
    io = np.load(os.path.join(HERE, "io.npz"))
    return io, io["x"].transpose(0, 2, 3, 1)  # (B, C, H, W) -> eojax's (B, H, W, C)


def _classifier(pool="avg", head_norm="layer", num_classes=None, **enc):
    c = _meta()["sizes"]
    kw = dict(image_size=c["size"], learned_embed=True, drop_path_rate=c["drop_path"])
    encoder = encoders.build("satmae", "mu", **{**kw, **enc})
    return Classifier(encoder, num_classes or c["classes"], pool=pool, head_norm=head_norm)


def _init(model):
    c = _meta()["sizes"]
    images = jnp.zeros((1, c["size"], c["size"], 10))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images)
    return nn.meta.unbox(variables)["params"]  # as the trainer holds them


def _fc_norm_out(model, params, x):
    """Logits and what fc_norm gave the head (the reference's forward_features)."""
    logits, seen = model.apply({"params": params}, x, capture_intermediates=lambda m, _: m.name == "fc_norm",
                               mutable=["intermediates"])
    return logits, seen["intermediates"]["fc_norm"]["__call__"][0]


def _diff(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)))


def test_fixture_is_the_reference_at_the_mu_size():
    m = _meta()
    assert m["repository"] == "techmn/satmae_pp" and m["module"] == "GroupChannelsVisionTransformer"
    assert m["timm"].startswith("0.4") and m["mode"] == "eval"
    enc = encoders.build("satmae", "mu")
    c = m["sizes"]
    assert (enc.image_size, enc.patch_size, enc.width, enc.depth, enc.heads, enc.mlp_dim, enc.group_embed_dim) == \
        (c["size"], c["patch"], c["width"], c["depth"], c["heads"], int(c["width"] * c["mlp_ratio"]), c["channel_embed"])
    assert [list(g) for g in enc.groups] == m["groups"]


def test_global_pool_classifier_gives_the_reference_logits():
    """global_pool=True: mean of the non-cls tokens before any norm -> fc_norm -> head."""
    io, x = _io()
    model = _classifier()
    init = _init(model)
    params, report = cls_weights.load_classifier(os.path.join(HERE, "global_pool.safetensors"), init, model)
    assert set(report["not_loaded"]) == {"norm.weight", "norm.bias"} and not report["ignored"]
    for leaf in ("scale", "bias"):  # the file has no final norm: the model's own stays (unused by 'avg')
        np.testing.assert_array_equal(params["encoder"]["norm"]["ln"][leaf], init["encoder"]["norm"]["ln"][leaf])
    logits, normed = jax.jit(lambda p, x: _fc_norm_out(model, p, x))(params, x)
    pooled = model.apply({"params": params}, x, method="features")
    assert _diff(pooled, io["pooled"]) < TOL
    assert _diff(normed, io["features_global_pool"]) < TOL
    assert _diff(logits, io["logits_global_pool"]) < TOL
    assert logits.dtype == jnp.float32


def test_cls_token_classifier_gives_the_reference_logits():
    """global_pool=False: the final norm's cls token -> head (pool 'cls', no head norm)."""
    io, x = _io()
    model = _classifier(pool="cls", head_norm="none")
    params, report = cls_weights.load_classifier(os.path.join(HERE, "cls.safetensors"), _init(model), model)
    assert not report["not_loaded"] and "fc_norm" not in params
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    features = model.apply({"params": params}, x, method="features")
    assert _diff(features, io["features_cls"]) < TOL
    assert _diff(logits, io["logits_cls"]) < TOL


def _edited(tmp_path, source, drop=(), **replace):
    sd = load_file(os.path.join(HERE, source))
    sd = {k: v for k, v in sd.items() if k not in drop}
    sd.update(replace)
    path = str(tmp_path / f"edited_{len(os.listdir(tmp_path))}.safetensors")
    save_file(sd, path)
    return path


def test_bad_classifier_checkpoints_name_the_key(tmp_path):
    model = _classifier()
    init = _init(model)
    gp = os.path.join(HERE, "global_pool.safetensors")
    cases = [
        (_edited(tmp_path, "global_pool.safetensors", drop=("blocks.1.mlp.fc2.weight",)), model,
         r"missing in checkpoint: blocks\.1\.mlp\.fc2\.weight"),
        (_edited(tmp_path, "global_pool.safetensors", drop=("fc_norm.bias",)), model,
         r"missing in checkpoint: fc_norm\.bias"),
        (gp, _classifier(num_classes=62), r"shape of head\.weight: checkpoint \(5, 32\) vs model \(62, 32\)"),
        (os.path.join(HERE, "cls.safetensors"), model, "cls-token classifier.*model.pool='cls'"),
        (gp, _classifier(pool="cls", head_norm="none"), r"missing in checkpoint: norm\.weight"),
        (gp, _classifier(head_norm="none"), r"not in this model \(head_norm='none'\): fc_norm\.weight"),
        (gp, _classifier(learned_embed=False), "learned_embed=True"),
        (_edited(tmp_path, "global_pool.safetensors", extra=np.zeros(3, np.float32)), model,
         r"not in this model: extra"),
    ]
    for path, m, match in cases:
        with pytest.raises(CheckpointMismatchError, match=match) as excinfo:
            cls_weights.load_classifier(path, init if m is model else _init(m), m)
        assert os.path.basename(path) in str(excinfo.value)  # the file is named too
    with pytest.raises(ValueError, match="'satmae'"):
        resnet = Classifier(encoders.build("resnet", "18"), 5)
        cls_weights.load_classifier(gp, {"encoder": {}, "head": {}}, resnet)


def _task(num_classes=None, encoder_init="", **encoder_args):
    cfg = load_config("classify", "data=synthetic,encoder=satmae")
    cfg.model.encoder_init = encoder_init
    size = _meta()["sizes"]["size"]
    cfg.model.update(encoder_variant="mu", encoder_args=dict(drop_path_rate=0.2, **encoder_args))
    classes = [f"c{i}" for i in range(num_classes or _meta()["sizes"]["classes"])]
    spec = DataSpec(elements(pixels=((10, size, size), np.float32), valid=((size, size), bool),
                             weight=((), np.float32), label=((), np.int32)),
                    {"band_names": list(SATMAE_S2_BANDS), "sensor": "sentinel2a", "class_names": classes,
                     "multi_label": False, "normalize": "data", "mean": [0.0] * 10, "std": [1.0] * 10})
    return ClassifyTask(cfg, spec)


def test_init_from_a_fine_tuned_classifier_loads_it_whole():
    io, x = _io()
    task = _task(learned_embed=True)
    init = _init(task.model)
    path = os.path.join(HERE, "global_pool.safetensors")
    assert cls_weights.is_classifier_checkpoint(path)
    params, state = weights.load(init, path, task)  # config.init_from's contract
    assert state == {}
    logits = task.model.apply({"params": params}, x)
    assert _diff(logits, io["logits_global_pool"]) < TOL


def test_init_from_a_pretraining_checkpoint_loads_the_encoder_only():
    """SatMAE++'s pretraining file (the MAE, decoder included): the encoder as eojax.mae.weights loads it,
    fc_norm and head exactly as initialised."""
    task = _task()
    init = _init(task.model)
    path = os.path.join(FIX, "reference", "satmae_pp", "pretrain.safetensors")
    assert not cls_weights.is_classifier_checkpoint(path)
    params = task.load_pretrained(path, init)
    for part in ("head", "fc_norm"):
        jax.tree.map(np.testing.assert_array_equal, params[part], init[part])
    want, _ = common.load_encoder(path, weights.jax_abstract(init["encoder"]), task.model.encoder)
    jax.tree.map(np.testing.assert_array_equal, params["encoder"], want)
    assert not np.allclose(params["encoder"]["cls_token"], init["encoder"]["cls_token"])


def test_a_fine_tuned_classifier_as_encoder_init_brings_all_but_its_head():
    """Fine-tuning fMoW's classifier on 3 other classes (model.encoder_init): the encoder and fc_norm
    come from the file (fc_norm's output is the reference's), the 3-class head stays as initialised."""
    io, x = _io()
    path = os.path.join(HERE, "global_pool.safetensors")
    task = _task(num_classes=3, encoder_init=path, learned_embed=True)
    init = _init(task.model)
    assert task.pretrained_parts() == {"encoder": path, "fc_norm": path}
    params, state = load_pretrained_parts(task, init, {})
    assert state == {}
    jax.tree.map(np.testing.assert_array_equal, params["head"], init["head"])
    _, normed = _fc_norm_out(task.model, params, x)
    assert _diff(normed, io["features_global_pool"]) < TOL
    # 'cls' pooling without a head norm takes the encoder only; the file's missing final norm is named.
    cls_task = _task(num_classes=3, encoder_init=path, learned_embed=True)
    cls_task.config.model.update(pool="cls", head_norm="none")
    assert cls_task.pretrained_parts() == {"encoder": path}
    with pytest.raises(CheckpointMismatchError, match=r"(?s)global_pool\.safetensors.*norm\.weight"):
        load_pretrained_parts(cls_task, _init(cls_task.model), {})
