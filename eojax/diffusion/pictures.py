"""The diffusion family's plug-ins: the class-prompt sample grid written after training ('pictures')
and `eojax infer diffusion --prompt=...` ('infer'). Both sample through the core (DiffusionTask.sample)
and take their default prompts from the DataSpec, so they need no caption file."""
from __future__ import annotations

import os
import re

import jax
import numpy as np

from eojax import viz
from eojax.data.cog import write_cog


def class_prompts(task, max_classes: int) -> list[tuple[str, str]]:
    """(class, caption) for the most frequent classes of the training set (DiffusionInput.class_prompts,
    kept in the DataSpec)."""
    return [(cls, cap) for cls, cap in task.spec.info["prompts"][:max_classes]]


def write_pictures(run, variables, batch, workdir, step) -> list[str]:
    """A grid of samples: one row per caption class, labelled with the class (the row captions go to
    a .txt beside it), the sampler in the caption. At every eval too: max_classes x samples_per_class
    samples, each as costly as one of FD's."""
    task, (params, _) = run.task, variables
    p = run.config.pictures
    prompts = class_prompts(task, p.max_classes)
    images = task.sample(params, [cap for _, cap in prompts for _ in range(p.samples_per_class)],
                         seed=run.config.seed)
    if jax.process_index() != 0:
        return []
    path = os.path.join(workdir, f"diffusion_samples_step{step}.png")
    viz.save_figure(samples_figure(task.to_rgb8(images), prompts, p.samples_per_class, run.config, step), path)
    with open(path[:-4] + ".txt", "w") as f:
        f.writelines(f"row {i}: [{cls}] {cap}\n" for i, (cls, cap) in enumerate(prompts))
    return [path]


def samples_figure(tiles, prompts, k: int, config, step):
    """Rows of k samples, one row per (class, caption) of `prompts`."""
    s = config.sampler
    rows = [list(tiles[i * k:(i + 1) * k]) for i in range(len(prompts))]
    sampler = {"sampler": s.name or "the folder's", "steps": s.num_steps, "guidance": s.guidance_scale,
               "seed": config.seed}
    return viz.grid_figure(rows, columns=[f"sample {j + 1}" for j in range(k)],
                           row_labels=[_short(cls) for cls, _ in prompts],
                           title="diffusion samples of the most frequent caption classes",
                           caption=viz.caption(step, sampler, "captions: the .txt beside this picture"))


def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def infer(run, variables, workdir, options) -> dict:
    """`eojax infer diffusion --prompt=... [--negative_prompt=...]`: num_samples PNGs per prompt (and
    float32 GeoTIFFs in data units when infer.geotiff or the data has other than 3 bands). Without
    --prompt: the first caption of each of the 3 most frequent training classes (an SD run: their
    captions joined). Prompts get sampler.prompt_suffix; the negative prompt defaults to
    sampler.negative_prompt."""
    task, config, (params, _) = run.task, run.config, variables
    prompts = list(options.get("prompt") or [cap for _, cap in class_prompts(task, 3)])
    n, out_dir = int(options.get("num_samples") or 1), options["output"]
    negative = options.get("negative_prompt")
    negative = config.sampler.get("negative_prompt", "") if negative is None else negative
    unknown = sorted({w for pr in prompts + [negative] for w in task.tokenizer.unknown_words(pr)})
    images = task.sample(params, [pr for pr in prompts for _ in range(n)], seed=int(options.get("seed", 0)),
                         negative_prompt=negative)
    multiband = config.infer.geotiff or task.channels != 3
    files = []
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        tiles = task.to_rgb8(images)
        for i, pr in enumerate(prompts):
            slug = re.sub(r"[^a-z0-9]+", "_", pr.lower()).strip("_")[:60] or "empty"
            for j in range(n):
                base = os.path.join(out_dir, f"{i:02d}_{slug}_{j}")
                viz.save_png(base + ".png", tiles[i * n + j])  # the sample itself, at its own size
                files.append(base + ".png")
                if multiband:
                    files.append(_write_geotiff(base + ".tif", images[i * n + j], task.band_names,
                                                config.input.max_value, pr))
    return {"prompts": prompts, "negative_prompt": negative, "num_samples": n, "files": files,
            "unknown_words": unknown}


def _write_geotiff(path, image, band_names, max_value, prompt) -> str:
    data = ((image + 1) / 2 * (max_value or (255.0 if len(band_names) == 3 else 5000.0))).astype(np.float32)
    # A generated image has no place on Earth: a COG without CRS or transform.
    return write_cog(path, np.ascontiguousarray(data.transpose(2, 0, 1)), descriptions=tuple(band_names),
                     tags=dict(prompt=prompt, source="eojax diffusion sample"))
