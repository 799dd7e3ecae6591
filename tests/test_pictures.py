"""The pictures a user reads (eojax/viz.py and each family's figure) and where they are tracked
(metric_writer: TensorBoard images, a W&B run). Small arrays, no training."""
import contextlib
import io
import json
import struct
import sys
import types

import matplotlib.text
import ml_collections
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from PIL import Image

from eojax import config_lib, errors, metric_writer, train, viz
from eojax.classify import metrics as classify_metrics
from eojax.diffusion import pictures as diffusion_pictures
from eojax.geo import maps
from eojax.mae import pictures as mae_pictures
from eojax.seg import pictures as seg_pictures
from eojax.vsat import infill

RNG = np.random.default_rng(0)


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def _legend_labels(fig) -> list[str]:
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _colour_bars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _boxes(ax) -> list[tuple]:
    """The outline rectangles of an axes as (y0, x0, y1, x1) pixel boxes."""
    return [(round(r.get_y() + 0.5), round(r.get_x() + 0.5), round(r.get_y() + 0.5 + r.get_height()),
             round(r.get_x() + 0.5 + r.get_width())) for r in ax.patches if isinstance(r, Rectangle)
            and r.get_gid() == "outline"]


def _image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------- the shared figure

def test_grid_figure_has_what_a_bare_grid_lacks(tmp_path):
    tiles = [[RNG.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    tiles[1][2] = RNG.random((24, 32))
    mask = np.zeros((24, 32), bool)
    mask[3:9, 5:20] = True
    bare = viz.grid_figure(tiles[:1])
    assert not bare.legends and not _colour_bars(bare) and not _texts(bare)

    classes = [("water", (30, 90, 240)), ("burn scar", (230, 40, 40))]
    caption = viz.caption(120, {"mIoU": 0.61234, "pixels": 768})
    fig = viz.grid_figure(tiles, columns=("a", "b", "c"), row_labels=("first", "second"), title="T",
                          caption=caption, classes=classes, colour_bar=viz.ColourBar("error", 0.0, 2.0),
                          outlines=viz.outline_of(mask))
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes[:3]] == ["a", "b", "c"]
    assert [ax.get_ylabel() for ax in axes if ax.get_ylabel()] == ["first", "second"]
    assert caption == "step 120 | mIoU 0.6123 | pixels 768" and caption in _texts(fig) and "T" in _texts(fig)
    assert _legend_labels(fig) == ["water", "burn scar"]
    face = [tuple(np.round(np.asarray(h.get_facecolor()[:3]) * 255)) for h in fig.legends[0].legend_handles]
    assert face == [(30, 90, 240), (230, 40, 40)]
    (bar,) = _colour_bars(fig)
    assert bar.get_ylabel() == "error" and bar.get_ylim() == (0.0, 2.0)
    assert all(_boxes(ax) == [(3, 5, 9, 20)] for ax in axes)  # the box on every tile, in pixels
    float_tile = axes[5].images[0]
    assert float_tile.get_array().shape == (24, 32) and float_tile.norm.vmax == 2.0

    path = viz.save_figure(fig, str(tmp_path / "sub" / "grid.png"))
    width, height = _png_size(path)
    assert (width, height) == tuple(int(round(v * fig.dpi)) for v in fig.get_size_inches())
    assert not list((tmp_path / "sub").glob("*.partial"))


def test_outline_of_a_box_a_ragged_mask_and_nothing():
    box = np.zeros((10, 12), bool)
    box[2:5, 3:9] = True
    assert viz.outline_of(box) == (2, 3, 5, 9)
    ragged = box.copy()
    ragged[7, 1] = True
    assert viz.outline_of(ragged) is not None and np.array_equal(viz.outline_of(ragged), ragged)
    assert viz.outline_of(np.zeros((4, 4), bool)) is None
    fig = viz.grid_figure([[np.zeros((10, 12, 3), np.uint8)]], outlines=[[ragged]])
    assert fig.axes[0].collections and not _boxes(fig.axes[0])  # a contour, not a rectangle
    with pytest.raises(ValueError, match="colour_bar"):
        viz.grid_figure([[np.zeros((4, 4))]])


# ----------------------------------------------------------------------------- each family's figure

def test_mae_reconstruction_labels_rows_with_their_masked_error():
    b, h, w, c, p = 2, 16, 16, 3, 4
    image = RNG.normal(size=(b, h, w, c)).astype(np.float32)
    recon = image + RNG.normal(size=image.shape).astype(np.float32) * np.array([0.1, 0.5])[:, None, None, None]
    valid = np.ones((b, h, w), bool)
    valid[0, :2] = False
    patch_mask = (RNG.random((b, 1, (h // p) * (w // p))) < 0.75).astype(np.float32)
    task = types.SimpleNamespace(name="mae", band_names=["B4", "B3", "B2"], model=types.SimpleNamespace(patch_size=p),
                                 config=ml_collections.ConfigDict({"model": {"norm_pix_loss": False}}))
    fig = mae_pictures.reconstruction_figure(task, dict(image=image, valid=valid, mask=patch_mask, recon=recon), 40)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes[:4]] == list(mae_pictures.RECONSTRUCTION_COLUMNS)
    # Independently: the masked pixels of each tile from its patch mask, the MSE over them and the bands.
    for i, ax in enumerate(axes[::4]):
        px = np.kron(patch_mask[i, 0].reshape(h // p, w // p), np.ones((p, p))).astype(bool) & valid[i]
        assert ax.get_ylabel() == f"masked MSE {np.mean((recon[i] - image[i])[px] ** 2):.3g}"
    assert any(t.startswith("step 40 | mask ratio") for t in _texts(fig))
    assert all(ax.collections for ax in axes[3::4])  # the masked patches outlined on the pasted column


def test_mae_multiscale_columns_and_l1_per_scale():
    f = {}
    for key, size in (("", 8), ("_2x", 16), ("_4x", 32)):
        f["image" + key] = RNG.normal(size=(2, size, size, 3)).astype(np.float32)
        f["valid" + key] = RNG.random((2, size, size)) > 0.2
    f["up2"], f["up4"] = f["image_2x"] + 0.25, f["image_4x"] - 0.5
    task = types.SimpleNamespace(name="satmae", band_names=["R", "G", "B"])
    fig = mae_pictures.multiscale_figure(task, f, 12)
    assert [ax.get_title() for ax in _image_axes(fig)[:5]] == ["input", "target 2x", "predicted 2x", "target 4x",
                                                              "predicted 4x"]
    assert "step 12 | L1 2x 0.25 | L1 4x 0.5" in _texts(fig)


def test_seg_prediction_legend_is_the_class_names_and_caption_the_accuracy():
    config = ml_collections.ConfigDict({"model": {"num_classes": 3, "class_names": ("land", "water", "burn"),
                                                  "ignore_index": -1}})
    labels = RNG.integers(-1, 3, (2, 20, 20))
    preds = RNG.integers(0, 3, (2, 20, 20))
    pictures = [RNG.integers(0, 255, (20, 20, 3), dtype=np.uint8) for _ in range(2)]
    fig = seg_pictures.prediction_figure(config, pictures, labels, preds, 7)
    assert _legend_labels(fig) == ["land", "water", "burn", "ignored"]
    assert [ax.get_title() for ax in _image_axes(fig)[:4]] == list(seg_pictures.COLUMNS)
    scored = labels != -1
    accuracy = (labels == preds)[scored].mean()
    assert any(t.startswith(f"step 7 | accuracy {viz.fmt(float(accuracy))} | mIoU") for t in _texts(fig))
    truth = _image_axes(fig)[1].images[0].get_array()
    assert (np.asarray(truth)[~scored[0]] == seg_pictures.IGNORED).all()
    # Without names the classes are numbered.
    config.model.class_names = ()
    assert seg_pictures.class_names(config) == ["0", "1", "2"]


def test_vsat_comparison_outlines_the_held_out_box_and_scales_errors():
    values = RNG.normal(1000, 100, (3, 4, 12, 14)).astype(np.float32)
    ts = types.SimpleNamespace(values=values, band_names=["B2", "B3", "B4", "B8"], dates=["d0", "d1", "d2"])
    hold = np.zeros((12, 14), bool)
    hold[4:9, 2:11] = True
    ys, xs = np.nonzero(hold)
    truth = values[1][:, ys, xs].T
    preds = {"model": (truth + 5, np.ones(len(ys), bool)), "linear": (truth - 20, np.ones(len(ys), bool))}
    metrics = {"model": {"l1_mean": 5.0}, "linear": {"l1_mean": 20.0},
               "summary": {"best_reference": "linear", "gain_over_best": 0.75}}
    fig = infill.comparison_figure(ts, 1, hold, preds, metrics)
    axes = _image_axes(fig)
    assert all(_boxes(ax) == [(4, 2, 9, 11)] for ax in axes)
    assert [ax.get_title() for ax in axes[:3]] == ["truth", "model\nL1 5", "linear\nL1 20"]
    (bar,) = _colour_bars(fig)
    assert bar.get_ylim()[1] == pytest.approx(20.0)  # the largest error of any method
    assert "model vs best reference (linear): 75.0 % lower mean L1" in _texts(fig)

    status = np.full((12, 14), infill.OBSERVED, np.uint8)
    status[0, :5] = infill.FILLED
    summary = {"filled": 5, "to_fill": 5, "failed": 0, "holdout": int(hold.sum()), "pixels_per_sec": 10.0,
               "metrics": {"model": {"l1_mean": 5.0}}}
    fig = infill.before_after_figure(ts, 1, values[1], status, hold, summary)
    assert _legend_labels(fig) == ["observed", "filled", "failed", "no data"]
    assert all(_boxes(ax) == [(4, 2, 9, 11)] for ax in _image_axes(fig))


def test_diffusion_geo_and_confusion_figures_say_what_they_show():
    config = ml_collections.ConfigDict({"seed": 3, "sampler": {"name": "ddim", "num_steps": 10, "guidance_scale": 2.0}})
    tiles = RNG.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    prompts = [("Forest", "a forest"), ("a very long class name indeed", "x")]
    fig = diffusion_pictures.samples_figure(tiles, prompts, 2, config, 50)
    axes = _image_axes(fig)
    assert [ax.get_ylabel() for ax in axes[::2]] == ["Forest", "a very long class\u2026"]
    assert [ax.get_title() for ax in axes[:2]] == ["sample 1", "sample 2"]
    assert any(t.startswith("step 50 | sampler ddim | steps 10 | guidance 2 | seed 3") for t in _texts(fig))

    density = -np.square(np.linspace(-3, 3, 360))[None].repeat(180, 0)
    fig = maps.world_map_figure(density, (10.0, 20.0), pred_latlon=(12.0, 25.0), title="t",
                                caption=viz.caption(9, {"error km": 600}))
    assert _legend_labels(fig) == ["true location", "predicted"] and len(_colour_bars(fig)) == 1
    assert "step 9 | error km 600" in _texts(fig)


def test_confusion_png_caption(tmp_path):
    path = classify_metrics.confusion_png(np.eye(3) * 4, ["a", "b", "c"], str(tmp_path / "c.png"), title="T",
                                          caption=viz.caption(None, {"top1": 1.0}))
    assert _png_size(path)[0] > 300 and not list(tmp_path.glob("*.partial"))


# ----------------------------------------------------------------------------- tracking

def _read_events(directory) -> list:
    """Every Event of the TensorBoard event files in `directory` (TFRecord framing: u64 length,
    u32 length CRC, payload, u32 payload CRC), parsed with tensorboardX's protobuf classes."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def test_metric_writer_sends_images_to_tensorboard(tmp_path):
    picture = RNG.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    writer = metric_writer.MetricWriter(str(tmp_path))
    writer.write(5, {"loss": 0.25}, prefix="eval")
    writer.write_images(5, {"seg_prediction": picture})
    writer.close()
    values = [(e.step, v) for e in _read_events(tmp_path / "tensorboard") for v in e.summary.value]
    scalars = {(step, v.tag): v.simple_value for step, v in values if v.WhichOneof("value") == "simple_value"}
    assert scalars == {(5, "eval/loss"): 0.25}
    (image,) = [(step, v) for step, v in values if v.HasField("image")]
    assert image[0] == 5 and image[1].tag == "pictures/seg_prediction"
    assert (image[1].image.height, image[1].image.width, image[1].image.colorspace) == (30, 40, 3)
    decoded = np.asarray(Image.open(io.BytesIO(image[1].image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, picture)  # PNG in the event file: lossless


class FakeWandb(types.ModuleType):
    """What MetricWriter uses of wandb: init(...) -> run with log / finish, and Image."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

        class Image:
            def __init__(self, data, caption=None):
                self.data, self.caption = np.array(data), caption
        self.Image = Image

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_run_gets_the_same_scalars_and_images(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    options = ml_collections.ConfigDict({"project": "eo", "entity": "", "name": "", "mode": "offline"})
    config = ml_collections.ConfigDict({"task": "seg", "seed": 1})
    picture = RNG.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    writer = metric_writer.MetricWriter(str(tmp_path), wandb=options, config=config)
    writer.write(10, {"loss": 1.5, "lr": 0.001})
    writer.write(10, {"miou": 0.5}, prefix="eval")
    writer.write_images(10, {"seg_prediction": picture})
    writer.close()
    (run,) = fake.runs
    assert run.kwargs["project"] == "eo" and run.kwargs["mode"] == "offline" and run.kwargs["entity"] is None
    assert run.kwargs["dir"] == str(tmp_path) and run.kwargs["name"] == tmp_path.name
    assert run.kwargs["config"] == {"task": "seg", "seed": 1} and run.finished
    jsonl = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    expected = [(r["step"], {f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split")}) for r in jsonl]
    assert run.logged[:2] == expected
    step, images = run.logged[2]
    assert step == 10 and list(images) == ["pictures/seg_prediction"]
    np.testing.assert_array_equal(images["pictures/seg_prediction"].data, picture)
    # The workdir's next run (a resume) continues the same W&B run.
    metric_writer.MetricWriter(str(tmp_path), wandb=options, config=config).close()
    assert fake.runs[1].kwargs["id"] == run.kwargs["id"] and fake.runs[1].kwargs["resume"] == "allow"


def test_wandb_is_never_imported_without_a_project(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would raise ImportError
    writer = metric_writer.MetricWriter(str(tmp_path), wandb=config_lib.trainer_defaults().wandb)
    writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    writer.close()


def test_wandb_config_is_checked_before_anything_runs(monkeypatch):
    config = config_lib.trainer_defaults()
    config_lib.validate(config)  # project '' = off: wandb not needed
    config.wandb.project = "eo"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(errors.ConfigError, match="needs the wandb package"):
        config_lib.validate(config)
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    config_lib.validate(config)
    config.wandb.mode = "sometimes"
    with pytest.raises(errors.ConfigError, match="config.wandb"):
        config_lib.validate(config)


# ----------------------------------------------------------------------------- the trainer's part

def fake_pictures(run, variables, batch, workdir, step):
    """A pictures plug-in: one PNG of the batch's first image, named as the families name theirs."""
    return [viz.save_png(f"{workdir}/fake_grid_step{step}.png", batch["image"][0])]


class FakeTask:
    name = "fake"
    plugins = {"pictures": f"{__name__}:fake_pictures"}


def _fake_run(eval_batches):
    train_iter = iter([{"image": np.zeros((1, 4, 4, 3), np.uint8)}])
    return types.SimpleNamespace(task=FakeTask(), scope=contextlib.nullcontext, global_batch=lambda b: b,
                                 train_iter=train_iter,
                                 input=types.SimpleNamespace(eval=lambda i, n: eval_batches))


def test_trainer_pictures_reach_tensorboard_at_their_step(tmp_path):
    image = RNG.integers(0, 255, (1, 6, 5, 3), dtype=np.uint8)
    writer = metric_writer.MetricWriter(str(tmp_path))
    files = train.write_pictures(_fake_run([{"image": image}]), None, str(tmp_path), 30, writer,
                                 during_training=True)
    writer.close()
    assert files == [f"{tmp_path}/fake_grid_step30.png"]
    (event,) = [(e.step, v) for e in _read_events(tmp_path / "tensorboard") for v in e.summary.value]
    assert event[0] == 30 and event[1].tag == "pictures/fake_grid"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(event[1].image.encoded_image_string))), image[0])


def test_pictures_during_training_never_take_a_train_batch(tmp_path):
    run = _fake_run(None)  # no eval split
    writer = metric_writer.MetricWriter(str(tmp_path), enabled=False)
    assert train.write_pictures(run, None, str(tmp_path), 3, writer, during_training=True) == []
    assert next(run.train_iter, None) is not None  # the data stream is untouched
    run = _fake_run(None)
    assert train.write_pictures(run, None, str(tmp_path), 4, writer) == [f"{tmp_path}/fake_grid_step4.png"]
