"""Segmentation benchmarking (PANGAEA protocol): a decoder on a frozen / fine-tuned / random encoder.

  eojax train --config=configs/seg.py:encoder=prithvi,decoder=upernet,mode=frozen --workdir=/tmp/seg \
      --config.input.root=/data/hls_burn_scars --config.init_from=/weights/Prithvi_100M.pt
  eojax train --config=configs/seg.py:encoder=mae,decoder=upernet,mode=frozen,runlocal --workdir=/tmp/seg
  eojax infer seg --config=configs/seg.py:...,runlocal --workdir=/tmp/seg --input=scene.tif
  # the PANGAEA fork's (sig-gis/pangaea-bench) burn-scar runs: input layer retrained, whole scenes
  eojax train --config=configs/seg.py:encoder=prithvi,decoder=upernet,mode=retrain_input,\
      preprocessing=seg_resize_input_layer,epochs=16 --workdir=/tmp/seg --config.init_from=...
  # PANGAEA's supervised baseline: the UNet encoder-decoder trained from scratch on the task's bands
  eojax train --config=configs/seg.py:encoder=unet,decoder=unet --workdir=/tmp/seg --config.input.root=...
  # a torchvision / timm ResNet-50 as the encoder (running statistics loaded with the weights)
  eojax train --config=configs/seg.py:encoder=resnet,decoder=upernet,mode=finetune --workdir=/tmp/seg \
      --config.init_from=/weights/resnet50.safetensors

Arguments: encoder=<prithvi|dofa|croma|mae|satmae|resnet|unet>,
decoder=<linear|fcn|upernet|segformer|muster|unet>, mode=<frozen|finetune|random|retrain_input>
(default frozen, for encoder=unet random; retrain_input: only the encoder's patch embedding (ResNet:
conv1) and the decoder train, as the PANGAEA fork's `finetune=retrain_input`; encoder=unet takes
random or finetune only),
preprocessing=<seg_default|seg_resize_input_layer|seg_resize> (PANGAEA's names: random crops of the
encoder's size; whole scenes through an encoder built at the scene size; whole scenes resized to the
encoder's size, logits resized back), epochs=<N> (80; an epoch = 60 steps, the 486 burn-scar training
scenes at batch 8), data=<burnscars|solaris|sample>, sweep=<K> (K probes on frozen features in one
compiled step; sweep_lr: probe k gets lr x 10^(-1 + 2k/(K-1)) instead of only its own seed),
encoder_lr=<factor> (finetune: the encoder's lr relative to the decoder's), runlocal.

Default: HLS Burn Scars (input.root; empty = synthetic chips in that layout), PANGAEA's splits and
normalisation, random crops of the encoder's size, AdamW 1e-4 (weight decay 0.05), lr x 0.1 at 60 %
and 90 % of training, eval (sliding windows over whole scenes) every 5 epochs, best-mIoU params
tested on the test split. Metrics: miou, mf1, accuracy, per-class iou / f1 / precision / recall.

CNN encoders (model.encoder_variant): resnet '18' | '34' | '50' (default) | '101' (torchvision's
layout; maps at strides 4-32 go to the decoders as they are, no ViT pyramid neck). unet 'base':
PANGAEA's configs/encoder/unet_encoder.yaml topology (64, 128, 256, 512): maps of 64, 128, 256, 512,
512 channels at strides 1-16; the unet decoder's DoubleConvs leave 256, 128, 64, 64 channels (each
the next finer encoder map's, as PANGAEA's decoders/unet.py) before a 1x1 classifier: 14.8 M
parameters for 6 bands and 2 classes. It trains on crops of 512 px, PANGAEA's `input_size:
${dataset.img_size}` (burn scars: whole scenes).

`:runlocal` trains a tiny eojax MAE encoder (width 32, 4 blocks, patch 8; resnet / unet: variant 'mu',
unet topology (8, 16, 32, 64)) + decoder on 64-px crops of synthetic 128-px burn-scar chips: 40 steps
of batch 16, about a minute on a 2-core CPU (mostly compilation); with mode=frozen the loss falls from
~0.45 to ~0.16 and eval / test mIoU reach ~0.78 / ~0.80 (the majority-class baseline is ~0.45).
encoder=unet,decoder=unet (from scratch) runs 100 steps instead, ~80 s: loss 0.31 -> 0.06, eval / test
mIoU ~0.97 / ~0.97. With data=solaris it trains on the SpaceNet building chips of
$EOJAX_TEST_DATA/solaris instead (1 pan band, no per-pixel signal: it needs far longer runs).
With data=sample it trains on eojax's packaged real sample (eojax.sample_data 'eolearn_lulc': the
eo-learn Sentinel-2 patch over Slovenia, 3 dates x 13 bands, 101 x 100 px, land use in 3 classes,
train / val / test by location): colab/seg.ipynb's data; no file beside the package is read.
"""
import glob
import os

from eojax import config_lib, sample_data

# PANGAEA's input size per encoder (CROMA: patch 8 at 120 px; its UNet: the dataset's img_size, burn
# scars 512; ResNet: torchvision's 224).
CROPS = {"prithvi": 224, "dofa": 224, "croma": 120, "mae": 224, "satmae": 224, "resnet": 224, "unet": 512}
VARIANTS = {"resnet": "50"}  # the default model.encoder_variant; others 'base'
CNN_ENCODERS = ("resnet", "unet")  # no ViT fields (width, depth, heads, patch) in encoder_args
DECODER_ARGS = {"linear": {}, "fcn": dict(channels=256), "upernet": dict(channels=512),
                "segformer": dict(channels=256), "muster": dict(channels=256, heads=8, window=7),
                "unet": {}}  # unet: widths from the encoder's maps, as PANGAEA's
CLASS_NAMES = {"solaris": ("background", "building"), "sample": ("forest", "grassland", "other")}
TINY_DECODER_ARGS = {"linear": {}, "fcn": dict(channels=32), "upernet": dict(channels=32),
                     "segformer": dict(channels=32), "muster": dict(channels=32, heads=4, window=4), "unet": {}}


def get_config(arg=None):
    from eojax.seg import modes
    arg = config_lib.parse_arg(arg, encoder="prithvi", decoder="upernet", mode="", data="burnscars",
                               preprocessing="seg_default", epochs=80, sweep=0, sweep_lr=False, encoder_lr=1.0,
                               runlocal=False)
    # The UNet baseline only trains from scratch; every other encoder is benchmarked frozen by default.
    arg.mode = arg.mode or ("random" if arg.encoder in modes.SCRATCH_ONLY else "frozen")
    config = config_lib.trainer_defaults()
    config.task = "seg"
    config.batch_size = 8
    config.total_steps = 60 * arg.epochs  # 60 steps: an epoch of the 486 burn-scar training scenes at batch 8
    config.eval_every = 300  # 5 epochs
    config.checkpoint_every = 300
    config.log_every = 20
    config.best_metric = "miou"
    config.best_mode = "max"

    config.input = dict(
        dataset=arg.data,  # burnscars | folder | solaris (data=sample: folder)
        root="",  # burnscars: folder with training/ and validation/ (empty: synthetic chips)
        synthetic_size=512,
        train_images="", train_masks="", val_images="", val_masks="", test_images="", test_masks="",
        mask_suffix=("_merged.tif", ".mask.tif"),
        bands=(),  # names or 1-based indices; empty = all
        # The bands' sensor (eojax.data.sensors: sentinel2a, landsat8, hls_s30, ...), which says what
        # their names mean to the encoders; '' = found from the files (Landsat MTL, HLS / Landsat /
        # Sentinel-2 file names, band descriptions) or the names. Burn scars: HLS in S30's band names.
        sensor="hls_s30" if arg.data == "burnscars" else "",
        nodata=9999.0 if arg.data == "burnscars" else None,
        mask_values=(),  # raw mask value of class 0, 1, ...; empty = the value is the class
        normalize="pangaea" if arg.data == "burnscars" else "data",  # pangaea | data | none
        mean=(), std=(),
        preprocessing=arg.preprocessing,  # seg_default | seg_resize_input_layer | seg_resize (eojax.seg.modes)
        crop=CROPS.get(arg.encoder, 224),  # the encoder input size (seg_resize_input_layer: unused, the scene size)
        num_crops=480,  # random crops per epoch (seg_default)
        eval_stride=0,  # 0 = the crop: PANGAEA's evenly spread windows
        eval_batch_size=8,
        worker_count=0,
    )
    if arg.data == "sample":  # tuples where the defaults are strings: the dict is rebuilt
        config.input = {**config.input.to_dict(), **_sample_input()}
    class_names = CLASS_NAMES.get(arg.data, ("not_burned", "burn_scar"))
    config.model = dict(
        encoder=arg.encoder, encoder_variant=VARIANTS.get(arg.encoder, "base"), encoder_args={},
        decoder=arg.decoder, decoder_args=dict(DECODER_ARGS.get(arg.decoder, {})),
        mode=arg.mode, num_classes=len(class_names), class_names=class_names,
        ignore_index=-1, dtype="float32", pictures=True,
        norm="batch")  # neck / decoder norm: 'batch' (the references' SyncBatchNorm) | 'layer' (channel LayerNorm)
    config.sweep = dict(k=arg.sweep, probe_seed=0, lr_factors=())
    config.infer = dict(probabilities=False)

    from eojax import optim
    config.optim = optim.default_config()
    config.optim.update(name="adamw", lr=1e-4, weight_decay=0.05, schedule="step",
                        step_boundaries=(0.6, 0.9), step_factor=0.1)
    if arg.mode == "frozen":
        config.optim.freeze = ("^encoder/",)
    elif arg.mode == "retrain_input":
        config.optim.freeze = (modes.retrain_input_freeze(arg.encoder),)
    elif arg.encoder_lr != 1.0:
        config.optim.lr_scales = (("^encoder/", arg.encoder_lr),)

    if arg.runlocal:
        # The UNet starts from nothing: 100 steps take it from the majority class to mIoU ~0.98.
        steps = 100 if arg.encoder in modes.SCRATCH_ONLY else 40
        config_lib.make_runlocal(config, total_steps=steps, checkpoint_every=steps, eval_every=steps // 2, lr=2e-3,
                                 warmup_steps=4)
        config.eval_steps = 0
        config.input.update(crop=64, num_crops=256, eval_batch_size=8, synthetic_size=128)
        config.model.update(encoder_variant="mu", decoder_args=dict(TINY_DECODER_ARGS.get(arg.decoder, {})))
        if arg.encoder not in CNN_ENCODERS:
            config.model.encoder_args = dict(width=32, depth=4, heads=2, mlp_dim=64, patch_size=8,
                                             layers=(0, 1, 2, 3))

    if arg.sweep:
        if arg.mode != "frozen":
            raise ValueError("sweep=K trains probes on frozen features: use mode=frozen")
        k = arg.sweep
        factors = tuple(10 ** (-1 + 2 * i / max(k - 1, 1)) for i in range(k)) if arg.sweep_lr else ()
        config.sweep.lr_factors = factors
        config.optim.lr_scales = tuple((f"^probes/probe_{i}/", f) for i, f in enumerate(factors))
    return config


def _sample_input() -> dict:
    """data=sample: the 3 dates of the packaged eo-learn patch, each paired with the class raster of
    the split (its other pixels are 255: ignored), so a split is its locations on every date."""
    root = sample_data.path("eolearn_lulc")
    scenes = os.path.join(root, "scenes", "*.tif")
    out = dict(dataset="folder", sensor="sentinel2a", normalize="data")
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = (scenes,)
        out[f"{split}_masks"] = (os.path.join(root, f"classes_{split}.tif"),) * len(glob.glob(scenes))
    return out
