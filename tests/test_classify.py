"""The classification family: chip sources and their errors, the fixed split, training through the
trainer (fine-tune, then a linear probe from its encoder), `eojax eval classify` and k-NN."""
import csv
import json
import os

import jax
import numpy as np
import pytest
import rasterio

from eojax import checkpoint as ckpt_lib, train
from eojax.classify import data as cdata
from eojax.classify import evaluate as cls_eval
from eojax.classify import knn
from helpers import load_config


def _chip(path, bands=3, size=16, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", count=bands, height=size, width=size, dtype="uint16") as dst:
        dst.write(np.full((bands, size, size), value, np.uint16) + np.arange(size, dtype=np.uint16))
    return path


def _tree(root, classes=("a", "b", "c"), n=10, **kw):
    for i, c in enumerate(classes):
        for k in range(n):
            _chip(os.path.join(root, c, f"{c}_{k}.tif"), value=100 * i + k, **kw)
    return str(root)


def test_folders_read_chips_with_a_fixed_split(tmp_path):
    root = _tree(tmp_path / "ds", n=40)
    classes, chips = cdata.folder_chips(root)
    assert classes == ["a", "b", "c"] and len(chips) == 120
    splits = [cdata.fixed_split(c.key) for c in chips]
    assert splits == [cdata.fixed_split(c.key) for c in cdata.folder_chips(root)[1]]  # stable
    share = {s: splits.count(s) / len(splits) for s in cdata.SPLITS}
    assert 0.45 < share["train"] < 0.75 and share["val"] > 0.08 and share["test"] > 0.08, share
    cfg = load_config("classify", "data=folders,runlocal")
    cfg.input.update(source="folders", root=root, size=8)
    names, sets = cdata.open_splits(cfg.input)
    element = sets["train"][0]
    assert element["pixels"].shape == (3, 8, 8) and element["valid"].all()
    assert element["label"] == sets["train"].chips[0].labels[0]
    # the values come through (a 16 px chip resized to 8 px keeps its mean)
    raw = rasterio.open(sets["train"].chips[0].path).read().astype(np.float64)
    np.testing.assert_allclose(element["pixels"].mean((1, 2)), raw.mean((1, 2)), rtol=1e-5)
    stats = sets["train"].band_stats()
    assert stats.mean.shape == (3,) and np.all(stats.std > 0)


def test_bad_chip_sets_name_the_culprit(tmp_path):
    root = _tree(tmp_path / "ds")
    odd = _chip(os.path.join(root, "b", "b_odd.tif"), bands=4)
    with pytest.raises(Exception, match="b_odd.tif has 4 bands"):
        cdata.ChipSet(cdata.folder_chips(root)[1], num_classes=3)
    os.remove(odd)
    os.makedirs(os.path.join(root, "empty"))
    with pytest.raises(ValueError, match="empty holds no image"):
        cdata.folder_chips(root)
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], ["ds/a/a_0.tif", "a"], ["ds/b/b_0.tif", "zebra"]])
    with pytest.raises(ValueError, match=r"line 3 \(ds/b/b_0.tif\).*zebra"):
        cdata.csv_chips(str(table), classes=("a", "b"))


def test_csv_multi_label_gives_multi_hot_targets(tmp_path):
    _tree(tmp_path / "ds", n=2)
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "labels", "split"], ["ds/a/a_0.tif", "water;forest", "train"],
                                 ["ds/b/b_0.tif", "forest", "val"]])
    classes, chips, splits = cdata.csv_chips(str(table))
    assert classes == ["forest", "water"] and splits == ["train", "val"]
    chip_set = cdata.ChipSet(chips, num_classes=2, multi_label=True, size=16)
    assert chip_set[0]["labels"].tolist() == [1.0, 1.0] and chip_set[1]["labels"].tolist() == [1.0, 0.0]


@pytest.mark.slow
def test_finetune_then_probe_its_encoder_eval_and_knn(tmp_path):
    """A short fine-tune on the synthetic chips beats the majority class; a linear probe started from
    its encoder keeps the encoder bit-identical; eval's metrics equal a recount from its logits;
    `eojax knn` on the run and on its encoder alone agree with a k-NN computed here."""
    cfg = load_config("classify")
    cfg.update(total_steps=40, eval_every=0, checkpoint_every=40)
    run_dir = str(tmp_path / "ft")
    result = train.train_and_evaluate(cfg, run_dir)  # sharded over the 8 simulated devices
    names, sets = cdata.open_splits(cfg.input)
    labels = [c.labels[0] for c in sets["test"].chips]
    majority = max(np.bincount(labels)) / len(labels)
    assert result["test"]["top1"] > majority + 0.1, (result["test"], majority)

    probe = load_config("classify", "runlocal,mode=linear_probe")
    probe.update(total_steps=10, eval_every=0, checkpoint_every=10)
    probe.model.encoder_init = run_dir
    probe_dir = str(tmp_path / "probe")
    train.train_and_evaluate(probe, probe_dir)
    ft_params, _ = ckpt_lib.load_variables(run_dir, None)
    pr_params, pr_state = ckpt_lib.load_variables(probe_dir, None)
    jax.tree.map(np.testing.assert_array_equal, ft_params["encoder"], pr_params["encoder"])
    assert "head_bn" in pr_state["batch_stats"]  # MAE's probe BatchNorm keeps running statistics

    run, variables = train.load_for_inference(cfg, run_dir)
    with run.scope():
        out = cls_eval.evaluate(run, variables, run_dir, {"output": str(tmp_path / "eval"), "seed": 0})
        feats = {s: cls_eval._collect(run, variables, s, run.task.features) for s in ("train", "test")}
    assert os.path.getsize(out["confusion_png"]) > 1000
    # the trainer's test metrics (summed eval_fn over padded, sharded batches) = the plug-in's recount
    for key in ("top1", "top5", "balanced_accuracy", "macro_f1"):
        assert out[key] == pytest.approx(result["test"][key]), key
    expect = knn.knn_classify(*feats["train"], *feats["test"], k=20, num_classes=len(names))
    assert out["knn_top1"] == pytest.approx(expect.top1)
    # the same encoder through `eojax knn` without training (encoder_init) gives the same k-NN
    knn_cfg = load_config("classify")
    knn_cfg.model.encoder_init = run_dir
    fresh = cls_eval.knn_command(knn_cfg, str(tmp_path / "knn"))
    assert fresh["knn_top1"] == pytest.approx(expect.top1)
    assert json.load(open(tmp_path / "knn" / "knn.json"))["knn_top1"] == fresh["knn_top1"]


def test_eolearn_land_use_set_matches_its_sources_and_splits_by_location(tmp_path, test_data):
    """The real set: every chip is the reference scene's pixels, georeferenced where it was cut, its
    label the majority of the LULC pixels under it (RABA codes grouped as documented), and no
    location is in two splits."""
    from eojax.classify import datasets
    root = str(test_data / "eolearn")
    table = datasets.write_eolearn_lulc(tmp_path / "lulc", root)
    scenes = np.load(os.path.join(root, "REFERENCE_SCENES.npy"))
    raba = np.load(os.path.join(root, "TestEOPatch", "mask_timeless", "LULC.npy"))[..., 0]
    group = {2: "forest", 3: "grassland", 1: "other", 4: "other", 8: "other"}
    rows = list(csv.DictReader(open(table)))
    assert len(rows) > 300
    split_of = {}
    for row in rows[::7]:
        name = os.path.basename(row["path"])
        r, c, date = int(name[1:3]), int(name[4:6]), name[7:17]
        index = {v: k for k, v in datasets.EOLEARN_CLEAR.items()}[date]
        with rasterio.open(os.path.join(os.path.dirname(table), row["path"])) as src:
            np.testing.assert_array_equal(src.read(), np.moveaxis(scenes[index, 8 * r:8 * r + 8, 8 * c:8 * c + 8], -1, 0))
            assert src.crs.to_epsg() == 32633 and abs(src.transform.c - (465181.0522 + 80 * c * 0.99948)) < 1.0
        names = [group[v] for v in raba[8 * r:8 * r + 8, 8 * c:8 * c + 8].ravel() if v in group]
        assert row["label"] == max(sorted(set(names)), key=names.count)
    for row in rows:
        name = os.path.basename(row["path"])
        assert split_of.setdefault(name[:6], row["split"]) == row["split"]  # a location keeps its split
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_flips_give_each_of_the_eight_symmetries_of_a_square():
    from eojax import tasks
    cfg = load_config("classify")
    cfg.augment.update(mixup=0.0, cutmix=0.0, random_erase=0.0, label_smoothing=0.0)
    spec = tasks.DataSpec({"pixels": ((2, 4, 4), "float32"), "valid": ((4, 4), "bool"), "label": ((), "int32"),
                           "weight": ((), "float32")},
                          {"class_names": ["a", "b"], "multi_label": False, "band_names": ["x", "y"], "mean": None,
                           "std": None})
    task = tasks.get(cfg, spec)
    image = np.arange(32, dtype=np.float32).reshape(1, 4, 4, 2)
    images = np.repeat(image, 400, 0)
    out, targets = task._augment(images, {"label": np.zeros(400, np.int32)}, jax.random.key(3))
    square = [np.rot90(image[0], k, (0, 1)) for k in range(4)]
    symmetries = square + [s[:, ::-1] for s in square]
    seen = [next(i for i, s in enumerate(symmetries) if np.array_equal(o, s)) for o in np.asarray(out)]
    counts = np.bincount(seen, minlength=8)
    assert counts.min() > 20, counts  # every one of the 8, none other (next() would have raised)
    np.testing.assert_array_equal(targets, np.eye(2)[np.zeros(400, int)])


def test_multi_label_loss_is_the_mean_binary_cross_entropy():
    """Multi-label chips: the loss is the mean sigmoid BCE over classes and weighted rows (numpy
    reference), eval counts per-class F1 and skips padding rows."""
    from eojax import tasks
    cfg = load_config("classify")
    cfg.augment.update(mixup=0.0, cutmix=0.0, random_erase=0.0, flips=False)
    spec = tasks.DataSpec({"pixels": ((3, 8, 8), "float32"), "valid": ((8, 8), "bool"), "labels": ((4,), "float32"),
                           "weight": ((), "float32")},
                          {"class_names": list("abcd"), "multi_label": True, "band_names": ["x", "y", "z"],
                           "mean": None, "std": None})
    task = tasks.get(cfg, spec)
    rng = np.random.default_rng(0)
    batch = {"pixels": rng.normal(size=(6, 3, 8, 8)).astype(np.float32), "valid": np.ones((6, 8, 8), bool),
             "labels": (rng.random((6, 4)) < 0.4).astype(np.float32),
             "weight": np.array([1, 1, 1, 1, 0, 0], np.float32)}
    variables = task.init(jax.random.key(0), batch)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    loss, _, _ = task.loss_fn(params, state, batch, jax.random.key(1), False)
    z = np.asarray(task.logits(params, state, task.images(batch))[0], np.float64)
    y = batch["labels"]
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    np.testing.assert_allclose(float(loss), bce.mean(1)[:4].mean(), rtol=1e-5)
    out = task.finalize_eval(jax.device_get(task.eval_fn(params, state, batch, None)))
    assert out["count"] == 4 and {"micro_f1", "macro_f1", "f1_a", "loss"} <= set(out)
    np.testing.assert_allclose(out["loss"], bce.mean(1)[:4].mean(), rtol=1e-5)


def test_resnet_encoder_init_brings_its_running_statistics(tmp_path):
    """model.encoder_init=<torchvision-layout ResNet file>: the weights and the BatchNorm running
    statistics (model state) both come from the file; the head's state stays as initialised."""
    from flax import traverse_util
    from safetensors.numpy import load_file
    from test_seg_cnn import FIXTURE_ARCH, RESNET_FIXTURE, _torch_stats

    cfg = load_config("classify", "runlocal,encoder=resnet,mode=linear_probe")
    cfg.model.update(encoder_args=dict(FIXTURE_ARCH), encoder_init=RESNET_FIXTURE)
    run = train.setup(cfg, devices=jax.devices()[:1])
    state = train.restore_or_init(run, ckpt_lib.Checkpointer(str(tmp_path / "ckpt")))
    got = traverse_util.flatten_dict(jax.device_get(state.model_state["batch_stats"]["encoder"]))
    want = _torch_stats(load_file(RESNET_FIXTURE))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    assert "head_bn" in state.model_state["batch_stats"]  # the probe's BatchNorm, fresh
