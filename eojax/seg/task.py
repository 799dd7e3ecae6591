"""Semantic segmentation on frozen / fine-tuned / random encoders (PANGAEA protocol), and probe sweeps.

Modes (config.model.mode, eojax.seg.modes): 'frozen' (encoder params frozen by the optimizer's
freeze mask '^encoder/', features under stop_gradient), 'finetune' (everything trains;
config.optim.lr_scales can give the encoder a lower lr), 'random' (like finetune, never loads
pretrained weights), 'retrain_input' (the PANGAEA fork's: the freeze mask leaves only the encoder's
input layer, its patch embedding, and the decoder to train; gradients flow through the encoder).
Pretrained encoder weights come from `config.init_from=<file>` (`load_pretrained_variables`,
delegating to the encoder's converter, weights.common.load_encoder) or from an eojax MAE / SatMAE++ run
folder. A CNN encoder (ResNet) keeps BatchNorm running statistics: they are model state under
'batch_stats/encoder' beside the decoder's, loaded from a torchvision checkpoint with its weights, and
left unchanged in frozen mode (the encoder normalises with them in eval mode).

Encoder 'unet' with decoder 'unet' is PANGAEA's supervised UNet baseline: the whole encoder-decoder
trains from scratch (modes 'random' / 'finetune'; 'frozen' and 'retrain_input' are refused, as
PANGAEA asserts `finetune` for it).

SegInput reads the image / mask pairs and states them as a DataSpec (band names, classes, the
normalisation's statistics); SegTask, the model and its loss, is built from the config and that spec
alone, so `eojax infer` (eojax/seg/infer.py) runs without the training data. Pictures:
eojax/seg/pictures.py.

Preprocessing (config.input.preprocessing, eojax.seg.modes): 'seg_default' trains on random crops of
the encoder's size and evaluates (and tests) with windows of that size slid over whole scenes,
overlapping logits averaged (seg_eval.sliding_window_logits); 'seg_resize_input_layer' builds the
encoder at the scene size and trains and evaluates on whole scenes; 'seg_resize' resizes whole scenes
to the encoder's size and the logits back to the scene's. eval_fn returns a (C, C) confusion matrix
that the trainer sums over all batches; finalize_eval derives the metrics.

Sweep (config.sweep.k = K > 0, frozen mode): K decoders ("probes", e.g. linear probes) on the same
frozen features, trained by the one trainer in one compiled step: the encoder runs once per batch,
the probes run under jax.vmap over their stacked parameters, and the loss is the sum of the K probe
losses (probes share no parameters, so each gets exactly its own gradient). Probe k starts from its
own seed (sweep.probe_seed + k) and, with sweep.lr_factors, has its learning rate scaled by
optim.lr_scales on '^probes/probe_k/'. Eval reports mean and spread of the K mIoUs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from eojax import checkpoint as ckpt_lib
from eojax import optim, weights
from eojax.data import device, sensors
from eojax.models import encoders
from eojax.seg import data as segdata
from eojax.seg import decoders as seg_models
from eojax.seg import evaluation as seg_eval
from eojax.seg import modes as seg_modes
from eojax.tasks.base import DataSpec, SplitInput, Task, apply_model, elements, stats_from_info, stats_info
from eojax.weights import common as weights_common

MODES = seg_modes.MODES


class SegInput(SplitInput):
    """Image / mask pairs per split: random crops for training, whole scenes for val and test."""

    @functools.cached_property
    def pair_sets(self) -> dict:
        """The splits' image / mask pairs, opened and checked (headers only)."""
        c, m = self.config.input, self.config.model
        return {split: segdata.PairSet(pairs, c.bands, c.nodata, num_classes=m.num_classes,
                                       ignore_index=m.ignore_index, mask_values=c.mask_values)
                for split, pairs in segdata.splits_from_config(c).items()}

    @functools.cached_property
    def sensor(self) -> str:
        """The bands' sensor: input.sensor, or found from the files ('' when unknown)."""
        return segdata.sensor(self.config.input, self.pair_sets)

    @functools.cached_property
    def stats(self):
        """The normalisation's BandStats, or None (input.normalize='none')."""
        return segdata.band_stats(self.config.input, self.pair_sets["train"])

    def build_spec(self) -> DataSpec:
        """Training elements (random crops of the encoder's size, or whole scenes under the resize
        preprocessings): raw band-first pixels, validity, class labels."""
        train, c, m = self.pair_sets["train"], self.config.input, self.config.model
        h, w = segdata.scene_size(train, seg_modes.preprocessing(c), c.crop)
        arrays = elements(pixels=((len(train.band_names), h, w), train.scenes[0].dtype), valid=((h, w), bool),
                          label=((h, w), np.int32), weight=((), np.float32))
        return DataSpec(arrays, {"band_names": list(train.band_names), "sensor": self.sensor,
                                 "num_classes": int(m.num_classes),
                                 "class_names": list(m.class_names), **stats_info(self.stats)})

    def _input(self, split, process_index, process_count):
        sets = self.pair_sets
        if split not in sets:
            return None
        c = self.config
        batch = c.batch_size if split == "train" else c.input.eval_batch_size
        if batch % process_count:
            raise ValueError(f"batch size {batch} ({split}) does not divide over {process_count} processes")
        window = self.spec().elements["pixels"][0][-1]  # the training element's size
        return segdata.make_input(c.input, sets[split], split=split, batch_size=batch // process_count,
                                  process_index=process_index, process_count=process_count, seed=c.seed,
                                  window=window)

    def fingerprint(self):
        return segdata.fingerprint(self.pair_sets)


class SegTask(Task):
    name = "seg"
    input_class = SegInput
    plugins = {"pictures": "eojax.seg.pictures:write_pictures", "infer": "eojax.seg.infer:predict_geotiff"}

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.k = int(config.sweep.k)
        self.band_names = list(spec.info["band_names"])
        # The bands' sensor for the encoders' band matching; a spec written before the sensor
        # registry meant Sentinel-2 names, '' = unknown (names must then be unambiguous).
        self.sensor = spec.info.get("sensor", sensors.LEGACY_SENSOR) or None
        self.stats = stats_from_info(spec.info)  # None with input.normalize='none'
        self.preprocessing = seg_modes.preprocessing(config.input)
        # The training element's (H, W): the crop, or the scene under the resize preprocessings; the
        # size of evaluation's (and inference's) windows.
        self.window = tuple(spec.elements["pixels"][0][-2:])
        # The encoder's input size: the crop, or the scene ('seg_resize_input_layer').
        self.input_size = (self.window[0] if self.preprocessing == "seg_resize_input_layer"
                           else int(config.input.crop))

    @classmethod
    def check_config(cls, config):
        m, k = config.model, int(config.sweep.k)
        if m.mode not in MODES:
            raise ValueError(f"config.model.mode={m.mode!r} is unknown; one of {MODES}")
        if k and m.mode != "frozen":
            raise ValueError("config.sweep.k > 0 trains probes on frozen features: set model.mode='frozen'")
        if k and config.optim.clip_norm > 0:
            raise ValueError("config.sweep.k > 0 needs optim.clip_norm=0: a global-norm clip would couple "
                             "the probes (each must train exactly as it would alone)")
        if m.mode == "frozen" and "^encoder/" not in tuple(config.optim.freeze):
            raise ValueError("model.mode='frozen' needs config.optim.freeze to contain '^encoder/' "
                             "(configs/seg.py sets it)")
        if m.encoder in seg_modes.SCRATCH_ONLY and m.mode not in ("random", "finetune"):
            raise ValueError(f"model.encoder={m.encoder!r} is PANGAEA's supervised baseline, trained from scratch "
                             f"with its decoder: use model.mode='random' (or 'finetune'), not {m.mode!r}")
        if m.mode == "retrain_input":
            want = seg_modes.retrain_input_freeze(m.encoder)
            if tuple(config.optim.freeze) != (want,):
                raise ValueError(f"model.mode='retrain_input' trains only the encoder's input layer: "
                                 f"config.optim.freeze must be ({want!r},) (configs/seg.py sets it), "
                                 f"got {tuple(config.optim.freeze)}")
        pre = seg_modes.preprocessing(config.input)
        if pre not in seg_modes.PREPROCESSINGS:
            raise ValueError(f"config.input.preprocessing={pre!r} is unknown; one of {seg_modes.PREPROCESSINGS}")

    # -- model -------------------------------------------------------------------------------------
    def _encoder(self):
        return encoders.build_for_data(self.config.model, self.band_names, self.sensor, self.input_size)

    @property
    def decoder(self) -> nn.Module:
        return self.model.decoder

    @functools.cached_property
    def model(self) -> seg_models.SegmentationModel:
        m = self.config.model
        decoder = seg_models.build_decoder(m.decoder, m.num_classes, dtype=jnp.dtype(m.dtype),
                                           # a config saved before model.norm existed: its LayerNorm
                                           norm=m.get("norm", "layer"), **dict(m.decoder_args))
        return seg_models.SegmentationModel(self._encoder(), decoder, freeze_encoder=m.mode == "frozen")

    def images(self, batch):
        return device.to_model_input(batch["pixels"], batch["valid"], self.stats,
                                     dtype=jnp.dtype(self.config.model.dtype))

    def _probe_ids(self) -> list[int]:
        base = int(self.config.sweep.probe_seed)
        return [base + k for k in range(self.k)] if self.k else [base]

    def init(self, rng, batch):
        """Variables {'params': {encoder, decoder}, 'batch_stats': {encoder, decoder}} (the encoder's
        part only for a CNN encoder, the decoder's for BatchNorm decoders); in a sweep the decoders sit
        under 'probes/probe_k' in every collection."""
        images = self.images(batch)
        full = self.model.init({"params": rng, "dropout": rng}, images, train=False)
        # The encoder's own collections (a ResNet's BatchNorm statistics) are model state too.
        variables = {col: {"encoder": tree["encoder"]} for col, tree in full.items() if "encoder" in tree}
        feats = self.model.apply(variables, images, method="features")
        # Each decoder from its own seed, so sweep probe k starts exactly as a single run with probe_seed k.
        decoders = [self.decoder.init(jax.random.fold_in(rng, 1_000_003 + i), feats) for i in self._probe_ids()]
        for col in decoders[0]:
            trees = [d[col] for d in decoders]
            variables.setdefault(col, {}).update(
                {"probes": {f"probe_{k}": t for k, t in enumerate(trees)}} if self.k else {"decoder": trees[0]})
        return variables

    def logits(self, params, state, images, rng=None, train=False):
        """(B, H, W, C) -> (logits (B, H, W, K) float32, new model state); in a sweep (P, B, H, W, K).
        'seg_resize': the images are resized to the encoder's input size and the logits come back at
        (H, W)."""
        rng = jax.random.key(0) if rng is None else rng
        size = images.shape[-3:-1]
        if self.preprocessing == "seg_resize":
            images = resize_to_encoder(images, self.input_size)
        if not self.k:  # the dropout rng of probe `probe_seed`, as in a sweep
            return apply_model(self.model, params, state, images, train=train, size=size,
                               rngs={"dropout": jax.random.fold_in(rng, self._probe_ids()[0])})
        # A sweep is frozen: the encoder runs in eval mode and reads (never moves) its statistics.
        encoder_state = {c: {"encoder": t["encoder"]} for c, t in state.items() if "encoder" in t}
        feats = self.model.apply({"params": {"encoder": params["encoder"]}, **encoder_state}, images, train,
                                 method="features")
        probes = [f"probe_{k}" for k in range(self.k)]
        stack = lambda tree: jax.tree.map(lambda *x: jnp.stack(x), *[tree["probes"][p] for p in probes])  # noqa: E731
        rngs = jnp.stack([jax.random.fold_in(rng, i) for i in self._probe_ids()])

        def decode(p, s, r):
            return apply_model(self.model, {"decoder": p}, {c: {"decoder": t} for c, t in s.items()}, feats, size,
                               train=train, method="decode", rngs={"dropout": r})

        probe_state = {c: stack(t) for c, t in state.items() if "probes" in t}
        out, new = jax.vmap(decode)(stack(params), probe_state, rngs)
        new_state = {c: dict(t) for c, t in state.items()}
        for c, t in new.items():
            new_state[c]["probes"] = {p: jax.tree.map(lambda x: x[k], t["decoder"]) for k, p in enumerate(probes)}
        return out, new_state

    # -- loss and evaluation -----------------------------------------------------------------------
    def _keep(self, batch):
        m = self.config.model
        return (batch["label"] != m.ignore_index) & (batch["weight"] > 0)[:, None, None]

    def _ce(self, logits, batch):
        """Summed cross-entropy over kept pixels (no softmax before it: it takes logits)."""
        keep = jnp.broadcast_to(self._keep(batch), logits.shape[:-1])  # (P,) B, H, W
        labels = jnp.where(keep, batch["label"], 0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(jnp.where(keep, ce, 0.0), axis=(-3, -2, -1)), jnp.sum(keep)

    def loss_fn(self, params, state, batch, rng, train):
        logits, state = self.logits(params, state, self.images(batch), rng, train)
        total, n = self._ce(logits, batch)
        per = total / jnp.maximum(n, 1)  # mean over non-ignored pixels (per probe in a sweep)
        if not self.k:
            return per, {"pixels": n.astype(jnp.float32)}, state
        return jnp.sum(per), {"probe_loss_mean": jnp.mean(per), "probe_loss_min": jnp.min(per)}, state

    def predict_scenes(self, params, state, images):
        """Logits over whole scenes: (B, H, W, K) (sweep: (P, B, H, W, K)). Sliding windows of the
        training element's size (one window when the scenes are that size, as under
        'seg_resize_input_layer'); 'seg_resize' resizes each scene whole."""
        c, m = self.config.input, self.config.model
        predict = lambda x: self.logits(params, state, x)[0]  # noqa: E731
        if self.preprocessing == "seg_resize":
            return predict(images)
        window = self.window[0]
        stride = c.eval_stride or window
        if not self.k:
            return seg_eval.sliding_window_logits(predict, images, window, stride)
        ncls = m.num_classes

        def stacked(x):  # probes side by side on the class axis, so windows are averaged once
            y = predict(x)  # (P, N, w, w, K)
            return jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], self.k * ncls)

        out = seg_eval.sliding_window_logits(stacked, images, window, stride)
        return jnp.moveaxis(out.reshape(*out.shape[:-1], self.k, ncls), -2, 0)

    def eval_fn(self, params, state, batch, rng):
        m = self.config.model
        logits = self.predict_scenes(params, state, self.images(batch))
        total, n = self._ce(logits, batch)
        pred = jnp.argmax(logits, axis=-1)
        cm = lambda p: seg_eval.confusion_matrix(batch["label"], p, m.num_classes, m.ignore_index,
                                                 batch["weight"])
        confusion = cm(pred) if not self.k else jax.vmap(cm)(pred)
        return {"confusion": confusion, "loss_sum": jnp.sum(total), "count": n.astype(jnp.float32)}

    def finalize_eval(self, sums):
        names = self.config.model.class_names or None
        loss = float(sums["loss_sum"]) / max(float(sums["count"]), 1.0) / max(self.k, 1)
        if not self.k:
            return dict(seg_eval.metrics_from_confusion(sums["confusion"], names), loss=loss)
        per = [seg_eval.metrics_from_confusion(c, names) for c in sums["confusion"]]
        out = {"loss": loss}
        for key in ("miou", "mf1", "accuracy"):
            mean, std = seg_eval.mean_std([p[key] for p in per])
            out[key], out[f"{key}_std"] = mean, std
        out.update({f"miou_probe_{k}": p["miou"] for k, p in enumerate(per)})
        return out

    # -- pretrained weights --------------------------------------------------------------------------
    def _load_encoder(self, path, init_params):
        """(encoder params, the encoder's model state from the file: {'batch_stats': ...} for a
        torchvision ResNet, else {})."""
        m = self.config.model
        if m.mode == "random":
            raise ValueError(f"model.mode='random' trains from random weights; remove config.init_from={path!r}")
        if m.encoder in seg_modes.SCRATCH_ONLY:
            raise ValueError(f"model.encoder={m.encoder!r} has no published checkpoint (PANGAEA trains it from "
                             f"scratch); config.init_from={path!r} can only be an eojax run folder for it")
        abstract = weights.jax_abstract(init_params["encoder"])
        if m.encoder == "mae" and str(path).endswith(".npz"):  # an eojax MAE's exported encoder
            return weights_common.load_npz_tree(path, abstract), {}
        encoder, report = weights_common.load_encoder(path, abstract, self.model.encoder)
        stats = report.get("batch_stats")  # eojax.weights.resnet reports the running statistics here
        return encoder, ({} if stats is None else {"batch_stats": stats})

    def load_pretrained(self, path, init_params):
        """Encoder weights from a checkpoint file, the decoder freshly initialised (params only; the
        trainer calls load_pretrained_variables, which keeps a ResNet's statistics too).

        Prithvi / DOFA / CROMA / SatMAE++ / ResNet: the published PyTorch layouts through eojax.weights
        (band matching, position-embedding resampling and shape checks happen there). eojax MAE: an
        .npz of the encoder subtree of an eojax run ('/'-joined keys; `export_encoder` writes it), or
        SatMAE++'s fMoW-RGB files (eojax.mae.weights.load_plain_encoder)."""
        encoder, _ = self._load_encoder(path, init_params)
        return {**init_params, "encoder": encoder}  # the decoder as the trainer initialised it

    def load_pretrained_variables(self, path, init_params, init_model_state):
        """(params, model_state): load_pretrained's params, and the file's encoder statistics (a
        torchvision ResNet's running mean / var) in place of the initial ones under
        '<collection>/encoder'; the decoder's state stays as initialised."""
        encoder, encoder_state = self._load_encoder(path, init_params)
        return ({**init_params, "encoder": encoder},
                weights_common.place_encoder_state(path, encoder_state, init_model_state))


def resize_to_encoder(images, size: int):
    """(B, H, W, C) -> (B, size, size, C), computed in float32: PANGAEA's ResizeToEncoder
    (torchvision's resize: bilinear, half-pixel centres, antialiased when shrinking; jax.image.resize
    computes the same triangle filter)."""
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images.astype(jnp.float32), (b, size, size, c), "bilinear",
                            antialias=True).astype(images.dtype)


def export_encoder(workdir: str, path: str, subtree: str = "encoder") -> str:
    """The encoder params of an eojax run's latest checkpoint (e.g. a MAE pretraining run; its EMA when
    it kept one, as its eval used) -> .npz, for `config.init_from` of a seg run with encoder 'mae'."""
    params, _ = ckpt_lib.load_variables(workdir, None)
    if subtree not in params:
        raise KeyError(f"{workdir} params have no {subtree!r} subtree; they have {sorted(params)}")
    tree = params[subtree]
    flat = dict(zip(jax.tree.leaves(optim.param_paths(tree)), jax.tree.leaves(tree)))
    np.savez(path, **flat)
    return path
