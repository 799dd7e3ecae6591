"""SatMAE++ pretraining: group-channel MAE with the multi-scale (2x, 4x) reconstruction head.

  eojax train --config=configs/satmae.py:runlocal --workdir=/tmp/eojax_satmae

Bands are embedded per group (default: SatMAE++'s Sentinel-2 grouping (B2,B3,B4,B8), (B5,B6,B7,B8A),
(B11,B12) of the 10 bands), 75% of the (group, location) tokens are masked, and the reconstruction
is refined to 2x and 4x against REAL higher-resolution data: each sample is a window of 4 x 96
native pixels, the model sees it averaged down to 96 px (input.scales=(1, 2, 4)).
Loss = 0.6 * MSE + 0.4 * (0.5 * L1 at 2x + 0.5 * L1 at 4x).

Arguments: runlocal, variant=<mu|tiny|base|large> (paper: base / large at 96 px, patch 8),
spatial_mask (mask the same locations in every group), single_scale (no multi-scale head).
model.pred_order: 'bands' (each group's decoder head predicts its own bands), 'reference' (SatMAE++'s:
the group predictions concatenated in group order are read as band order, as a published SatMAE++
pretraining checkpoint was trained) or 'auto' (default: 'reference' when --config.init_from names a
checkpoint file, 'bands' otherwise; `eojax eval` / `infer` of such a run need the same init_from or
pred_order='reference').
Your own data: --config.input.paths="('/data/s2/*.tif',)" --config.input.bands="(...10 names...)",
or other bands with --config.model.groups="(('B2','B3','B4'),('B5','B6','B7'))".
The default config reads 384 px native windows, so it needs scenes of at least 384 x 384 pixels (the
synthetic default scenes are smaller: use your own data; the error names the window size).
`:runlocal` is a micro model on 16 px inputs (64 px native windows) of the synthetic Sentinel-2
scenes, 60 steps: ~1 min on a 2-core CPU; the loss falls from ~1.0 to ~0.7.
"""
from eojax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, variant="base", spatial_mask=False,
                               single_scale=False)
    config = config_lib.trainer_defaults()
    config.task = "satmae"
    config.total_steps = 50_000
    config.batch_size = 512
    config.log_every = 50
    config.eval_every = 5_000
    config.checkpoint_every = 1_000

    config.input = config_lib.image_input_defaults(
        window=96, eval_stride=96, scales=(1,) if arg.single_scale else (1, 2, 4))
    config.export = config_lib.export_defaults()  # `eojax export`: stride 0 = the window

    # Shape keys at 0 take the variant's own size (eojax.mae.satmae.VARIANTS).
    config.model = dict(
        variant=arg.variant, groups="sentinel2_10", patch_size=8, mask_ratio=0.75, pred_order="auto",
        spatial_mask=arg.spatial_mask, norm_pix_loss=False, width=0, depth=0, heads=0, mlp_dim=0,
        group_embed_dim=0, decoder_width=0, decoder_depth=0, decoder_heads=0, decoder_group_embed_dim=0,
        dropout=0.0, dtype="float32", param_dtype="float32", scan=False, remat=False,
        attention_impl="xla")  # "cudnn": flash attention on GPUs (bf16 / fp16)

    config.optim = config_lib.mae_adamw(lr=1e-4 * config.batch_size / 256, warmup_steps=2_000)  # SatMAE's blr scaling

    if arg.runlocal:
        config_lib.make_runlocal(config, total_steps=60, checkpoint_every=30)
        config.input.window = 16
        config.input.num_windows = 256
        config.input.eval_stride = 16
        config.model.update(variant="mu", patch_size=4)
    return config
