"""ViT-MAE pretraining on multispectral GeoTIFF windows (the main job).

  eojax train --config=configs/mae.py:runlocal --workdir=/tmp/eojax_mae

Trains a masked autoencoder (mask 0.75, patch 8, norm-pix loss) on random 96x96 windows read on the fly
from GeoTIFFs with rasterio; with `input.paths` empty it uses eojax's synthetic Sentinel-2-like scenes
(written once to ~/.cache/eojax). Point it at your own data with
  --config.input.paths="('/data/s2/*.tif',)" --config.input.bands="('B2','B3','B4','B8')"

Arguments (comma separated): runlocal, variant=<mu|tiny|small|base|large|huge>, patch=<int>.
`:runlocal` is a micro model on 32x32 windows, 100 steps of batch 16: ~35 s on a 2-core CPU (most of
it compilation); expect the train loss to fall from ~1.0 to ~0.75-0.8 and the eval loss to ~0.84.
The default (ViT-S width, 6 layers, 96 px, patch 8) is the bench shape.
"""
from eojax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, variant="small", patch=8)
    config = config_lib.trainer_defaults()
    config.task = "mae"
    config.total_steps = 20_000
    config.batch_size = 256
    config.log_every = 50
    config.eval_every = 2_000
    config.checkpoint_every = 1_000

    config.input = config_lib.image_input_defaults()
    config.export = config_lib.export_defaults()  # `eojax export`: stride 0 = the window

    # Shape keys at 0 take the variant's own size.
    config.model = dict(
        variant=arg.variant, patch_size=arg.patch, mask_ratio=0.75, norm_pix_loss=True,
        width=0, depth=0, heads=0, mlp_dim=0, decoder_width=0, decoder_depth=0, decoder_heads=0,
        dropout=0.0, dtype="float32", param_dtype="float32", scan=False, remat=False,
        attention_impl="xla")  # "cudnn" on GPUs: cuDNN's flash attention (bf16 / fp16, head dim % 8 == 0)
    if arg.variant == "small":  # eojax's default: ViT-S width, 6 layers, 192 x 2 decoder (the bench shape)
        config.model.update(depth=6, decoder_width=192, decoder_depth=2, decoder_heads=6)

    config.optim = config_lib.mae_adamw(lr=1.5e-4 * config.batch_size / 256, warmup_steps=1_000)  # MAE's base lr scaling

    if arg.runlocal:
        config_lib.make_runlocal(config, total_steps=100, checkpoint_every=50, eval_every=50,
                                 warmup_steps=10)
        config.input.window = 32
        config.input.num_windows = 256
        config.input.eval_stride = 64
        config.model.update(variant="mu", width=64, depth=2, heads=4, decoder_width=32, decoder_depth=1,
                            decoder_heads=2)
    return config
