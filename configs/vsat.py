"""Virtual Satellite: a GPT-2 fills the cloudy pixels of a date in a satellite time series.

  eojax train --config=configs/vsat.py:runlocal --workdir=/tmp/eojax_vsat
  eojax eval vsat --config=configs/vsat.py:runlocal --workdir=/tmp/eojax_vsat   # model vs 4 references
  eojax infer --config=configs/vsat.py:runlocal --workdir=/tmp/eojax_vsat       # fill the clouds

Two modes (docs/vsat.md):
- `mode=context` (default, task 'vsat'): per (pixel, date) a sequence of continuous tokens, the
  pixel's clear values on its nearest dates with their date offsets, the K nearest clear pixels of the
  target date with their offset and their difference to the pixel on a shared clear date, and the
  date last; GPT-2 blocks and a regression head (L1: the conditional median) write the bands.
- `mode=great` (task 'vsat_great'): koyacolab/aispace's GReaT text rows "B3 is 7421, X is 12, ..."
  in a random column order, digit tokens, constrained generation.

Data (default): the 8 dates of Landsat-8 path/row 013/032 in ../shared/data/gdalcubes_L8NY18
(EOJAX_TEST_DATA, or --config.input.root), regridded onto the first date's grid; the clear pixels of
a box on the target date 2018-08-27 are held out (never trained on) and scored.
`:runlocal` runs on eojax's built-in synthetic Landsat-8 series (8 dates of 64 x 64 pixels with
clouds, shadows and a QA band; written once under ~/.cache/eojax) unless --config.input.source is
given: 300 steps of a 2-layer width-64 model, about a minute on a 2-core CPU.
`data=sample` (with or without runlocal): the same 013/032 series from eojax's packaged copy
(eojax.sample_data 'landsat8_013032', bands B1-B7 and BQA): real clouds, nothing beside the package read.

Arguments (comma separated): runlocal, data=sample, mode=<context|great>,
optim=<sophia_g (default)|adamw|sophia_h|sophia_aispace>; mode=great also takes
variant=<mu|distilgpt2|gpt2>, pretrained=<folder of a Hugging Face GPT-2: config.json,
model.safetensors, tokenizer files, or zoo:distilgpt2 / zoo:gpt2> (that model and its BPE tokenizer,
fine-tuned) and lora (aispace's LoRA fine-tune: r 16, alpha 32 on c_attn, dropout 0.05, the base
frozen; eojax/lora.py).
"""
from eojax import config_lib, optim, sample_data, zoo
from eojax.weights import gpt2 as gpt2_weights


def _input(arg):
    return dict(
        source="landsat",          # landsat | multiband | csv | eopatch | synthetic
        # landsat: folder of USGS band files ('' = $EOJAX_TEST_DATA/gdalcubes_L8NY18)
        root=sample_data.path("landsat8_013032") if arg.data == "sample" else "",
        pathrow="013032",
        paths=(),                  # multiband: one GeoTIFF per date with a QA band
        synthetic_dir="",          # synthetic: where eojax's series is written ('' = its cache)
        csv="",                    # csv: aispace's layout
        bands=("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
        qa_format="landsat_c1",    # eojax.data.qa formats
        target_date="2018-08-27",  # the date to fill ('' = the one with most cloud + shadow): this
                                   # one is mid-series and 16 % cloud + shadow
        holdout="box",             # clear pixels of the target date hidden and scored: box | random | none
        holdout_box=(0.3, 0.3, 0.6, 0.6),  # box: fractions x0, y0, x1, y1 of the grid
        holdout_fraction=0.1,      # random: this fraction of the pixels (their clear ones)
        holdout_seed=0,
        # Precision, masks, same-day acquisitions (eojax/vsat/timeseries.py's docstring):
        decimals=0, rounding="error", year=2000, mask_band="", mask_format="", mask_cloud_value=1,
        mask_paths=(), feature="", same_day="error",
    )


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, mode="context", optim="", variant="mu", pretrained="",
                               lora=False, data="")
    if arg.data not in ("", "sample"):
        raise ValueError(f"configs/vsat.py: data={arg.data!r}: 'sample' or none (config.input says where)")
    if arg.mode not in ("context", "great"):
        raise ValueError(f"configs/vsat.py: mode={arg.mode!r}: 'context' or 'great'")
    if arg.mode == "great":
        return _great(arg)
    config = config_lib.trainer_defaults()
    config.task = "vsat"
    config.total_steps = 1_200
    config.batch_size = 256
    config.log_every = 100
    config.eval_every = 600
    config.checkpoint_every = 600
    config.input = _input(arg)
    config.model = dict(
        n_own=8,                   # the pixel's clear dates nearest the target date
        n_neighbours=16,           # the nearest clear pixels of the target date ...
        radius=12,                 # ... within this many pixels
        n_analogs=16,              # the clear pixels of the target date most like the pixel on its
        analog_radius=32,          # own dates, among those within this many pixels ...
        analog_stride=3,           # ... on a grid of this step
        n_layer=3, n_head=4, n_embd=64,
        dropout=0.0, dtype="float32", param_dtype="float32",
    )
    config.infill = dict(batch_size=1024)
    config.optim = optim.default_config()
    name = arg.optim or "sophia_g"
    config.optim.update(name=name, lr=2e-3, b2=0.95, weight_decay=0.01, warmup_steps=100, clip_norm=1.0,
                        end_lr_factor=0.01)
    if name.startswith("sophia"):
        config.optim.sophia.update(b1=0.965, b2=0.99, update_every=10, gamma=SOPHIA_GAMMA)
    if arg.runlocal:
        if arg.data != "sample":  # eojax's built-in synthetic series
            config.input.update(source="synthetic", target_date="", qa_format="eojax_synthetic")
        config_lib.make_runlocal(config, total_steps=300, checkpoint_every=300, eval_every=0, lr=2e-3,
                                 warmup_steps=30)
        config.batch_size = 64
        config.log_every = 50
        config.eval_steps = 4
        config.model.update(n_layer=2, n_embd=64)
    return config


# Sophia's clipping scale for this L1 regression: the paper's GPT-2 rho (0.05) clips nearly every
# coordinate here (win rate ~0.01-0.08 on the runlocal series, i.e. sign descent); 1.0 gives ~0.1-0.3,
# inside the paper's advised 0.1-0.5 (docs/vsat.md).
SOPHIA_GAMMA = 1.0


def _great(arg):
    """mode=great: aispace's GReaT text rows (the X, Y, DOY and bands of a pixel and date)."""
    name = arg.optim or "adamw"
    config = config_lib.trainer_defaults()
    config.task = "vsat_great"
    config.total_steps = 20_000
    config.batch_size = 64
    config.log_every = 50
    config.eval_every = 1_000
    config.checkpoint_every = 1_000

    config.input = _input(arg)
    config.model = dict(
        variant=arg.variant, n_layer=0, n_head=0, n_embd=0,  # 0 = the variant's size
        n_inner=0,                 # MLP width; 0 = 4 * n_embd
        vocab_size=0,              # 0 = the numeric tokenizer's, or the variant's (GPT-2's 50257) with bpe
        n_positions=0,             # 0 = the rows' length
        max_len=0,                 # token length of a row; 0 = computed from the columns
        dropout=0.0, dtype="float32", param_dtype="float32",
        tokenizer="numeric",       # numeric (eojax's digits) | bpe (GPT-2's, with a pretrained model)
        tokenizer_dir="",
    )
    config.infill = dict(
        batch_size=256,            # rows generated at once
        greedy=True,               # first attempt; retries sample at `temperature`
        temperature=0.7,
        retries=3,
        max_number_tokens=0,       # tokens per generated value; 0 = the digits of the band dtype's max
    )

    config.optim = optim.default_config()
    config.optim.update(name=name, lr=6e-4, b2=0.95, weight_decay=0.1, warmup_steps=200, clip_norm=1.0)
    if name.startswith("sophia"):
        # Sophia's GPT-2 settings (Liu et al. 2023): rho 0.05 as gamma, Hessian every 10 steps.
        config.optim.update(lr=3e-4, weight_decay=0.2)
        config.optim.sophia.update(gamma=0.05, b1=0.965, b2=0.99, update_every=10)
    if name == "sophia_aispace":
        config.optim.no_decay = ()  # aispace's SophiaG gets model.parameters(): one group, all decayed

    if arg.pretrained:
        folder = zoo.resolve(arg.pretrained, "pretrained")  # zoo:distilgpt2 / hf://...: fetched now, to size the model
        config.init_from = f"{folder}/model.safetensors"  # a file: the task imports the HF layout
        hf = gpt2_weights.load_config(folder)  # the model is built from the config alone
        config.model.update(tokenizer="bpe", tokenizer_dir=folder, variant="distilgpt2",
                            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                            n_inner=hf["n_inner"] or 0, vocab_size=hf["vocab_size"])
        config.optim.lr = 5e-5 if name == "adamw" else 2e-5
    if arg.lora:  # aispace's fine-tune: adapters on GPT-2's fused q/k/v projection, the rest frozen
        config.lora.update(targets="c_attn", rank=16, alpha=32.0, dropout=0.05)

    if arg.runlocal:
        if arg.data != "sample":  # eojax's built-in synthetic series
            config.input.update(source="synthetic", target_date="", qa_format="eojax_synthetic")
        config_lib.make_runlocal(config, total_steps=300, checkpoint_every=300, eval_every=0, lr=2e-3,
                                 warmup_steps=30)
        config.batch_size = 32
        config.log_every = 25
        config.eval_steps = 4
        if not arg.pretrained:
            config.model.update(variant="mu", n_layer=2, n_head=4, n_embd=64)
        if name in ("sophia_g", "sophia_h"):
            # Measured on this task (bench/vsat_sophia.py): gamma 0.05 leaves a win rate of ~0.02
            # (nearly every coordinate clipped, i.e. sign descent); gamma 1 gives ~0.3, inside the
            # paper's advised 0.1-0.5.
            config.optim.lr = 2e-3
            config.optim.sophia.gamma = 1.0
    return config
