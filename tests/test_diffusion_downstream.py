"""The downstream-classification protocol (eojax.diffusion.downstream, `eojax downstream`): class
prompts -> generated PNGs -> a classify-family classifier trained on them alone -> accuracy on the real
chips' test split. The tiny Stable Diffusion folder has random weights (its images are noise), so the
end-to-end test checks the protocol and its counts, not the accuracy."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eojax import errors
from eojax.classify import data as cdata
from eojax.diffusion import downstream

from helpers import REPO, xla_flags

SD_TINY = os.path.join(os.path.dirname(__file__), "fixtures", "sd_tiny")
CLASSES = ("Forest", "River")


def _real_folders(root, per_class=15, size=24, bands=3, dtype=np.uint8):
    """One folder per class of small chips (Forest greenish, River bluish): some fall in each split."""
    rng = np.random.default_rng(0)
    for k, cls in enumerate(CLASSES):
        os.makedirs(root / cls)
        for i in range(per_class):
            im = rng.integers(0, 80, (size, size, bands)).astype(dtype)
            im[..., 1 + k] += 120
            if bands == 3 and dtype == np.uint8:
                Image.fromarray(im, "RGB").save(root / cls / f"{cls}_{i}.png")
            else:
                import rasterio
                with rasterio.open(root / cls / f"{cls}_{i}.tif", "w", driver="GTiff", width=size, height=size,
                                   count=bands, dtype=im.dtype.name) as dst:
                    dst.write(im.transpose(2, 0, 1))
    return str(root)


def _expected_test(root):
    """The real test split, computed here from the fixed hash split's definition."""
    return sorted((os.path.join(root, c, f), c) for c in CLASSES for f in os.listdir(os.path.join(root, c))
                  if cdata.fixed_split(f"{c}/{f}") == "test")


def test_class_prompts_and_seeds(tmp_path):
    assert downstream.parse_class_prompts(["Forest: a dense forest", "River:a river: wide"]) == [
        ("Forest", "a dense forest"), ("River", "a river: wide")]
    for bad in ("a dense forest", ":a forest", "Forest:  "):
        with pytest.raises(errors.ConfigError, match="CLASS:PROMPT"):
            downstream.parse_class_prompts([bad])
    table = tmp_path / "prompts.json"
    table.write_text(json.dumps({"Forest": "a dense forest", "River": ["a river", "a wide river"]}))
    assert downstream.parse_class_prompts([str(table), "Lake:a lake"]) == [
        ("Forest", "a dense forest"), ("River", "a river"), ("River", "a wide river"), ("Lake", "a lake")]
    table.write_text(json.dumps({"Forest": 3}))
    with pytest.raises(errors.ConfigError, match="class 'Forest' needs a non-empty prompt string"):
        downstream.parse_class_prompts([str(table)])
    seeds = [downstream.image_seed(s, i) for s in (0, 1) for i in range(50)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2 ** 31 for s in seeds)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_classifier_trains_on_generated_and_tests_on_the_real_test_split(tmp_path):
    """The CSV the classifier reads: train = the generated files, test = exactly the real test split
    (no val: no real chip trains or selects the model), opened through the classify family's reader."""
    real = _real_folders(tmp_path / "real")
    classes, test = downstream.real_test_split(real)
    assert classes == list(CLASSES)
    assert sorted((c.path, classes[c.labels[0]]) for c in test) == _expected_test(real)
    gen = {}
    for cls in CLASSES:
        os.makedirs(tmp_path / "gen" / cls)
        gen[cls] = [str(tmp_path / "gen" / cls / f"p00_{i:05d}.png") for i in range(3)]
        for p in gen[cls]:
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
    path = str(tmp_path / "splits.csv")
    downstream.write_splits_csv(path, gen, test, classes)
    config = downstream.classifier_config(path, classes, n_train=6, size=16, epochs=2, batch_size=4)
    assert config.input.source == "csv" and config.best_metric == "" and config.eval_every == 0
    assert config.model.encoder == "resnet" and config.model.encoder_variant == "18" and config.model.mode == "scratch"
    assert config.total_steps == 2 * 2 and config.augment.mixup == 0.0
    names, sets = cdata.open_splits(config.input)
    assert names == list(CLASSES) and set(sets) == {"train", "test"}
    assert sorted((c.path, names[c.labels[0]]) for c in sets["train"].chips) == sorted(
        (p, c) for c in CLASSES for p in gen[c])
    assert sorted((c.path, names[c.labels[0]]) for c in sets["test"].chips) == _expected_test(real)
    with open(path) as f:
        assert {r["split"] for r in csv.DictReader(f)} == {"train", "test"}
    # A given classify config keeps its recipe; only its input is pointed at the CSV.
    base = downstream.default_classifier_base()
    base.total_steps = 7
    kept = downstream.classifier_config(path, classes, 6, base)
    assert kept.total_steps == 7 and kept.input.csv == path and kept.best_metric == ""


def test_generation_from_a_diffusion_run_fills_the_class_folders(tmp_path, monkeypatch):
    """An eojax diffusion run's task samples in batches of config.batch_size (the last one padded),
    each batch from its own seed; every PNG lands in its prompt's class folder (a stand-in task whose
    images encode the prompt, so a misplaced image shows)."""
    import contextlib
    import types

    import ml_collections
    from eojax import train

    prompts = ["a dense forest", "a wide river"]
    calls = []

    class Task:
        def sample(self, params, captions, seed=0):
            calls.append((list(captions), seed))
            return np.stack([np.full((8, 8, 3), prompts.index(c) * 0.5 - 0.5, np.float32) for c in captions])

        def to_rgb8(self, images):
            return [((im + 1) / 2 * 255).round().astype(np.uint8) for im in images]

    run = types.SimpleNamespace(task=Task(), scope=contextlib.nullcontext)
    monkeypatch.setattr(train, "load_for_inference", lambda config, workdir: (run, ({}, {})))
    config = ml_collections.ConfigDict({"task": "diffusion", "batch_size": 4, "sampler": {
        "name": "ddim", "num_steps": 3, "guidance_scale": 2.0}})
    gen = downstream.run_generator(config, str(tmp_path / "run"))
    files = downstream.generate(gen, list(zip(CLASSES, prompts)), 3, str(tmp_path / "gen"), seed=7)
    assert [len(c) for c, _ in calls] == [4, 4] and calls[1][0][-2:] == [prompts[1]] * 2  # 6 images, padded
    assert len({seed for _, seed in calls}) == 2
    for k, cls in enumerate(CLASSES):
        assert files[cls] == [str(tmp_path / "gen" / cls / f"p{k:02d}_{i:05d}.png") for i in range(3)]
        for path in files[cls]:
            with Image.open(path) as im:
                assert im.mode == "RGB" and np.asarray(im)[0, 0, 0] == (64 if k == 0 else 128)
    config.task = "classify"
    with pytest.raises(errors.ConfigError, match="generates with a diffusion run"):
        downstream.run_generator(config, str(tmp_path / "run"))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_real_set_and_prompt_errors(tmp_path):
    real = _real_folders(tmp_path / "real")
    with pytest.raises(errors.ConfigError, match=r"classes \['River'\] of --real=.* have no --prompt"):
        downstream.check_classes([("Forest", "a forest")], list(CLASSES), real)
    with pytest.raises(errors.ConfigError, match=r"--prompt classes \['Lake'\] are not classes"):
        downstream.check_classes([("Forest", "a"), ("River", "b"), ("Lake", "c")], list(CLASSES), real)
    with pytest.raises(errors.DataError, match="4 band\\(s\\) of uint16.*8-bit RGB"):
        downstream.real_test_split(_real_folders(tmp_path / "ms", bands=4, dtype=np.uint16))
    with pytest.raises(errors.DataError, match="--real=.*nowhere"):
        downstream.real_test_split(str(tmp_path / "nowhere"))
    opts = {"real": real, "prompt": ["Forest:a forest", "River:a river"]}
    with pytest.raises(errors.ConfigError, match="not both"):
        downstream.command(None, str(tmp_path), {**opts, "sd_folder": SD_TINY})
    with pytest.raises(errors.ConfigError, match="needs --output"):
        downstream.command(None, None, {**opts, "sd_folder": SD_TINY})
    with pytest.raises(errors.ConfigError, match="needs --real"):
        downstream.command(None, None, {"prompt": opts["prompt"], "sd_folder": SD_TINY})


@pytest.mark.slow
def test_downstream_cli_end_to_end_with_the_tiny_sd_folder(tmp_path):
    """`eojax downstream` with the tiny SD folder: 3 images per prompt, a ResNet-18 trained for two
    steps, tested on the real test split; the report's sample counts, files and one-line errors."""
    real = _real_folders(tmp_path / "real")
    out = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "eojax.main", "downstream",
            f"--config={os.path.join(REPO, 'configs', 'diffusion.py')}", "--config.sampler.num_steps=2",
            f"--sd_folder={SD_TINY}", f"--real={real}", "--prompt=Forest:a dense forest",
            "--prompt=River:a wide river", "--num_samples=3", "--seed=1", f"--output={out}",
            f"--classifier={os.path.join(REPO, 'configs', 'classify.py')}:data=csv,encoder=resnet,mode=scratch",
            "--classifier.model.encoder_variant=18", "--classifier.input.size=16", "--classifier.batch_size=4",
            "--classifier.input.eval_batch_size=4", "--classifier.total_steps=2", "--classifier.optim.accum_steps=1",
            "--classifier.optim.warmup_steps=1", "--classifier.progress_bar=False"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])["downstream"]
    with open(out / "downstream.json") as f:
        report = json.load(f)
    assert report == summary
    expected = _expected_test(real)
    counts = report["samples"]
    assert counts["generated_per_class"] == {"Forest": 3, "River": 3} and counts["generated_total"] == 6
    assert counts["real_test_per_class"] == {c: sum(1 for _, k in expected if k == c) for c in CLASSES}
    assert counts["real_test_total"] == counts["tested"] == len(expected)
    assert 0.0 <= report["accuracy"] <= 1.0 and set(report["per_class_accuracy"]) == set(CLASSES)
    assert report["classifier"]["total_steps"] == 2 and report["classifier"]["encoder"] == "resnet18"
    assert report["generator"]["kind"] == "sd_folder" and report["generator"]["num_steps"] == 2
    pngs = sorted(os.listdir(out / "generated" / "River"))
    assert pngs == [f"p01_{i:05d}.png" for i in range(3)]
    with Image.open(out / "generated" / "River" / pngs[0]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)
    # Run again into the same folder: refused in one line, nothing overwritten.
    again = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert again.returncode == errors.WORKDIR and again.stderr.strip().splitlines()[-1].startswith("eojax: error:")
    assert "exists" in again.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_default_recipe_learns_a_class_signal_the_generator_carries(tmp_path):
    """run_protocol with the default recipe (ResNet-18 from scratch; 16 px, batch 8 and 6 epochs here) and a
    stand-in generator whose images carry each class's colour as the real chips do: the classifier,
    trained on generated images only, gets every real test chip right, so labels, splits and the
    normalisation line up between the generated and the real side."""
    real = _real_folders(tmp_path / "real")
    rng = np.random.default_rng(1)

    def images(prompts, seeds):
        out = []
        for p in prompts:
            im = rng.integers(0, 80, (24, 24, 3))
            im[..., 1 if "forest" in p else 2] += 120
            out.append(im.astype(np.uint8))
        return out

    gen = downstream.Generator("stand-in", "test", {}, images, 4)
    report = downstream.run_protocol(gen, [("Forest", "a forest"), ("River", "a river")], real, num_samples=8,
                                     output=str(tmp_path / "out"),
                                     classifier_options=dict(size=16, epochs=6, batch_size=8))
    assert report["classifier"]["encoder"] == "resnet18" and report["classifier"]["total_steps"] == 12
    assert report["samples"]["generated_per_class"] == {"Forest": 8, "River": 8}
    assert report["samples"]["tested"] == len(_expected_test(real))
    assert report["accuracy"] == 1.0 and report["per_class_accuracy"] == {"Forest": 1.0, "River": 1.0}
