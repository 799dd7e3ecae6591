"""Segmentation: decoder shapes, sliding windows, metrics, freezing, every decoder x mode, the probe
sweep, GeoTIFF inference, the core from a saved DataSpec without the training data, one end-to-end
run with best-checkpoint test and results.json."""
import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from affine import Affine
from flax import linen as nn

from eojax import checkpoint as ckpt_lib
from eojax import optim, tasks, train, weights
from eojax.seg import data as segdata
from eojax.models import encoders
from eojax.seg import decoders as seg
from eojax.seg.decoders import muster
from eojax.seg import evaluation as seg_eval
from eojax.seg import modes as seg_modes
from eojax.seg.decoders.blocks import resize as resize_logits
from eojax.seg.task import SegInput, SegTask, resize_to_encoder
from eojax.tasks.base import DataSpec
from helpers import ONE_DEVICE, load_config

DECODERS = ("linear", "fcn", "upernet", "segformer", "muster")
RESIZE_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reference", "seg_resize",
                              "resize.npz")


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return segdata.synthetic_burnscars(tmp_path_factory.mktemp("burnscars"), size=64, n_train=10, n_test=4)


def tiny_config(root, decoder="linear", mode="frozen", arg="", encoder="mae", **overrides):
    """runlocal shrunk further: 32-px crops, a 1-block width-16 encoder, 8-channel decoders."""
    overrides = {"mesh": ONE_DEVICE, "batch_size": 4, "peak_tflops": 1.0, **overrides}
    c = load_config("seg", f"encoder={encoder},decoder={decoder},mode={mode},runlocal{arg}", **overrides)
    c.input.update(root=str(root), crop=32, eval_batch_size=2)
    c.model.encoder_args.update(depth=1, layers=(0, 0, 0, 0), width=16, mlp_dim=32)
    if "channels" in c.model.decoder_args:
        c.model.decoder_args.channels = 8
    if decoder == "muster":  # one (unshifted) block per stage keeps compilation cheap; the shifted
        c.model.decoder_args.depth = 1  # windows are covered by test_muster_shifted_window_mask
    return c


# ------------------------------------------------------------------ shapes (abstract: no compute)

@pytest.mark.parametrize("grid,width,maps", [(14, 768, (56, 28, 14, 7)), (15, 768, (60, 30, 15, 7))],
                         ids=["vitb16_224", "croma_p8_120"])
def test_pyramid_and_decoder_shapes(grid, width, maps):
    feats = [jax.ShapeDtypeStruct((2, grid, grid, width), jnp.float32)] * 4
    init = lambda m: jax.eval_shape(lambda f: m.init_with_output(jax.random.key(0), f)[0], feats)
    assert [o.shape[1] for o in init(seg.FeaturePyramid())] == list(maps)
    for name in DECODERS:
        out = init(seg.build_decoder(name, 3))
        side = grid if name in ("linear", "fcn") else maps[0]
        assert out.shape == (2, side, side, 3), (name, out.shape)


def test_segmentation_model_on_vit_b_gives_logits_at_input_size():
    enc = encoders.build("mae", "base", image_size=224, patch_size=16, in_channels=6)
    model = seg.SegmentationModel(enc, seg.build_decoder("upernet", 2), freeze_encoder=True)
    images = jax.ShapeDtypeStruct((2, 224, 224, 6), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    assert out.shape == (2, 224, 224, 2) and out.dtype == jnp.float32
    assert [f.shape for f in jax.eval_shape(lambda x: enc.init_with_output(jax.random.key(0), x)[0], images)] \
        == [(2, 14, 14, 768)] * 4


# ------------------------------------------------------------------ sliding windows

def test_window_offsets():
    assert seg_eval.window_offsets(512, 224) == [0, 144, 288]
    assert seg_eval.window_offsets(224, 224) == [0]
    assert seg_eval.window_offsets(100, 224) == [0]
    for size, win, stride in [(512, 224, 112), (901, 64, 48), (130, 32, 32)]:
        offs = seg_eval.window_offsets(size, win, stride)
        assert offs[0] == 0 and offs[-1] == size - win
        assert max(np.diff(offs)) <= stride and len(offs) == math.ceil((size - win) / stride) + 1


def _numpy_sliding(predict, image, window, offsets_y, offsets_x):
    """Per pixel: the mean of the predictions of every window that covers it (brute force)."""
    h, w, _ = image.shape
    preds = {(y, x): predict(image[None, y:y + window, x:x + window])[0] for y in offsets_y for x in offsets_x}
    out = np.zeros((h, w, next(iter(preds.values())).shape[-1]))
    for r in range(h):
        for c in range(w):
            covering = [p[r - y, c - x] for (y, x), p in preds.items() if y <= r < y + window and x <= c < x + window]
            out[r, c] = np.mean(covering, axis=0)
    return out


def test_sliding_window_averages_overlaps_like_numpy():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 45, 38, 3)).astype(np.float32)
    proj = rng.normal(size=(3, 4)).astype(np.float32)

    def predict(x):  # depends on the window's content as a whole, so overlaps really differ
        x = np.asarray(x)
        return np.tanh(x @ proj + x.mean(axis=(1, 2), keepdims=True) @ proj)

    got = np.asarray(seg_eval.sliding_window_logits(lambda x: jnp.asarray(predict(x)), jnp.asarray(image), 16, 12))
    oy, ox = seg_eval.window_offsets(45, 16, 12), seg_eval.window_offsets(38, 16, 12)
    for b in range(2):
        np.testing.assert_allclose(got[b], _numpy_sliding(predict, image[b], 16, oy, ox), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ metrics

def test_metrics_match_direct_numpy_with_ignore_index():
    rng = np.random.default_rng(1)
    k, ignore = 4, 255
    labels = rng.integers(0, k, size=(3, 20, 20))
    labels[rng.random(labels.shape) < 0.2] = ignore
    preds = np.where(rng.random(labels.shape) < 0.6, labels % k, rng.integers(0, k, size=labels.shape))
    weights = np.array([1.0, 1.0, 0.0])  # the last row is batch padding
    cm = np.asarray(seg_eval.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), k, ignore, jnp.asarray(weights)))
    m = seg_eval.metrics_from_confusion(cm, ["a", "b", "c", "d"])

    y, p = labels[:2].ravel(), preds[:2].ravel()
    keep = y != ignore
    y, p = y[keep], p[keep]
    assert cm.sum() == keep.sum()
    ious = []
    for c, name in enumerate("abcd"):
        tp = np.sum((y == c) & (p == c))
        fp = np.sum((y != c) & (p == c))
        fn = np.sum((y == c) & (p != c))
        ious.append(tp / (tp + fp + fn))
        np.testing.assert_allclose(m[f"iou_{name}"], ious[-1])
        np.testing.assert_allclose(m[f"precision_{name}"], tp / (tp + fp))
        np.testing.assert_allclose(m[f"recall_{name}"], tp / (tp + fn))
        np.testing.assert_allclose(m[f"f1_{name}"], 2 * tp / (2 * tp + fp + fn))
    np.testing.assert_allclose(m["miou"], np.mean(ious))
    np.testing.assert_allclose(m["accuracy"], np.mean(y == p))


def test_precision_and_recall_are_not_swapped():
    # truth: 10 pixels of class 1; prediction: class 1 on 20 pixels, 10 of them right.
    cm = np.array([[70.0, 10.0], [0.0, 10.0]])
    m = seg_eval.metrics_from_confusion(cm)
    assert m["precision_1"] == pytest.approx(0.5) and m["recall_1"] == pytest.approx(1.0)
    assert seg_eval.majority_baseline(cm)["miou"] == pytest.approx(0.5 * 80 / 90)


def test_muster_shifted_window_mask():
    mask = muster.window_mask(6, 6, 4, 2)[:, 0]  # 8x8 padded grid, 4 windows of 16 tokens
    assert mask.shape == (4, 16, 32)
    np.testing.assert_array_equal(mask[..., :16], mask[..., 16:])  # skip keys as decoder keys
    # Top-left window after the roll holds real pixels (2..5, 2..5): one region, all visible.
    assert mask[0, :, :16].all()
    # Padding (rows / cols 6, 7 rolled to 4, 5) is never a key except for itself.
    assert not mask[1, 0, 2] and mask[1, 2, 2]


# ------------------------------------------------------------------ training through the one trainer

def _run(config, steps=2):
    run = train.setup(config, devices=jax.devices()[:1])
    state0 = run.init_state()
    before = ckpt_lib.host_numpy(state0.params)
    state, losses = state0, []
    for _ in range(steps):
        state, metrics = run.train_step(state, run.next_batch())
        losses.append(float(metrics["loss"]))
    return run, before, ckpt_lib.host_numpy(state.params), losses


def _changed(a, b):
    return [float(np.max(np.abs(x - y))) > 0 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_trains(chips, decoder, mode):
    _, before, after, losses = _run(tiny_config(chips, decoder, mode))
    assert all(np.isfinite(losses)), losses
    assert all(_changed(before["decoder"]["head"], after["decoder"]["head"]))  # the classifier moved
    enc_changed = _changed(before["encoder"], after["encoder"])
    if mode == "frozen":  # bit-identical, not merely close
        for x, y in zip(jax.tree.leaves(before["encoder"]), jax.tree.leaves(after["encoder"])):
            np.testing.assert_array_equal(x, y)
    else:
        assert sum(enc_changed) > len(enc_changed) // 2


def test_sweep_matches_sequential_probes(chips):
    """K=3 linear probes (own seeds and lrs) in one step == three single runs, first-step params."""
    config = tiny_config(chips, arg=",sweep=3,sweep_lr", **{"optim.warmup_steps": 0})
    _, _, swept, _ = _run(config, steps=1)
    for k, factor in enumerate(config.sweep.lr_factors):
        single = tiny_config(chips, **{"sweep.probe_seed": k, "optim.lr": config.optim.lr * factor,
                                       "optim.warmup_steps": 0})
        _, start, alone, _ = _run(single, steps=1)
        assert any(_changed(alone["decoder"], start["decoder"]))
        for x, y in zip(jax.tree.leaves(swept["probes"][f"probe_{k}"]), jax.tree.leaves(alone["decoder"])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
        for x, y in zip(jax.tree.leaves(swept["encoder"]), jax.tree.leaves(alone["encoder"])):
            np.testing.assert_array_equal(x, y)


def test_init_from_a_published_prithvi_checkpoint(chips, tmp_path):
    """config.init_from=<file> goes through eojax.weights (Prithvi layout here); the decoder keeps the
    trainer's own initialisation."""
    from eojax.weights.prithvi import prithvi_to_torch
    run = train.setup(tiny_config(chips, mode="finetune", encoder="prithvi"), devices=jax.devices()[:1])
    init = run.init_state()
    rng = np.random.default_rng(0)
    published = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), init.params["encoder"])
    path = str(tmp_path / "prithvi_tiny.npz")
    np.savez(path, **prithvi_to_torch(published, run.task.model.encoder))
    params, model_state = weights.load(init.params, path, run.task, init.model_state)
    params = ckpt_lib.host_numpy(params)
    for x, y in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(published)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    fresh = ckpt_lib.host_numpy(init.params)
    for x, y in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(fresh["decoder"])):
        np.testing.assert_array_equal(x, y)
    assert model_state is init.model_state  # the decoder's BatchNorm statistics as initialised
    random_mode = tiny_config(chips, mode="random", encoder="prithvi")
    with pytest.raises(ValueError, match="random weights"):
        SegTask(random_mode, run.task.spec).load_pretrained(path, init.params)


# ------------------------------------------------------------------ the PANGAEA fork's mode and preprocessings

def _paths(tree):
    return jax.tree.leaves(optim.param_paths(tree))


@pytest.mark.parametrize("encoder", ["mae", "prithvi", "croma", "dofa"])
def test_retrain_input_trains_only_the_input_layer(chips, encoder):
    """mode=retrain_input: after trainer steps every encoder parameter but the patch embedding's
    (weight and bias; DOFA: its whole weight generator) is bit-identical, and those all moved."""
    config = tiny_config(chips, mode="retrain_input", encoder=encoder)
    assert config.optim.freeze == (seg_modes.retrain_input_freeze(encoder),)
    _, before, after, losses = _run(config)
    assert all(np.isfinite(losses)), losses
    layer = seg_modes.input_layer(encoder)
    trained = 0
    for path, x, y in zip(_paths(before["encoder"]), jax.tree.leaves(before["encoder"]),
                          jax.tree.leaves(after["encoder"])):
        if re.match(rf"{layer}(_\d+)?/", path):
            assert float(np.max(np.abs(x - y))) > 0, f"{path} did not train"
            trained += 1
        else:
            np.testing.assert_array_equal(x, y, err_msg=f"{path} changed")
    assert trained >= 2  # the projection's kernel and bias at least
    assert all(_changed(before["decoder"]["head"], after["decoder"]["head"]))


def test_mode_and_preprocessing_mistakes_are_refused(tmp_path):
    config = tiny_config(tmp_path / "none", mode="retrain_input", **{"optim.freeze": ("^encoder/",)})
    with pytest.raises(ValueError, match="retrain_input.*optim.freeze"):
        SegTask.check_config(config)
    with pytest.raises(ValueError, match="preprocessing='resize' is unknown"):
        SegTask.check_config(tiny_config(tmp_path / "none", **{"input.preprocessing": "resize"}))
    config = load_config("seg", "encoder=croma,mode=retrain_input,preprocessing=seg_resize_input_layer,epochs=16")
    assert config.optim.freeze == (r"^encoder/(?!linear_input(_\d+)?/)",)
    assert config.input.preprocessing == "seg_resize_input_layer" and config.total_steps == 16 * 60


def test_resize_input_layer_builds_the_encoder_at_the_scene_size(chips, tmp_path):
    """preprocessing=seg_resize_input_layer (the fork's): the encoder is built at the scenes' size
    (Prithvi: the fixed sin-cos of the scene's grid, also when a checkpoint of another grid is loaded,
    as the fork's resize_input), training batches are whole scenes, each once per epoch, and the
    eval confusion matrix is the model's on whole scenes."""
    config = tiny_config(chips, mode="retrain_input", encoder="prithvi", arg=",preprocessing=seg_resize_input_layer")
    run = train.setup(config, devices=jax.devices()[:1])
    task = run.task
    assert task.spec.elements["pixels"][0] == (6, 64, 64) and task.model.encoder.image_size == 64
    state = run.init_state()
    from eojax.models.encoders.prithvi import pos_embed_table
    from eojax.weights.prithvi import prithvi_to_torch
    grid_pos = pos_embed_table(16, (1, 8, 8))  # 64 px, patch 8
    np.testing.assert_allclose(np.asarray(state.params["encoder"]["pos_embed"]), grid_pos, atol=1e-6)
    small = encoders.build("prithvi", "mu", **{**dict(config.model.encoder_args), "image_size": 32,
                                               "input_bands": segdata.BURNSCARS_BANDS})
    shapes = nn.unbox(jax.eval_shape(lambda x: small.init(jax.random.key(0), x), jnp.zeros((1, 32, 32, 6)))["params"])
    rng = np.random.default_rng(0)
    published = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    path = str(tmp_path / "prithvi_32px.npz")
    np.savez(path, **prithvi_to_torch(published, small))
    loaded, _ = weights.load(state.params, path, task, state.model_state)
    np.testing.assert_allclose(np.asarray(loaded["encoder"]["pos_embed"]), grid_pos, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(loaded["encoder"]["patch_embed"]["kernel"]),
                                  published["patch_embed"]["kernel"])

    pairs = run.input.pair_sets["train"]
    scenes = [pairs.read(i) for i in range(len(pairs.scenes))]
    it = run.input.train(0, 1)
    seen = []
    for _ in range(len(scenes) // config.batch_size):  # one epoch
        batch = next(it)
        assert batch["pixels"].shape == (config.batch_size, 6, 64, 64)
        for b in range(config.batch_size):
            match = [i for i, sc in enumerate(scenes) if np.array_equal(sc["pixels"], batch["pixels"][b])]
            assert len(match) == 1
            np.testing.assert_array_equal(batch["label"][b], scenes[match[0]]["label"])
            seen.append(match[0])
    assert len(set(seen)) == len(seen)

    params, model_state = ckpt_lib.host_numpy((state.params, state.model_state))
    batch = next(iter(run.input.eval(0, 1)))
    got = jax.jit(task.eval_fn)(params, model_state, batch, jax.random.key(0))["confusion"]
    logits = task.model.apply({"params": params, **model_state}, task.images(batch))  # whole scenes
    np.testing.assert_array_equal(np.asarray(got), _numpy_confusion(batch, np.argmax(np.asarray(logits), -1)))


def _numpy_confusion(batch, pred, k=2, ignore=-1):
    keep = (batch["label"] != ignore) & (batch["weight"] > 0)[:, None, None]
    return np.bincount(batch["label"][keep] * k + pred[keep], minlength=k * k).reshape(k, k).astype(np.float32)


def test_resize_to_encoder_matches_the_forks_resize():
    """PANGAEA's ResizeToEncoder (the fork's file run by scripts/fixtures/reference_seg_resize.py) and
    its decoders' interpolation of the logits back: eojax within 1e-5 relative (measured ~3e-7)."""
    f = np.load(RESIZE_FIXTURE)
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))  # noqa: E731
    for image, want in (("scene", "resized"), ("small", "grown")):
        got = resize_to_encoder(jnp.asarray(np.moveaxis(f[image], 0, -1))[None], 40)[0]
        assert rel(got, np.moveaxis(f[want], 0, -1)) < 1e-5, image
    up = resize_logits(jnp.asarray(np.moveaxis(f["logits"], 0, -1))[None], (90, 90))[0]
    assert rel(up, np.moveaxis(f["upsampled"], 0, -1)) < 1e-5


def test_seg_resize_scores_against_full_resolution_labels(chips):
    """preprocessing=seg_resize: whole 64-px scenes resized to the 32-px encoder, the decoder's logits
    resized straight to 64 px; the loss counts every full-resolution label and the eval confusion
    matrix equals the direct computation."""
    config = tiny_config(chips, "linear", arg=",preprocessing=seg_resize")
    run = train.setup(config, devices=jax.devices()[:1])
    task = run.task
    assert task.spec.elements["pixels"][0] == (6, 64, 64) and task.model.encoder.image_size == 32
    state = run.init_state()
    params, model_state = ckpt_lib.host_numpy((state.params, state.model_state))
    batch = next(iter(run.input.eval(0, 1)))
    assert batch["label"].shape[-2:] == (64, 64)
    got = jax.jit(task.eval_fn)(params, model_state, batch, jax.random.key(0))
    images = task.images(batch)
    small = jax.image.resize(images, (images.shape[0], 32, 32, 6), "bilinear", antialias=True)
    feats = task.model.apply({"params": params}, small, method="features")
    logits = task.model.apply({"params": params}, feats, (64, 64), method="decode")
    direct = _numpy_confusion(batch, np.argmax(np.asarray(logits), -1))
    np.testing.assert_array_equal(np.asarray(got["confusion"]), direct)
    train_batch = next(run.input.train(0, 1))
    assert train_batch["pixels"].shape == (config.batch_size, 6, 64, 64)
    _, aux, _ = jax.jit(task.loss_fn, static_argnums=4)(params, model_state, train_batch, jax.random.key(0), True)
    assert float(aux["pixels"]) == float(np.sum(train_batch["label"] != -1))
    _, _, _, losses = _run(config)
    assert all(np.isfinite(losses))


# ------------------------------------------------------------------ inference and end to end

def _write_scene(path):
    """A 75 x 53 six-band GeoTIFF (band names in its descriptions) with a nodata corner -> its pixels
    and transform."""
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0.01, 0.4, size=(6, 75, 53)).astype(np.float32)
    pixels[:, :3, :5] = 9999.0  # nodata corner
    transform = Affine(30.0, 0.0, 612345.0, 0.0, -30.0, 4123450.0)
    with rasterio.open(path, "w", driver="GTiff", height=75, width=53, count=6, dtype="float32",
                       crs="EPSG:32611", transform=transform, nodata=9999.0) as dst:
        dst.write(pixels)
        for i, b in enumerate(segdata.BURNSCARS_BANDS):
            dst.set_band_description(i + 1, b)
    return pixels, transform


def _infer(run, variables, workdir, options):
    """`eojax infer` as the CLI runs it: the task's 'infer' plug-in in the run's scope."""
    with run.scope():
        return tasks.require_plugin(run.task, "infer", "eojax infer")(run, variables, workdir, options)


def test_inference_geotiff_is_georeferenced_and_matches_sliding_window(chips, tmp_path):
    config = tiny_config(chips)
    config.infer.probabilities = True
    run = train.setup(config, devices=jax.devices()[:1])
    init = run.init_state()
    params, model_state = init.params, init.model_state
    src_path = str(tmp_path / "scene.tif")
    pixels, transform = _write_scene(src_path)
    summary = _infer(run, (params, model_state), str(tmp_path), {"input": src_path, "output": str(tmp_path / "out")})
    with rasterio.open(summary["outputs"]["classes"]) as out:
        assert out.crs.to_string() == "EPSG:32611" and out.transform == transform
        assert (out.height, out.width, out.dtypes[0], out.nodata) == (75, 53, "uint8", 255)
        classes = out.read(1)
    with rasterio.open(summary["outputs"]["probabilities"]) as prob:
        assert prob.count == 2 and prob.transform == transform
        np.testing.assert_allclose(np.nansum(prob.read(), axis=0)[3:], 1.0, rtol=1e-5)
    # The same windows on the whole scene in memory give the same classes.
    valid = pixels[0] != 9999.0
    logits = jax.jit(lambda p, s, b: run.task.predict_scenes(p, s, run.task.images(b)))(
        params, model_state, {"pixels": pixels[None], "valid": valid[None]})
    expected = np.where(valid, np.argmax(np.asarray(logits)[0], -1), 255)
    np.testing.assert_array_equal(classes, expected)
    assert summary["windows"] == len(seg_eval.window_offsets(75, 32)) * len(seg_eval.window_offsets(53, 32))
    assert summary["outputs"]["overlay"].endswith(".png")


def test_config_mistakes_are_refused_before_any_data_is_read(tmp_path):
    config = tiny_config(tmp_path / "no_such_folder", mode="finetune", **{"sweep.k": 2})
    with pytest.raises(ValueError, match="frozen features"):
        train.setup(config, devices=jax.devices()[:1])


@pytest.mark.slow
def test_core_from_the_saved_spec_needs_no_training_data(chips, tmp_path, monkeypatch):
    """The core built from the JSON round trip of the DataSpec, with the chips gone, initialises and
    scores a batch exactly as the live one; `eojax infer` of a run whose chips are gone (its
    data_spec.json kept) predicts exactly as before."""
    data, workdir = tmp_path / "chips", tmp_path / "run"
    shutil.copytree(chips, data)
    # All devices, as load_for_inference takes them; UperNet's BatchNorm gives a model state.
    config = tiny_config(data, "upernet", "finetune", batch_size=8, mesh=(("data", -1), ("fsdp", 1), ("model", 1)))
    config.input.normalize = "data"  # statistics of the chips themselves: they must travel in the spec
    run = train.setup(config)
    state = run.init_state()
    batch = next(iter(run.input.train(0, 1)))
    batch = {k: batch[k] for k in run.task.spec.elements}
    saver = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    saver.save(1, state, run.train_iter, force=True)
    saver.close()
    train.save_spec(run.task.spec, str(workdir))
    scene = str(tmp_path / "scene.tif")
    _write_scene(scene)
    variables = (state.params, state.model_state)
    live = _infer(run, variables, str(workdir), {"input": scene, "output": str(tmp_path / "live")})

    shutil.rmtree(data)

    def unreachable(*args, **kwargs):
        raise AssertionError("the training data was read")
    monkeypatch.setattr(segdata, "splits_from_config", unreachable)
    monkeypatch.setattr(SegInput, "build_spec", unreachable)
    spec = DataSpec.from_json(json.loads(json.dumps(run.task.spec.to_json())))
    assert spec.info["mean"] is not None and spec == run.task.spec
    core = SegTask(config, spec)
    rng = jax.random.key(5)
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(t.init, rng, batch))  # noqa: E731
    assert shapes(core) == shapes(run.task)
    params, model_state = ckpt_lib.host_numpy(variables)
    loss = lambda task: jax.jit(task.loss_fn, static_argnums=4)(params, model_state, batch, rng, True)  # noqa: E731
    (a, aux_a, state_a), (b, aux_b, state_b) = loss(run.task), loss(core)
    assert float(a) == float(b) and float(aux_a["pixels"]) == float(aux_b["pixels"])
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(x, y)

    again, restored = train.load_for_inference(config, str(workdir))
    gone = _infer(again, restored, str(workdir), {"input": scene, "output": str(tmp_path / "gone")})
    assert again._input is None  # no input stage was ever made
    read = lambda summary: rasterio.open(summary["outputs"]["classes"]).read(1)  # noqa: E731
    np.testing.assert_array_equal(read(gone), read(live))
    with open(live["outputs"]["overlay"], "rb") as f, open(gone["outputs"]["overlay"], "rb") as g:
        assert f.read() == g.read()
    assert gone["class_fractions"] == live["class_fractions"]


def test_end_to_end_best_checkpoint_test_split_and_results(chips, tmp_path):
    config = tiny_config(chips, "linear", "frozen", total_steps=2, eval_every=0, checkpoint_every=2,
                         batch_size=8, mesh=(("data", -1), ("fsdp", 1), ("model", 1)))  # all 8 devices
    config.input.eval_batch_size = 8
    result = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= result["eval"]["miou"] <= 1.0 and "iou_burn_scar" in result["test"]
    assert result["best"]["metric"] == "miou" and (tmp_path / "best").is_dir()
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["test"]["miou"] == pytest.approx(result["test"]["miou"])
    assert isinstance(record["data_fingerprint"], str) and record["config"]["model"]["decoder"] == "linear"
    assert list(tmp_path.glob("seg_prediction_step*.png"))
