"""Scene classification: linear probe, fine-tune or from scratch on a shared encoder; k-NN.

  # SatMAE++'s fMoW-Sentinel fine-tune (ViT-L group-channel, 96 px, patch 8) from a pretrained run:
  eojax train --config=configs/classify.py --workdir=/tmp/cls --config.input.root=/data/fmow-sentinel \
      --config.model.encoder_init=/weights/satmae_pp_pretrain.pth
  # a folder of class folders (EuroSAT MS), linear probe of an eojax MAE run, then its k-NN:
  eojax train --config=configs/classify.py:data=folders,encoder=mae,mode=linear_probe --workdir=/tmp/probe \
      --config.input.root=/data/EuroSAT_MS --config.input.preset=eurosat_ms --config.model.encoder_init=/runs/mae
  eojax knn --config=configs/classify.py:data=folders,encoder=mae --workdir=/tmp/knn \
      --config.input.root=/data/EuroSAT_MS --config.model.encoder_init=/runs/mae
  eojax train --config=configs/classify.py:runlocal --workdir=/tmp/cls   # built-in synthetic chips

Arguments: data=<fmow|folders|csv|eolearn|sample|synthetic>, encoder=<satmae|mae|prithvi|dofa|croma|resnet>,
mode=<finetune|linear_probe|scratch>, epochs=<N>, runlocal.

Default (fine-tune): SatMAE++'s recipe (its main_finetune.py as run for fMoW-Sentinel): effective
batch 8 x 16 (128 per step, gradients accumulated over 16 micro-batches), 30 epochs with 5 of
warm-up, lr = blr x 128 / 256 with blr 2e-4, AdamW weight decay 0.05, layer-wise lr decay 0.75,
drop path 0.2 (every ViT encoder here), cosine to 1e-6, mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25,
global average pooling -> fc_norm -> head. The reference's RandAugment (rand-m9-mstd0.5-inc1) is made
of RGB photo operations (colour, posterize, solarize, ...) that have no meaning for 10 reflectance
bands; eojax flips and quarter-turns the chips instead (the 8 symmetries of the square: overhead imagery
has no upright) and keeps
random erasing, mixup and cutmix, which are band-agnostic.

Linear probe: MAE's recipe (main_linprobe.py): the frozen encoder's features through a BatchNorm
without affine (eps 1e-6) into the head (std 0.01), no mixup or smoothing, weight decay 0, the cls
token for ViTs that have one ('avg' pooling for the rest); LARS is replaced by AdamW (blr 0.1 under
LARS has no AdamW counterpart: lr 1e-3 here).

data=eolearn (the eo-learn land-use set, 8-px chips, from $EOJAX_TEST_DATA/eolearn or input.root),
data=sample (the same set made from eojax's packaged copy of the patch, eojax.sample_data 'eolearn_lulc':
bit for bit the same chips, nothing beside the package read) and data=synthetic (eojax's built-in chips,
read at 16 px) are small sets: batch 32, no accumulation, and with encoder=mae the small ViT (width 64, 4 blocks,
patch 2) that colab/classification.ipynb and docs/classify.md pretrain.

`:runlocal` fine-tunes a tiny eojax MAE ViT (width 32, 4 blocks, patch 8) on 32-px synthetic
Sentinel-2 chips of 5 land-cover classes (240 chips, fixed 60/20/20 split): 60 steps of batch 16,
about 40 s on a 2-core CPU; val top-1 well above the majority class (~0.3). With data=sample it runs on
the packaged real chips instead (8 px, the ViT's patch 2).
"""
import ml_collections

from eojax import config_lib, sample_data

SIZES = {"satmae": 96, "mae": 224, "prithvi": 224, "dofa": 224, "croma": 120, "resnet": 224}
SMALL_SETS = {"eolearn": 8, "sample": 8, "synthetic": 16}  # small data sets and the chip size they are read at
# Training images per epoch, for epoch-based steps: fMoW-Sentinel's train split, EuroSAT's 60 %
# (folders / csv: set total_steps for other sets), the eo-learn land-use set's train chips.
TRAIN_IMAGES = {"fmow": 712_874, "folders": 16_200, "csv": 16_200, "eolearn": 261, "sample": 261, "synthetic": 143}
VARIANTS = {"satmae": "large", "mae": "base", "prithvi": "base", "dofa": "base", "croma": "base", "resnet": "50"}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, data="fmow", encoder="satmae", mode="finetune", epochs=30, runlocal=False)
    probe = arg.mode == "linear_probe"
    config = config_lib.trainer_defaults()
    config.task = "classify"
    small = arg.data in SMALL_SETS  # 261 / 143 training chips: batch 32, no accumulation
    config.batch_size = 32 if small else 128  # SatMAE++: 8 per micro-batch x 16 accumulated
    steps_per_epoch = max(TRAIN_IMAGES.get(arg.data, 16_200) // config.batch_size, 1)
    config.total_steps = arg.epochs * steps_per_epoch
    config.eval_every = steps_per_epoch
    config.checkpoint_every = steps_per_epoch // 4
    config.log_every = 50
    config.best_metric = "top1"
    config.best_mode = "max"

    config.input = dict(
        source="eolearn_lulc" if arg.data in ("eolearn", "sample") else arg.data,  # fmow | folders | csv | eolearn_lulc | synthetic
        # fmow: the release folder; folders: the folder of class folders; eolearn_lulc: the eo-learn patch
        root=sample_data.path("eolearn_lulc") if arg.data == "sample" else "",
        csv="",  # source 'csv': path,label (or labels 'a;b') [,split]
        classes=(),  # class names in label order; empty = sorted folder names / CSV labels / fMoW's 62
        preset="",  # eurosat_ms | eurosat_rgb: the release's band names and sensor
        bands=(),  # names or 1-based indices to read; empty = all (fmow: SatMAE's 10)
        band_names=(),  # names of the files' bands when they carry no descriptions
        sensor="sentinel2a" if arg.data in ("fmow", "synthetic", "eolearn", "sample") else "",  # the bands' sensor (eojax.data.sensors)
        nodata=ml_collections.config_dict.placeholder(float),  # override the files' nodata value
        # chips are centre-cropped square and resized to it
        size=SMALL_SETS[arg.data] if small else SIZES.get(arg.encoder, 224),
        multi_label=False,  # folders / CSV with one label per chip can still be trained multi-label
        normalize="satmae" if arg.data == "fmow" else "data",  # data | satmae | none
        mean=(), std=(),
        eval_batch_size=64,
        worker_count=0,
    )
    config.model = dict(
        encoder=arg.encoder, encoder_variant=VARIANTS.get(arg.encoder, "base"),
        encoder_args={} if arg.encoder == "resnet" else dict(drop_path_rate=0.0 if probe else 0.2),
        encoder_init="",  # eojax run folder, encoder .npz or published checkpoint
        mode=arg.mode,
        pool="cls" if probe and arg.encoder in ("mae", "satmae") else "avg",
        head_norm="batch" if probe else "layer",
        head_init_std=0.01 if probe else 2e-5,
        dtype="float32",
    )
    if small:  # the encoder the small-set MAE pretraining of docs/classify.md trains (patch 2)
        config.eval_every = 5 * steps_per_epoch
        config.checkpoint_every = 10 * steps_per_epoch
        if arg.encoder == "mae":
            config.model.update(encoder_variant="mu")
            config.model.encoder_args = dict(width=64, depth=4, heads=4, mlp_dim=256, patch_size=2,
                                             drop_path_rate=0.0 if probe else 0.1)
        elif arg.encoder == "resnet":
            config.model.encoder_variant = "18"
    config.augment = dict(
        flips=True,  # one of the 8 flips / quarter turns per chip (flips only for non-square chips)
        mixup=0.0 if probe else 0.8, cutmix=0.0 if probe else 1.0, mix_prob=1.0, switch_prob=0.5,
        label_smoothing=0.0 if probe else 0.1,
        random_erase=0.0 if probe else 0.25,
    )

    from eojax import optim
    config.optim = optim.default_config()
    lr = 2e-4 * config.batch_size / 256
    config.optim.update(name="adamw", lr=1e-3 if probe else lr, weight_decay=0.0 if probe else 0.05,
                        schedule="cosine", warmup_steps=5 * steps_per_epoch if not probe else steps_per_epoch,
                        end_lr_factor=1e-6 / lr if not probe else 0.0, accum_steps=1 if small else 16,
                        layer_decay=1.0 if probe or arg.encoder == "resnet" else 0.75)
    if probe:
        config.optim.freeze = ("^encoder/",)
        config.optim.warmup_steps = min(config.optim.warmup_steps, 10 * steps_per_epoch)

    if arg.runlocal:
        if arg.data != "sample":  # the built-in synthetic chips
            config.input.update(source="synthetic", root="", size=32, sensor="sentinel2a", normalize="data")
        config.input.eval_batch_size = 32
        config_lib.make_runlocal(config, total_steps=60, checkpoint_every=60, eval_every=30,
                                 lr=2e-3 if not probe else 1e-2, warmup_steps=6)
        config.eval_steps = 0
        config.optim.update(accum_steps=1, end_lr_factor=0.0)
        config.model.update(encoder="mae" if arg.encoder == "satmae" else arg.encoder, encoder_variant="mu")
        if config.model.encoder == "mae":
            config.model.encoder_args = dict(width=32, depth=4, heads=2, mlp_dim=64,
                                             patch_size=2 if arg.data == "sample" else 8,
                                             drop_path_rate=0.0 if probe else 0.1)
    return config
