"""Scene classification on the shared encoders: linear probe, fine-tune, from scratch.

Modes (config.model.mode):
- 'linear_probe': the encoder is frozen (optim.freeze '^encoder/', features under stop_gradient)
  and only the head trains; MAE's probe recipe puts a BatchNorm without scale or bias before it
  (model.head_norm='batch').
- 'finetune': everything trains (with layer-wise lr decay, drop path, mixup / cutmix in the SatMAE++
  recipe, configs/classify.py).
- 'scratch': like finetune, from random encoder weights (model.encoder_init refused).

Encoder weights (`model.encoder_init`): an eojax run folder (its `encoder` subtree: MAE, SatMAE++),
an .npz of encoder params, or a published checkpoint (Prithvi, DOFA, CROMA, SatMAE++, torchvision /
timm ResNet), loaded over the fresh encoder while the head stays freshly initialised.

Loss: softmax cross-entropy on label-smoothed (and mixed) one-hot targets, or, multi-label, the mean
sigmoid binary cross-entropy over classes. Eval: top-1 / top-5 / balanced accuracy / macro F1 and
per-class accuracy from a summed confusion matrix (eojax.classify.metrics); multi-label: micro /
macro F1 at 0.5 and micro / macro mAP (`eojax eval classify`, which needs every score).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eojax.classify import data as cdata
from eojax.classify import metrics
from eojax.classify.model import HEAD_NORMS, POOLS, Classifier
from eojax.data import device, fmow, mixing
from eojax.models import encoders
from eojax.tasks.base import DataSpec, SplitInput, Task, apply_model, elements, stats_from_info, stats_info
from eojax.weights import common as weights_common

MODES = ("linear_probe", "finetune", "scratch")


class ClassifyInput(SplitInput):
    """Labelled chips per split (eojax.classify.data)."""

    @functools.cached_property
    def _opened(self):
        return cdata.open_splits(self.config.input)

    @property
    def sets(self) -> dict:
        return self._opened[1]

    @functools.cached_property
    def stats(self):
        c = self.config.input
        names = self.sets["train"].band_names
        if c.mean or c.std:
            if len(c.mean) != len(names) or len(c.std) != len(names):
                raise ValueError(f"input.mean / input.std have {len(c.mean)} / {len(c.std)} values for "
                                 f"{len(names)} bands {names}")
            return stats_from_info({"mean": list(c.mean), "std": list(c.std), "band_names": names})
        if c.normalize == "none":
            return None
        if c.normalize == "satmae":
            return fmow.satmae_stats(names)
        if c.normalize != "data":
            raise ValueError(f"input.normalize={c.normalize!r}: one of 'data', 'satmae', 'none'")
        return self.sets["train"].band_stats()

    def build_spec(self) -> DataSpec:
        c, train = self.config.input, self.sets["train"]
        classes = self._opened[0]
        s, k = int(c.size), len(classes)
        target = dict(labels=((k,), np.float32)) if train.multi_label else dict(label=((), np.int32))
        arrays = elements(pixels=((len(train.band_names), s, s), np.float32), valid=((s, s), bool),
                          weight=((), np.float32), **target)
        sensor = c.sensor or cdata.PRESETS.get(c.preset, {}).get("sensor", "")
        return DataSpec(arrays, {"band_names": list(train.band_names), "sensor": sensor,
                                 "class_names": list(classes), "multi_label": bool(train.multi_label),
                                 "normalize": c.normalize, **stats_info(self.stats)})

    def _input(self, split, process_index, process_count, endless=None):
        if split not in self.sets:
            return None
        c = self.config
        endless = split == "train" if endless is None else endless
        batch = c.batch_size if endless else c.input.eval_batch_size
        if batch % process_count:
            raise ValueError(f"batch size {batch} ({split}) does not divide over {process_count} processes")
        return cdata.make_input(self.sets[split], endless=endless, batch_size=batch // process_count,
                                process_index=process_index, process_count=process_count, seed=c.seed,
                                worker_count=c.input.worker_count)

    def one_pass(self, split, process_index, process_count):
        """One ordered pass over a split (train included: k-NN's memory), the last batch padded."""
        return self._input(split, process_index, process_count, endless=False)


class ClassifyTask(Task):
    name = "classify"
    input_class = ClassifyInput
    plugins = {"eval": "eojax.classify.evaluate:evaluate"}

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.class_names = list(spec.info["class_names"])
        self.multi_label = bool(spec.info["multi_label"])
        self.stats = stats_from_info(spec.info)
        self.size = int(spec.elements["pixels"][0][-1])

    @classmethod
    def check_config(cls, config):
        m, a = config.model, config.augment
        if m.mode not in MODES:
            raise ValueError(f"config.model.mode={m.mode!r} is unknown; one of {MODES}")
        if m.pool not in POOLS:
            raise ValueError(f"config.model.pool={m.pool!r} is unknown; one of {POOLS}")
        if m.head_norm not in HEAD_NORMS:
            raise ValueError(f"config.model.head_norm={m.head_norm!r} is unknown; one of {HEAD_NORMS}")
        if m.mode == "linear_probe" and "^encoder/" not in tuple(config.optim.freeze):
            raise ValueError("model.mode='linear_probe' needs config.optim.freeze to contain '^encoder/' "
                             "(configs/classify.py sets it)")
        if m.mode == "scratch" and m.encoder_init:
            raise ValueError(f"model.mode='scratch' trains from random weights; remove "
                             f"config.model.encoder_init={m.encoder_init!r}")
        if not 0.0 <= a.label_smoothing < 1.0:
            raise ValueError(f"config.augment.label_smoothing={a.label_smoothing} must be in [0, 1)")

    # -- model ---------------------------------------------------------------------------------------
    @functools.cached_property
    def model(self) -> Classifier:
        m = self.config.model
        encoder = encoders.build_for_data(m, self.spec.info["band_names"], self.spec.info.get("sensor") or None,
                                          self.size)
        return Classifier(encoder, len(self.class_names), pool=m.pool, head_norm=m.head_norm,
                          freeze_encoder=m.mode == "linear_probe", head_init_std=m.head_init_std,
                          dtype=jnp.dtype(m.dtype))

    def images(self, batch):
        mode = "satmae_minmax" if self.spec.info.get("normalize") == "satmae" else "standard"
        return device.to_model_input(batch["pixels"], batch["valid"], self.stats,
                                     dtype=jnp.dtype(self.config.model.dtype), mode=mode)

    def init(self, rng, batch):
        return self.model.init({"params": rng, "dropout": rng}, self.images(batch), train=False)

    def logits(self, params, state, images, rng=None, train=False):
        rng = jax.random.key(0) if rng is None else rng
        return apply_model(self.model, params, state, images, train=train, rngs={"dropout": rng})

    def pretrained_parts(self) -> dict[str, str]:
        """{'encoder': model.encoder_init}; a fine-tuned classifier file also gives its fc_norm (the
        reference's main_finetune loads everything but a head of another class count)."""
        init = self.config.model.encoder_init
        if not init:
            return {}
        if self.model.head_norm == "layer" and _is_classifier_file(init):
            return {"encoder": init, "fc_norm": init}
        return {"encoder": init}

    def _load_encoder(self, source, init_encoder, init_model_state):
        """(encoder params, model state with the encoder's own, e.g. a ResNet's running statistics)
        from a run folder, an .npz or a published file; the head stays as initialised."""
        params, encoder_state = weights_common.load_encoder_weights(source, init_encoder, self.model.encoder)
        return params, weights_common.place_encoder_state(source, encoder_state, init_model_state)

    def load_pretrained_part_variables(self, subtree, source, init_params, init_model_state):
        if _is_classifier_file(source):  # a fine-tuned SatMAE++ classifier: its encoder (and fc_norm)
            from eojax.classify import weights as classify_weights

            if subtree == "fc_norm":
                return classify_weights.load_fc_norm(source, init_params), init_model_state
            return classify_weights.load_classifier_encoder(source, init_params, self.model), init_model_state
        return self._load_encoder(source, init_params, init_model_state)

    def load_pretrained(self, path, init_params):
        return self.load_pretrained_variables(path, init_params, {})[0]

    def load_pretrained_variables(self, path, init_params, init_model_state):
        """`config.init_from=<published file>`: a fine-tuned SatMAE++ classifier (the file has
        `head.weight`) loads whole (eojax.classify.weights.load_classifier: encoder, fc_norm, head);
        any other file loads the encoder only, with its statistics when it has them (as
        model.encoder_init), and the head stays as initialised."""
        from eojax import weights  # imported here: only a published init_from needs them
        from eojax.classify import weights as classify_weights

        if self.config.model.mode == "scratch":
            raise ValueError(f"model.mode='scratch' trains from random weights; remove config.init_from={path!r}")
        if classify_weights.is_classifier_checkpoint(path):
            return classify_weights.load_classifier(path, init_params, self.model)[0], init_model_state
        encoder, state = self._load_encoder(path, weights.jax_abstract(init_params["encoder"]), init_model_state)
        return {**init_params, "encoder": encoder}, state

    # -- loss ----------------------------------------------------------------------------------------
    def _augment(self, images, batch, rng):
        """Training's device-side augmentation: one of the 8 flips / quarter turns per image (square
        chips; flips only otherwise: overhead imagery has no upright), mixup / cutmix, random erasing
        -> (images, targets (B, K))."""
        a, k = self.config.augment, len(self.class_names)
        r_flip, r_mix, r_erase = jax.random.split(rng, 3)
        if a.flips:
            draw = jax.random.bernoulli(r_flip, 0.5, (3, images.shape[0]))[..., None, None, None]
            images = jnp.where(draw[0], images[:, :, ::-1], images)
            images = jnp.where(draw[1], images[:, ::-1], images)
            if images.shape[1] == images.shape[2]:
                images = jnp.where(draw[2], jnp.swapaxes(images, 1, 2), images)
        targets = batch["labels"] if self.multi_label else jax.nn.one_hot(batch["label"], k)
        if (a.mixup > 0 or a.cutmix > 0) and a.mix_prob > 0:
            images, targets, _ = mixing.mix(r_mix, images, targets, a.mixup, a.cutmix, prob=a.mix_prob,
                                            switch_prob=a.switch_prob, label_smoothing=a.label_smoothing)
        elif not self.multi_label:
            targets = mixing.smooth_labels(targets, a.label_smoothing)
        if a.random_erase > 0:
            images, _ = mixing.random_erase(r_erase, images, prob=a.random_erase)
        return images, targets

    def _loss(self, logits, targets, weight):
        if self.multi_label:
            per = optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)
        else:
            per = optax.softmax_cross_entropy(logits, targets)
        return jnp.sum(per * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    def loss_fn(self, params, state, batch, rng, train):
        images = self.images(batch)
        aug_rng, drop_rng = jax.random.split(rng)
        if train:
            images, targets = self._augment(images, batch, aug_rng)
        else:
            targets = batch["labels"] if self.multi_label else jax.nn.one_hot(batch["label"], len(self.class_names))
        logits, state = self.logits(params, state, images, drop_rng, train)
        return self._loss(logits, targets, batch["weight"]), {}, state

    def sampled_loss_fn(self, params, state, batch, rng):
        """Sophia-G: labels drawn from the model's own softmax (or Bernoulli per class)."""
        draw, drop = jax.random.split(rng)
        logits, _ = self.logits(params, state, self.images(batch), drop, True)
        if self.multi_label:
            labels = jax.random.bernoulli(draw, jax.nn.sigmoid(jax.lax.stop_gradient(logits))).astype(jnp.float32)
        else:
            labels = jax.nn.one_hot(jax.random.categorical(draw, jax.lax.stop_gradient(logits)), logits.shape[-1])
        w = batch["weight"]
        return self._loss(logits, labels, w), jnp.sum(w)

    # -- evaluation ------------------------------------------------------------------------------------
    def eval_fn(self, params, state, batch, rng):
        logits, _ = self.logits(params, state, self.images(batch))
        w = batch["weight"]
        if self.multi_label:
            loss = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(-1) * w)
            return dict(metrics.multilabel_sums(logits, batch["labels"], w), loss_sum=loss)
        loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(w > 0, batch["label"], 0)) * w)
        return dict(metrics.single_label_sums(logits, batch["label"], w), loss_sum=loss)

    def finalize_eval(self, sums):
        loss = float(sums["loss_sum"]) / max(float(sums["count"]), 1.0)
        if self.multi_label:
            return dict(metrics.finalize_multilabel(sums, self.class_names), loss=loss)
        return dict(metrics.finalize_single_label(sums, self.class_names), loss=loss)

    def features(self, params, state, batch):
        """(B, D) pooled encoder features (what k-NN and the probe see)."""
        return self.model.apply({"params": params, **state}, self.images(batch), method="features")


def _is_classifier_file(source) -> bool:
    """Whether `source` is a published classifier file (a head.weight), not a run folder or an encoder."""
    from eojax.classify import weights as classify_weights

    return os.path.isfile(source) and not source.endswith(".npz") and classify_weights.is_classifier_checkpoint(source)
