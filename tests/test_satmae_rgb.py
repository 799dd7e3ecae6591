"""SatMAE++'s fMoW-RGB checkpoints (plain ViT) against the reference: fixtures written by
scripts/fixtures/make_satmae_rgb_fixture.py running techmn/satmae_pp's models_mae.py MaskedAutoencoderViT
and models_vit.py VisionTransformer (timm 0.4.12, eval mode) at a tiny size. Every file goes through the
user path: the mae task's, the classify task's and the seg task's config.init_from, classify's
model.encoder_init. Tolerance 1e-4 relative (max |a - b| / max |b|). Neither torch nor the reference is
needed (the .pth checks are skipped without torch, which only eojax's reader would import)."""
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from ml_collections import ConfigDict

from eojax import errors, weights, zoo
from eojax.checkpoint import CheckpointMismatchError
from eojax.classify import weights as cls_weights
from eojax.classify.task import ClassifyTask
from eojax.mae import weights as mae_weights
from eojax.mae.model import mae_loss
from eojax.mae.task import MAETask
from eojax.seg.task import SegTask
from eojax.tasks.base import DataSpec, elements, load_pretrained_parts
from helpers import ONE_DEVICE, load_config
from test_parity_prithvi_satmae import rel

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HERE = os.path.join(FIX, "satmae_rgb")
PRETRAIN, FINETUNE = (os.path.join(HERE, f"{n}.safetensors") for n in ("pretrain", "finetune"))
GROUP_FILE = os.path.join(FIX, "reference", "satmae_pp", "pretrain.safetensors")  # fMoW-Sentinel layout
TOL = 1e-4
RGB = ["B4", "B3", "B2"]


def sizes() -> dict:
    with open(os.path.join(HERE, "reference.json")) as f:
        return json.load(f)["sizes"]


@pytest.fixture(scope="module")
def io():
    return dict(np.load(os.path.join(HERE, "io.npz")))


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def encoder_args(**extra) -> dict:
    c = sizes()
    return {**dict(patch_size=c["patch"], width=c["width"], depth=c["depth"], heads=c["heads"],
                   mlp_dim=int(c["width"] * c["mlp_ratio"]), drop_path_rate=c["drop_path"]), **extra}


def classify_task(encoder_init="", classes=None, size=None, encoder="mae", **extra) -> ClassifyTask:
    """The classify task as configs/classify.py builds it on 3-band chips, the fixture's ViT."""
    cfg = load_config("classify", f"data=synthetic,encoder={encoder}")
    c = sizes()
    size = size or c["size"]
    cfg.model.update(encoder_variant="mu", encoder_init=encoder_init,
                     encoder_args=encoder_args(**extra) if encoder == "mae" else dict(extra))
    names = [f"c{i}" for i in range(classes or c["classes"])]
    spec = DataSpec(elements(pixels=((3, size, size), np.float32), valid=((size, size), bool),
                             weight=((), np.float32), label=((), np.int32)),
                    {"band_names": RGB, "sensor": "sentinel2a", "class_names": names, "multi_label": False,
                     "normalize": "data", "mean": [0.0] * 3, "std": [1.0] * 3})
    return ClassifyTask(cfg, spec)


def init_params(model, size, bands=3, abstract=False):
    """The params as the trainer holds them (unboxed); abstract: their shapes only (where a load is
    refused before it reads any value), which compiles nothing."""
    init = jax.eval_shape if abstract else lambda f, *a: jax.jit(f)(*a)
    variables = init(model.init, {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                     jnp.zeros((1, size, size, bands)))
    return nn.meta.unbox(variables)["params"]


def apply(model, params, x, **kw):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, **kw))(params, x)


def logits_and_fc_norm(model, params, x):
    """The logits and what fc_norm gave the head (the reference's forward_features)."""
    logits, seen = apply(model, params, x, mutable=["intermediates"],
                         capture_intermediates=lambda m, _: m.name == "fc_norm")
    return logits, seen["intermediates"]["fc_norm"]["__call__"][0]


def mae_task(**model) -> MAETask:
    """The mae task (configs/mae.py's model keys) at the fixture's sizes, config.init_from the file."""
    c = sizes()
    mlp = int(c["width"] * c["mlp_ratio"])
    config = ConfigDict(dict(
        task="mae", init_from=PRETRAIN, input=dict(window=c["size"], normalize_mode="standard"),
        model={**dict(variant="mu", patch_size=c["patch"], mask_ratio=c["mask_ratio"], norm_pix_loss=False,
                      width=c["width"], depth=c["depth"], heads=c["heads"], mlp_dim=mlp,
                      decoder_width=c["decoder_width"], decoder_depth=c["decoder_depth"],
                      decoder_heads=c["decoder_heads"], decoder_mlp_dim=mlp, dropout=0.0, dtype="float32",
                      param_dtype="float32", scan=False, remat=False, attention_impl="xla"), **model}))
    return MAETask(config, DataSpec({}, {"band_names": RGB}))


def test_fixture_is_the_reference():
    with open(os.path.join(HERE, "reference.json")) as f:
        m = json.load(f)
    assert m["repository"] == "techmn/satmae_pp" and m["timm"].startswith("0.4") and m["mode"] == "eval"
    assert m["files"] == ["models_mae.py", "models_vit.py", "util/pos_embed.py"]


# ------------------------------------------------------------------ pretraining file
def test_mae_init_from_gives_the_reference_reconstruction(io, monkeypatch, caplog):
    """mae task, config.init_from = the pretraining file: encoder and decoder loaded, the masking fed the
    reference's noise: mask, latent, prediction and loss are the reference's; the multi-scale head
    (eojax's plain MAE has none) is reported."""
    task = mae_task()
    s = sizes()["size"]
    init = nn.unbox(jax.jit(task.model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                             jnp.zeros((1, s, s, 3))))["params"]
    params, _ = weights.load(init, task.config.init_from, task)
    assert "ignored 16 keys (multi-scale head" in caplog.text and "proj_up_conv.weight" in caplog.text
    with monkeypatch.context() as m:  # eojax's random_masking draws jax.random.uniform(rng, (B, N))
        m.setattr(jax.random, "uniform", lambda rng, shape: jnp.asarray(io["noise"]).reshape(shape))
        out = jax.jit(lambda p, x: task.model.apply({"params": p}, x, rngs={"mask": jax.random.key(0)}))(
            params, nhwc(io["imgs"]))
    np.testing.assert_array_equal(out["mask"], io["mask"])
    np.testing.assert_array_equal(out["restore_idx"], io["ids_restore"])
    assert rel(out["latent"], io["latent"]) < TOL
    assert rel(out["pred"], io["pred"]) < TOL
    imgs = nhwc(io["imgs"])
    loss, _ = mae_loss(out["pred"], imgs, jnp.ones(imgs.shape[:3], bool), out["mask"], task.model.patch_size)
    assert rel(loss, io["loss"]) < TOL


def test_pretraining_file_as_classify_and_seg_encoder(io):
    """classify model.encoder_init and seg config.init_from (encoder 'mae'): the encoder's pooled
    features are those of the reference's classifier loaded from the file as main_finetune.py loads it,
    and the seg encoder's last map (after the final norm) is the reference encoder's tokens."""
    c = sizes()
    task = classify_task(encoder_init=PRETRAIN)
    params, _ = load_pretrained_parts(task, init_params(task.model, c["size"]), {})
    assert rel(apply(task.model, params, nhwc(io["x"]), method="features"), io["pooled_pretrain"]) < TOL

    config = load_config("seg", "encoder=mae,decoder=linear,mode=frozen", mesh=ONE_DEVICE)
    config.input.update(crop=c["size"], normalize="none")
    config.model.update(encoder_variant="mu", encoder_args=encoder_args(layers=(c["depth"] - 1,)))
    spec = DataSpec(elements(pixels=((3, c["size"], c["size"]), np.float32), valid=((c["size"],) * 2, bool),
                             label=((c["size"],) * 2, np.int32), weight=((), np.float32)),
                    {"band_names": RGB, "num_classes": 2, "class_names": ["a", "b"], "mean": None, "std": None})
    seg = SegTask(config, spec)
    encoder = seg.model.encoder
    params, _ = weights.load({"encoder": init_params(encoder, c["size"], abstract=True)}, PRETRAIN, seg)
    (fmap,) = apply(encoder, params["encoder"], nhwc(io["imgs"]))
    g = c["size"] // c["patch"]
    assert rel(fmap, io["tokens"][:, 1:].reshape(-1, g, g, c["width"])) < TOL


# ------------------------------------------------------------------ fine-tuned classifier
def test_finetuned_classifier_init_from_gives_the_reference_logits(io):
    """classify config.init_from = the fine-tuned file, encoder 'mae' with learned_embed=True: logits, the
    fc_norm input (the token mean) and output are the reference's; the missing final norm is reported."""
    c = sizes()
    task = classify_task(learned_embed=True)
    params, _ = weights.load(init_params(task.model, c["size"]), FINETUNE, task)
    x = nhwc(io["x"])
    logits, normed = logits_and_fc_norm(task.model, params, x)
    assert rel(logits, io["logits"]) < TOL
    assert rel(normed, io["features"]) < TOL
    assert rel(apply(task.model, params, x, method="features"), io["pooled"]) < TOL


def test_finetuned_classifier_at_another_size_and_as_encoder_init(io):
    """At 40 px the trained pos_embed (4x4) gives way to the model's sin-cos, as main_finetune.py drops a
    pos_embed of another shape: the logits are the reference's at 40 px. As model.encoder_init for 3
    other classes: encoder and fc_norm from the file, the head as initialised."""
    s = sizes()["other_size"]
    task = classify_task(size=s, learned_embed=True)
    params, report = cls_weights.load_classifier(FINETUNE, init_params(task.model, s), task.model)
    assert "main_finetune" in report["ignored"]["pos_embed"]
    assert rel(apply(task.model, params, nhwc(io["x40"])), io["logits40"]) < TOL

    c = sizes()
    other = classify_task(encoder_init=FINETUNE, classes=3, learned_embed=True)
    assert other.pretrained_parts() == {"encoder": FINETUNE, "fc_norm": FINETUNE}
    init = init_params(other.model, c["size"])
    params, _ = load_pretrained_parts(other, init, {})
    jax.tree.map(np.testing.assert_array_equal, params["head"], init["head"])
    assert rel(logits_and_fc_norm(other.model, params, nhwc(io["x"]))[1], io["features"]) < TOL


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="reading a .pth needs torch")
def test_published_pth_files_read_as_their_safetensors(tmp_path):
    """The .pth files are {'model', 'epoch', 'args'} as the reference saves them; the zoo names the
    fine-tuned one without a suffix, which eojax reads by its content."""
    bare = tmp_path / "checkpoint_ViT-L_finetune_fmow_rgb"
    shutil.copyfile(os.path.join(HERE, "finetune.pth"), bare)
    for pth, st in ((os.path.join(HERE, "pretrain.pth"), PRETRAIN), (str(bare), FINETUNE)):
        got, want = mae_weights.load_state_dict(pth), mae_weights.load_state_dict(st)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert cls_weights.is_classifier_checkpoint(str(bare))


# ------------------------------------------------------------------ wrong files: one line each
def test_wrong_checkpoints_are_one_line_naming_the_fault():
    c = sizes()
    rgb, wide = classify_task(learned_embed=True), classify_task(learned_embed=True, width=64, mlp_dim=256)
    sat, fixed = classify_task(encoder="satmae", size=16), classify_task()
    mae = mae_task(decoder_width=64)
    mae_init = nn.unbox(jax.eval_shape(mae.model.init, {"params": jax.random.key(0), "mask": jax.random.key(1)},
                                       jnp.zeros((1, c["size"], c["size"], 3))))["params"]
    rgb_init = init_params(rgb.model, c["size"], abstract=True)
    cases = [  # (load, what the one line must say)
        (lambda: weights.load(rgb_init, GROUP_FILE, rgb), "group-channel checkpoint .* encoder 'satmae'"),
        (lambda: load_pretrained_parts(classify_task(encoder_init=GROUP_FILE), rgb_init, {}),
         "group-channel checkpoint"),
        (lambda: weights.load(init_params(wide.model, c["size"], abstract=True), FINETUNE, wide),
         r"its ViT has width 32 \(the model's 64\), mlp_dim 64 \(the model's 256\)"),
        (lambda: weights.load(init_params(sat.model, 16, 10, abstract=True), PRETRAIN, sat),
         "plain ViT checkpoint .* encoder 'mae'"),
        (lambda: weights.load(mae_init, PRETRAIN, mae), r"decoder_width 32 \(the model's 64\)"),
    ]
    for load, words in cases:
        with pytest.raises(CheckpointMismatchError, match=words) as e:
            load()
        assert "\n" not in str(e.value) and ".safetensors" in str(e.value), str(e.value)
    # trained positions into the fixed sin-cos: named, with the setting that takes them
    with pytest.raises(CheckpointMismatchError, match=r"pos_embed: differs .*learned_embed=True"):
        weights.load(init_params(fixed.model, c["size"], abstract=True), FINETUNE, fixed)


def test_zoo_entries_name_the_mae_encoder():
    for name in ("satmaepp-vitl-pretrain-fmow-rgb", "satmaepp-vitl-finetune-fmow-rgb"):
        e = zoo.ZOO[name]
        assert (e.encoder, e.variant) == ("mae", "large") and "encoder mae large" in e.loads
    config = load_config("classify", "encoder=mae")
    config.model.encoder_variant = "large"
    zoo.check_fits(config, {"model.encoder_init": "zoo:satmaepp-vitl-finetune-fmow-rgb"})  # fits: no error
    with pytest.raises(errors.ConfigError, match="--config.model.encoder=mae"):
        zoo.check_fits(load_config("classify", "encoder=satmae"), {"init_from": "zoo:satmaepp-vitl-pretrain-fmow-rgb"})
