"""DOFA and CROMA give PANGAEA's outputs: the fixtures in tests/fixtures/reference/{dofa,croma} were
written by PANGAEA's own encoder modules with random weights (scripts/fixtures/reference_dofa_croma.py,
commit in reference.json), the weights in the published layout. Each is imported here through
weights.common.load_encoder, the loader the seg task's load_pretrained (`config.init_from`) uses."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from eojax import weights
from eojax.checkpoint import CheckpointMismatchError
from eojax.models.encoders import build
from eojax.models.encoders.base import WAVELENGTHS_UM
from eojax.seg.task import SegTask
from eojax.tasks.base import DataSpec, elements
from eojax.weights import common
from helpers import ONE_DEVICE, load_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "reference")
TOL = 1e-4  # max |eojax - reference| / max |reference|, per output map


def fixture(name):
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "reference.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(folder, "io.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays, os.path.join(folder, "weights.safetensors")


def sizes(meta):
    return dict(image_size=meta["image_size"], patch_size=meta["patch_size"], width=meta["width"],
                depth=meta["depth"], heads=meta["heads"], mlp_dim=meta["mlp_dim"],
                layers=tuple(meta["output_layers"]))


def images_and_want(meta, arrays):
    images = jnp.asarray(arrays["images"][:, :, 0].transpose(0, 2, 3, 1))  # (B, C, 1, H, W) -> (B, H, W, C)
    return images, [arrays[f"out_{k}"].transpose(0, 2, 3, 1) for k in meta["output_layers"]]


def load_and_run(name, meta, arrays, path, **fields):
    """(eojax maps (B, h, w, D), PANGAEA's maps in the same layout, import report)."""
    enc = build(name, variant="mu", **{**sizes(meta), **fields})
    images, want = images_and_want(meta, arrays)
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), images))["params"]
    params, report = common.load_encoder(path, abstract, enc)
    got = [np.asarray(m) for m in jax.jit(enc.apply)({"params": params}, images)]
    return got, want, report


def max_rel(got, want):
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want))


def dofa_fields(meta, **kw):
    return dict(wave_dim=meta["wave_dim"], generator_heads=meta["generator_heads"],
                generator_mlp_dim=meta["generator_mlp_dim"], **kw)


def test_dofa_wavelength_table_is_pangaeas():
    meta, _, _ = fixture("dofa")
    for band, wave in meta["wave_list"].items():
        assert WAVELENGTHS_UM[band] == pytest.approx(wave, abs=1e-9), band


@pytest.mark.parametrize("by", ["name", "wavelength"])
def test_dofa_matches_pangaea(by):
    """Bands by name (looked up in PANGAEA's wave list) or by wavelength; output layers (0, 2, 3) of
    depth 4: the checkpoint's final norm changes layer 3 only (feature_norm='final', the default)."""
    meta, arrays, path = fixture("dofa")
    bands = dict(input_bands=tuple(meta["bands"])) if by == "name" else \
        dict(wavelengths=tuple(float(w) for w in arrays["wavelengths"]))
    got, want, report = load_and_run("dofa", meta, arrays, path, **dofa_fields(meta, **bands))
    np.testing.assert_allclose(report["wavelengths"], arrays["wavelengths"], rtol=1e-6)
    assert report["ignored"] == {}
    assert max_rel(got, want) < TOL


def test_dofa_feature_norm_options():
    """'none' leaves the last map unnormalised (the others equal PANGAEA's); 'standardise' (eojax's
    earlier default) is each map standardised; neither reads the checkpoint's norm."""
    meta, arrays, path = fixture("dofa")
    fields = dofa_fields(meta, input_bands=tuple(meta["bands"]))
    got, want, report = load_and_run("dofa", meta, arrays, path, feature_norm="none", **fields)
    assert set(report["ignored"]) == {"norm.weight", "norm.bias"}
    assert max_rel(got[:2], want[:2]) < TOL and max_rel(got[2:], want[2:]) > 0.1
    std, _, _ = load_and_run("dofa", meta, arrays, path, feature_norm=True, **fields)  # the old boolean
    for s, g in zip(std, got):
        mu, sd = g.mean(axis=(1, 2, 3), keepdims=True), g.std(axis=(1, 2, 3), keepdims=True)
        np.testing.assert_allclose(s, (g - mu) / np.sqrt(sd ** 2 + 1e-6), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="feature_norm='layer' is unknown"):
        load_and_run("dofa", meta, arrays, path, feature_norm="layer", **fields)


def test_dofa_final_norm_missing_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file
    meta, arrays, path = fixture("dofa")
    sd = {k: v for k, v in load_file(path).items() if not k.startswith("norm.")}
    save_file(sd, tmp_path / "no_norm.safetensors")
    fields = dofa_fields(meta, input_bands=tuple(meta["bands"]))
    with pytest.raises(CheckpointMismatchError, match="(?s)missing in checkpoint: norm.weight.*feature_norm='none'"):
        load_and_run("dofa", meta, arrays, str(tmp_path / "no_norm.safetensors"), **fields)


def test_croma_matches_pangaea_at_layers_0_2():
    """Output layers (0, 2) of depth 4: norm_out on layer 2 (the last requested), not on block 3."""
    meta, arrays, path = fixture("croma")
    assert meta["output_layers"] == [0, 2] and meta["depth"] == 4
    got, want, report = load_and_run("croma", meta, arrays, path)
    assert report["zero_filled_bands"] == [] and report["ignored"] == {}
    assert max_rel(got, want) < TOL


@pytest.mark.parametrize("name", ["dofa", "croma"])
def test_seg_init_from_gives_pangaeas_features(name):
    """config.init_from=<published file> on a seg run: weights.load -> SegTask.load_pretrained; the
    encoder's features are PANGAEA's (the bands by name from the data, as the seg task passes them)."""
    meta, arrays, path = fixture(name)
    assert max_rel(seg_features_from(name, meta, arrays, path), images_and_want(meta, arrays)[1]) < TOL


def seg_features_from(name, meta, arrays, source) -> list:
    """The encoder features of a frozen-encoder seg task (the fixture's sizes and bands) on the fixture's
    images, its params from `weights.load(init, source, task)` as the trainer does for config.init_from."""
    config = load_config("seg", f"encoder={name},decoder=linear,mode=frozen", mesh=ONE_DEVICE)
    config.input.update(crop=meta["image_size"], normalize="none")
    extra = dofa_fields(meta) if name == "dofa" else {}
    config.model.update(encoder_variant="mu", encoder_args={**sizes(meta), **extra})
    bands, s = meta["bands"], meta["image_size"]
    spec = DataSpec(elements(pixels=((len(bands), s, s), np.float32), valid=((s, s), bool),
                             label=((s, s), np.int32), weight=((), np.float32)),
                    {"band_names": bands, "num_classes": 2, "class_names": ["a", "b"], "mean": None, "std": None})
    task = SegTask(config, spec)
    images, _ = images_and_want(meta, arrays)
    batch = {k: np.zeros(a.shape, a.dtype) for k, a in spec.batch(images.shape[0]).items()}
    init = jax.jit(task.init)(jax.random.key(0), batch)
    params, _ = weights.load(nn.unbox(init["params"]), source, task)  # the trainer holds unboxed params
    got = jax.jit(lambda p, x: task.model.apply({"params": p}, x, method="features"))(params, images)
    return [np.asarray(g) for g in got]
