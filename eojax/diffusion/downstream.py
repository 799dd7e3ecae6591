"""Downstream classification of generated images: train a classifier on generated images only, test
it on real chips (the "train on synthetic, test on real" protocol).

  eojax downstream --config=configs/diffusion.py:sd15 --sd_folder=/weights/sd-eurosat \
      --real=/data/EuroSAT_RGB --prompt="AnnualCrop:a satellite image of annual crop fields" \
      --prompt="Forest:a satellite image of a dense forest" ... --num_samples=500 --output=/tmp/downstream
  eojax downstream --config=configs/diffusion.py:runlocal --workdir=/runs/diffusion --real=... --prompt=...

1. Generation: for each --prompt CLASS:TEXT (repeatable; a class may have several; or a .json file
   {class: prompt or [prompts]}, as `eojax infer prompt_writer` writes), --num_samples images. The generator is a diffusers Stable Diffusion folder (--sd_folder, eojax.diffusion.sd.generate
   with the folder's scheduler family unless config.sampler.name picks another, config.sampler.num_steps
   and guidance_scale; `configs/diffusion.py:sd15` keeps the folder's PNDM, 100 steps at guidance 7.5), or the
   latest checkpoint of an eojax diffusion run (--workdir with its --config, the task's own sampler).
   Seeds come from --seed and the image's index: with Stable Diffusion each image has its own (it does
   not depend on the batch it was made in); an eojax run's sampler draws a batch (config.batch_size
   images) from one. Written as 8-bit RGB PNGs to <output>/generated/<CLASS>/.
2. Classifier: eojax's classify family through the trainer, in <output>/classifier, on a CSV
   (<output>/splits.csv) whose train split is the generated images and whose test split is the real
   chips' test split. No real chip is trained on or used for model selection (no val split, no kept
   best). Default recipe: ResNet-18 from scratch on 64-px chips, 30 epochs of the generated set,
   batch 64, AdamW lr 1e-3 (one epoch of warm-up, cosine), flips / quarter turns only; the band
   statistics come from the generated images. `--classifier=configs/classify.py:...` (with
   --classifier.KEY=VALUE overrides) replaces the recipe: only its input's source, CSV and classes are set.
3. Report: <output>/downstream.json: accuracy (top-1), balanced accuracy, macro F1, the per-class
   accuracy, and the sample counts (generated per class, real test chips per class).

Real chips (--real): a folder of class folders (class = folder name; the classify family's fixed hash
split, 60 / 20 / 20, gives the test split) or a CSV of path,label[,split] (its own split column). They
must be 8-bit RGB (3 bands, e.g. EuroSAT's RGB JPEGs), as the generated PNGs are; every real class
needs a prompt, and every prompt's class must be a real class.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import math
import os
import types
import warnings
from typing import Callable, Sequence

import numpy as np

from eojax import errors

PROTOCOL = dict(size=64, epochs=30, batch_size=64, lr=1e-3)
GENERATED, CLASSIFIER, SPLITS_CSV, REPORT = "generated", "classifier", "splits.csv", "downstream.json"


@dataclasses.dataclass
class Generator:
    """`images(prompts, seeds)` -> uint8 RGB arrays (H, W, 3), one per prompt; called with batch_size
    prompts at a time."""
    kind: str  # 'sd_folder' or 'eojax_run'
    source: str
    settings: dict
    images: Callable[[list[str], list[int]], list[np.ndarray]]
    batch_size: int = 4


def parse_class_prompts(specs: Sequence[str]) -> list[tuple[str, str]]:
    """'CLASS:PROMPT' strings -> (class, prompt) pairs. A spec naming an existing .json file is read as
    {class: prompt or [prompts]} (what `eojax infer prompt_writer` writes to prompts.json)."""
    out = []
    for spec in specs:
        if str(spec).lower().endswith(".json") and os.path.isfile(spec):
            out += _prompts_file(spec)
            continue
        cls, sep, prompt = str(spec).partition(":")
        if not sep or not cls.strip() or not prompt.strip():
            raise errors.ConfigError(f"--prompt={spec!r}: eojax downstream takes CLASS:PROMPT, e.g. "
                                     "--prompt='Forest:a satellite image of a dense forest'")
        out.append((cls.strip(), prompt.strip()))
    if not out:
        raise errors.ConfigError("eojax downstream needs at least one --prompt=CLASS:PROMPT")
    return out


def _prompts_file(path: str) -> list[tuple[str, str]]:
    try:
        with open(path) as f:
            table = json.load(f)
    except ValueError as e:
        raise errors.ConfigError(f"--prompt={path} is not valid JSON: {e}") from e
    if not isinstance(table, dict):
        raise errors.ConfigError(f"--prompt={path}: a JSON object {{class: prompt or [prompts]}} expected")
    out = []
    for cls, prompts in table.items():
        for prompt in [prompts] if isinstance(prompts, str) else prompts if isinstance(prompts, list) else [None]:
            if not isinstance(prompt, str) or not prompt.strip() or not str(cls).strip():
                raise errors.ConfigError(f"--prompt={path}: class {cls!r} needs a non-empty prompt string "
                                         f"(or a list of them), got {prompts!r}")
            out.append((str(cls).strip(), prompt.strip()))
    return out


def image_seed(seed: int, index: int) -> int:
    """The seed of generated image `index` (an int below 2^31, distinct per (seed, index))."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] >> 1)


# -- generators -------------------------------------------------------------------------------------
def _to_uint8(images) -> list[np.ndarray]:
    return [(np.clip(np.asarray(im, np.float32), 0.0, 1.0) * 255).round().astype(np.uint8) for im in images]


def sd_generator(folder: str, sampler, negative_prompt: str = "", batch_size: int = 4) -> Generator:
    """A diffusers Stable Diffusion folder; `sampler` is a diffusion config's sampler block (name,
    num_steps, guidance_scale). `folder` may be a zoo name or hf:// URL (eojax.zoo)."""
    from eojax import zoo
    from eojax.diffusion import sd as sd_lib

    folder = zoo.resolve(folder, "--sd_folder")
    pipe = sd_lib.load(folder)
    name = sampler.name if sampler.name != pipe.sampler_options["name"] else None
    settings = {"sampler": sampler.name, "num_steps": int(sampler.num_steps),
                "guidance_scale": float(sampler.guidance_scale), "negative_prompt": negative_prompt,
                "size": pipe.configs["unet"].get("sample_size", 64) * pipe.vae_scale}

    def images(prompts, seeds):
        out = sd_lib.generate(pipe, prompts, negative_prompt, num_steps=settings["num_steps"],
                              guidance_scale=settings["guidance_scale"], seeds=seeds, sampler=name)
        return _to_uint8(np.asarray(out))

    return Generator("sd_folder", os.path.abspath(folder), settings, images, batch_size)


def run_generator(config, workdir: str) -> Generator:
    """The latest checkpoint of an eojax diffusion run (its task's sampler, config.sampler)."""
    from eojax import train

    if config.task != "diffusion":
        raise errors.ConfigError(f"eojax downstream generates with a diffusion run: --config trains "
                                 f"{config.task!r}; give configs/diffusion.py (or --sd_folder)")
    run, (params, _) = train.load_for_inference(config, workdir)
    task = run.task

    def images(prompts, seeds):
        # One batch of the task's sampler, drawn from the batch's first seed (sample k from (seed, k)).
        with run.scope():
            return task.to_rgb8(task.sample(params, list(prompts), seed=seeds[0]))

    settings = {k: config.sampler[k] for k in ("name", "num_steps", "guidance_scale")}
    return Generator("eojax_run", os.path.abspath(workdir), settings, images, int(config.batch_size))


def generate(generator: Generator, class_prompts, num_samples: int, out_dir: str, seed: int = 0) -> dict:
    """num_samples PNGs per (class, prompt) in out_dir/<class>/ -> {class: [files]} (in prompt order)."""
    from PIL import Image

    if num_samples < 1:
        raise errors.ConfigError(f"--num_samples={num_samples}: at least 1 image per prompt")
    jobs = [(cls, j, prompt, i) for j, (cls, prompt) in enumerate(class_prompts) for i in range(num_samples)]
    files: dict[str, list[str]] = {cls: [] for cls, _ in class_prompts}
    b = max(1, generator.batch_size)
    for start in range(0, len(jobs), b):
        chunk = jobs[start:start + b]
        # The last chunk is padded to the batch size: one compiled sampler for every chunk.
        padded = chunk + [chunk[-1]] * (b - len(chunk))
        seeds = [image_seed(seed, start + k) for k in range(len(padded))]
        images = generator.images([p for _, _, p, _ in padded], seeds)
        for (cls, j, _, i), image in zip(chunk, images):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"the generator made an image of shape {image.shape}; RGB (H, W, 3) expected")
            os.makedirs(os.path.join(out_dir, cls), exist_ok=True)
            path = os.path.join(out_dir, cls, f"p{j:02d}_{i:05d}.png")
            Image.fromarray(image, "RGB").save(path)
            files[cls].append(path)
        logging.info("downstream: generated %d / %d images", min(start + b, len(jobs)), len(jobs))
    return files


# -- real chips, splits, classifier -----------------------------------------------------------------
def real_test_split(real: str) -> tuple[list[str], list]:
    """(class names, the test split's chips) of the real set: a folder of class folders or a CSV."""
    from eojax.classify import data as cdata

    is_csv = real.lower().endswith(".csv")
    cfg = types.SimpleNamespace(source="csv" if is_csv else "folders", root="" if is_csv else real,
                                csv=real if is_csv else "", classes=())
    try:
        classes, splits = cdata.splits_from_config(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise errors.DataError(f"--real={real}: {e}") from e
    if not splits["test"]:
        raise errors.DataError(f"--real={real}: no chip falls in the test split "
                               f"({'its split column' if is_csv else 'the fixed 60/20/20 hash split'})")
    _check_rgb8(splits["test"][0].path, real)
    return classes, splits["test"]


def _check_rgb8(path: str, real: str) -> None:
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                count, dtype = src.count, src.dtypes[0]
    except rasterio.errors.RasterioError as e:
        raise errors.DataError(f"--real={real}: cannot read chip {path}: {e}") from None
    if count != 3 or dtype != "uint8":
        raise errors.DataError(f"--real={real}: chip {path} has {count} band(s) of {dtype}; the generated "
                               "images are 8-bit RGB PNGs, so the real chips must be 8-bit RGB too "
                               "(e.g. EuroSAT's RGB JPEGs)")


def check_classes(class_prompts, real_classes: Sequence[str], real: str) -> None:
    prompted = {cls for cls, _ in class_prompts}
    unknown = sorted(prompted - set(real_classes))
    if unknown:
        raise errors.ConfigError(f"--prompt classes {unknown} are not classes of --real={real} "
                                 f"(its classes: {list(real_classes)})")
    missing = [c for c in real_classes if c not in prompted]
    if missing:
        raise errors.ConfigError(f"classes {missing} of --real={real} have no --prompt=CLASS:PROMPT; the "
                                 "classifier would never see them")


def write_splits_csv(path: str, generated: dict, real_test: Sequence, classes: Sequence[str]) -> None:
    """path,label,split: the generated images as train, the real test chips as test (no val)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "label", "split"))
        for cls in classes:
            w.writerows((os.path.abspath(p), cls, "train") for p in generated.get(cls, ()))
        w.writerows((os.path.abspath(c.path), classes[c.labels[0]], "test") for c in real_test)


def default_classifier_base():
    """configs/classify.py:data=csv,encoder=resnet,mode=scratch of this checkout."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "configs", "classify.py")
    if not os.path.isfile(path):
        raise errors.ConfigError(f"{path} is not there (eojax installed without its configs/); give the "
                                 "classifier with --classifier=<configs/classify.py>:data=csv,encoder=resnet,mode=scratch")
    spec = importlib.util.spec_from_file_location("eojax_downstream_classify_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("data=csv,encoder=resnet,mode=scratch")


def classifier_config(csv_path: str, classes: Sequence[str], n_train: int, base=None, *, seed: int = 0,
                      size: int = PROTOCOL["size"], epochs: int = PROTOCOL["epochs"],
                      batch_size: int = PROTOCOL["batch_size"], lr: float = PROTOCOL["lr"]):
    """The classify config that trains on csv_path's train split and tests on its test split: `base`
    (a classify config) with its input pointed there, or, without one, the protocol's recipe."""
    if base is not None:
        config = base.copy_and_resolve_references()
        if config.task != "classify":
            raise errors.ConfigError(f"--classifier trains {config.task!r}; give a configs/classify.py config")
    else:
        config = default_classifier_base()
        steps_per_epoch = max(1, math.ceil(n_train / batch_size))
        config.update(batch_size=batch_size, total_steps=epochs * steps_per_epoch, eval_every=0,
                      checkpoint_every=epochs * steps_per_epoch, log_every=steps_per_epoch, seed=seed)
        config.model.update(encoder="resnet", encoder_variant="18", mode="scratch", encoder_init="")
        config.input.update(size=size, eval_batch_size=batch_size, normalize="data", preset="", sensor="")
        config.augment.update(flips=True, mixup=0.0, cutmix=0.0, label_smoothing=0.0, random_erase=0.0)
        config.optim.update(lr=lr, accum_steps=1, warmup_steps=steps_per_epoch, end_lr_factor=0.0, layer_decay=1.0)
    # Real chips neither train nor select the model: no val split, so no periodic eval and no kept best.
    config.update(best_metric="", eval_every=0)
    config.input.update(source="csv", csv=os.path.abspath(csv_path), root="", classes=tuple(classes))
    return config


# -- the protocol -----------------------------------------------------------------------------------
def check_output(output: str) -> None:
    """A new run's images and classifier never mix with an earlier run's."""
    for sub in (GENERATED, CLASSIFIER):
        if os.path.exists(os.path.join(output, sub)):
            raise errors.WorkdirError(f"{os.path.join(output, sub)} exists (an earlier downstream run); "
                                      "give a new --output or delete it")


def run_protocol(generator: Generator, class_prompts, real: str, *, num_samples: int, output: str,
                 seed: int = 0, classifier=None, classifier_options: dict | None = None) -> dict:
    """Generate, train, test; writes <output>/downstream.json and returns its contents.
    `classifier`: a classify config replacing the recipe; `classifier_options`: the recipe's
    size / epochs / batch_size / lr."""
    from eojax import train

    real_classes, real_test = real_test_split(real)
    check_classes(class_prompts, real_classes, real)
    check_output(output)
    os.makedirs(output, exist_ok=True)
    generated = generate(generator, class_prompts, num_samples, os.path.join(output, GENERATED), seed)
    n_train = sum(len(v) for v in generated.values())
    source = {"kind": generator.kind, "source": generator.source, **generator.settings}
    generator.images = None  # its weights can go before the classifier trains
    gc.collect()

    csv_path = os.path.join(output, SPLITS_CSV)
    write_splits_csv(csv_path, generated, real_test, real_classes)
    config = classifier_config(csv_path, real_classes, n_train, classifier, seed=seed, **(classifier_options or {}))
    workdir = os.path.join(output, CLASSIFIER)
    result = train.train_and_evaluate(config, workdir)
    test = result["test"]
    real_counts = {c: 0 for c in real_classes}
    for chip in real_test:
        real_counts[real_classes[chip.labels[0]]] += 1
    report = {
        "accuracy": test.get("top1"), "balanced_accuracy": test.get("balanced_accuracy"),
        "macro_f1": test.get("macro_f1"),
        "per_class_accuracy": {c: test.get(f"acc_{c}") for c in real_classes},
        "samples": {"generated_per_class": {c: len(generated.get(c, ())) for c in real_classes},
                    "generated_total": n_train, "real_test_per_class": real_counts,
                    "real_test_total": len(real_test), "tested": int(test.get("count", 0))},
        "prompts": [{"class": c, "prompt": p, "count": num_samples} for c, p in class_prompts],
        "generator": source, "seed": seed, "real": os.path.abspath(real),
        "classifier": {"workdir": workdir, "encoder": f"{config.model.encoder}{config.model.encoder_variant}"
                       if config.model.encoder == "resnet" else config.model.encoder,
                       "mode": config.model.mode, "size": int(config.input.size),
                       "total_steps": int(config.total_steps), "batch_size": int(config.batch_size),
                       "epochs": round(config.total_steps * config.batch_size / max(n_train, 1), 2)},
        "files": {"generated": os.path.join(output, GENERATED), "splits_csv": csv_path},
    }
    with open(os.path.join(output, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    logging.info("downstream: accuracy %.4f on %d real test chips, trained on %d generated images",
                 report["accuracy"], len(real_test), n_train)
    return report


def command(config, workdir: str | None, options: dict) -> dict:
    """`eojax downstream`: options sd_folder, real, prompt, num_samples, seed, output, classifier
    (a classify config or None), negative_prompt."""
    real, sd_folder = options.get("real") or "", options.get("sd_folder") or ""
    if not real:
        raise errors.ConfigError("eojax downstream needs --real=<folder of class folders, or CSV, of real chips>")
    class_prompts = parse_class_prompts(options.get("prompt") or [])
    if sd_folder and workdir:
        raise errors.ConfigError("eojax downstream: give --sd_folder (a Stable Diffusion folder) or --workdir "
                                 "(an eojax diffusion run), not both")
    if not sd_folder and not workdir:
        raise errors.ConfigError("eojax downstream needs a generator: --sd_folder=DIR or --workdir=<diffusion run>")
    output = options.get("output") or (os.path.join(workdir, "downstream") if workdir else "")
    if not output:
        raise errors.ConfigError("eojax downstream --sd_folder=... needs --output=DIR")
    # The real set, the prompts and the output are checked before any weight is loaded.
    real_classes, _ = real_test_split(real)
    check_classes(class_prompts, real_classes, real)
    check_output(os.path.abspath(output))
    if sd_folder:
        if config.task != "diffusion":
            raise errors.ConfigError(f"--config gives the sampler (config.sampler) and trains {config.task!r}: "
                                     "give configs/diffusion.py, e.g. configs/diffusion.py:sd15")
        negative = options.get("negative_prompt")
        if negative is None:  # the config's own default, where it has one
            negative = config.sampler.get("negative_prompt", "") or ""
        generator = sd_generator(sd_folder, config.sampler, negative)
    else:
        generator = run_generator(config, workdir)
    return run_protocol(generator, class_prompts, real, num_samples=int(options.get("num_samples") or 1),
                        output=os.path.abspath(output), seed=int(options.get("seed") or 0),
                        classifier=options.get("classifier"))
