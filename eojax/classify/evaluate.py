"""`eojax eval classify` and `eojax knn`: scores that need every prediction at once.

- the test split (val without one) through the model: metrics.json with the trainer's metrics,
  multi-label micro / macro mAP (from every score), and the confusion-matrix PNG;
- k-NN of the frozen encoder's pooled features (DINO's weighted vote: cosine, k 20, T 0.07):
  train split as the memory, test (or val) split scored. `eojax knn` runs only this part, on a
  trained run or on any encoder (`config.model.encoder_init`) without training.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from eojax import viz
from eojax.classify import knn, metrics


def _collect(run, variables, split: str, fn):
    """fn(params, state, batch) jitted over the split's batches -> (outputs, batches' targets and
    weights) concatenated, padding rows dropped."""
    data = run.input.one_pass(split, jax.process_index(), jax.process_count())
    if data is None:
        return None
    step = jax.jit(fn)
    outs, targets, weights = [], [], []
    key = "labels" if run.task.multi_label else "label"
    for local in data:
        batch = run.global_batch(local)
        outs.append(np.asarray(jax.device_get(step(*variables, batch))))
        targets.append(np.asarray(local[key]))
        weights.append(np.asarray(local["weight"]))
    keep = np.concatenate(weights) > 0
    return np.concatenate(outs)[keep], np.concatenate(targets)[keep]


def knn_scores(run, variables, k: int = 20, temperature: float = 0.07) -> dict:
    """k-NN top-1 / top-5 of the encoder's pooled features: train split as memory, test (else val)
    scored."""
    task = run.task
    if task.multi_label:
        return {}
    features = lambda p, s, b: task.features(p, s, b)  # noqa: E731
    memory = _collect(run, variables, "train", features)
    split = "test" if "test" in run.input.sets else "val"
    query = _collect(run, variables, split, features) if split in run.input.sets else None
    if query is None:
        return {}
    result = knn.knn_classify(memory[0], memory[1], query[0], query[1], k=min(k, len(memory[1])),
                              temperature=temperature, num_classes=len(task.class_names))
    return {"knn_top1": result.top1, "knn_top5": result.top5, "knn_k": min(k, len(memory[1])),
            "knn_split": split, "knn_memory": int(len(memory[1]))}


def evaluate(run, variables, workdir: str, options: dict) -> dict:
    """The eval plug-in: test-split metrics, mAP (multi-label), confusion PNG, k-NN."""
    task = run.task
    out_dir = options["output"]
    os.makedirs(out_dir, exist_ok=True)
    split = "test" if "test" in run.input.sets else "val"
    logits, targets = _collect(run, variables, split, lambda p, s, b: task.logits(p, s, task.images(b))[0])
    result = {"split": split, "count": int(len(targets))}
    if task.multi_label:
        ap = metrics.average_precision(logits, targets)
        result.update(micro_map=ap["micro"], macro_map=ap["macro"],
                      **{f"ap_{n}": float(a) for n, a in zip(task.class_names, ap["per_class"])})
    else:
        sums = jax.device_get(metrics.single_label_sums(logits, targets, np.ones(len(targets), np.float32)))
        result.update(metrics.finalize_single_label(sums, task.class_names))
        result["confusion_png"] = metrics.confusion_png(
            sums["confusion"], task.class_names, os.path.join(out_dir, f"confusion_{split}.png"),
            title=f"confusion on the {split} split (rows: true class, normalised)",
            caption=viz.caption(None, {k: result[k] for k in ("top1", "balanced_accuracy", "macro_f1", "count")}))
        result.update(knn_scores(run, variables))
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def knn_command(config, workdir: str) -> dict:
    """`eojax knn`: k-NN of the encoder of `workdir`'s latest checkpoint (a classify run), or, in a
    workdir without one, of the encoder `config.model.encoder_init` names (any run or weights file
    the classify family loads), untrained. Writes <workdir>/knn.json."""
    from eojax import checkpoint as ckpt_lib, errors, parallel, tasks, train

    if config.task != "classify":
        raise errors.ConfigError(f"eojax knn scores classification splits: config.task is {config.task!r}, "
                                 "use a configs/classify.py config")
    if ckpt_lib.is_eojax_checkpoint(workdir):
        run, variables = train.load_for_inference(config, workdir)
    else:
        if not config.model.encoder_init:
            raise errors.ConfigError(f"{workdir} holds no checkpoint: give the encoder with "
                                     "--config.model.encoder_init=<run folder or weights file>")
        parallel.maybe_initialize_distributed(**config.distributed)
        run = train.setup(config)
        state = run.init_state()
        variables = tasks.load_pretrained_parts(run.task, state.params, state.model_state)
    with run.scope():
        result = knn_scores(run, variables)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "knn.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result
