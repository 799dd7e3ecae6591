"""Virtual Satellite: a GPT-2 writing Landsat-8 pixels as GReaT text rows fills a cloudy date.

  eojax train --config=configs/vsat.py:runlocal --workdir=/tmp/eojax_vsat
  eojax infer --config=configs/vsat.py:runlocal --workdir=/tmp/eojax_vsat

Trains on the clear pixels (X, Y, DOY, B1..B7 as "B3 is 7421, X is 12, ..." in a random column order)
of the 8 dates of Landsat-8 path/row 013/032 in ../shared/data/gdalcubes_L8NY18 (found through
EOJAX_TEST_DATA, or set --config.input.root), regridded onto the first date's grid; holds out a box
of clear pixels on the target date 2018-08-27 (the cloudiest date with clear dates on both sides).
`eojax infer` fills that date's cloud and shadow pixels by constrained generation, writes the filled
series as GeoTIFFs plus a before / after PNG, and prints per-band L1 / L2 on the held-out box for the
model, linear temporal interpolation and the nearest clear date.

Arguments (comma separated): runlocal, optim=<adamw|sophia_g|sophia_h|sophia_aispace>,
variant=<mu|distilgpt2|gpt2>, pretrained=<folder of a Hugging Face GPT-2: config.json, model.safetensors,
tokenizer files> (that model and its BPE tokenizer, fine-tuned; its config.json is read here and its
sizes set in config.model, which the checkpoint must then match).
`:runlocal`: a 2-layer width-64 GPT-2 with eojax's digit tokenizer, 300 steps of batch 32: ~40 s of
CPU time on a 2-core CPU (train + infer); the train loss falls from ~3.3 (ln of the 29-token
vocabulary) to ~1.4 nats per token, held-out eval loss ~1.47. This tiny model fills every cloudy
pixel but is far less accurate than the baselines (mean L1 ~3300 DN vs ~730-1000): it demonstrates
the pipeline. With --config.total_steps=1500 the same model reaches mean L1 ~740 (docs/vsat.md).
"""
from eojax import config_lib, optim
from eojax.weights import gpt2 as gpt2_weights


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, optim="adamw", variant="mu", pretrained="")
    config = config_lib.trainer_defaults()
    config.task = "vsat"
    config.total_steps = 20_000
    config.batch_size = 64
    config.log_every = 50
    config.eval_every = 1_000
    config.checkpoint_every = 1_000

    config.input = dict(
        source="landsat",          # landsat | multiband | csv
        root="",                   # landsat: folder of USGS band files ('' = $EOJAX_TEST_DATA/gdalcubes_L8NY18)
        pathrow="013032",
        paths=(),                  # multiband: one GeoTIFF per date with a QA band
        synthetic_dir="",          # multiband without paths: eojax's synthetic series written here
        csv="",                    # csv: aispace's layout
        bands=("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
        qa_format="landsat_c1",    # eojax.data.qa formats
        target_date="2018-08-27",  # the date to fill ('' = the one with most cloud + shadow): this
                                   # one is mid-series (both baselines apply) and 16 % cloud + shadow
        holdout_box=(0.3, 0.3, 0.6, 0.6),  # fractions x0, y0, x1, y1 of the grid, on the target date
    )
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
    config.optim.update(name=arg.optim, lr=6e-4, b2=0.95, weight_decay=0.1, warmup_steps=200, clip_norm=1.0)
    if arg.optim.startswith("sophia"):
        # Sophia's GPT-2 settings (Liu et al. 2023): rho 0.05 as gamma, Hessian every 10 steps.
        config.optim.update(lr=3e-4, weight_decay=0.2)
        config.optim.sophia.update(gamma=0.05, b1=0.965, b2=0.99, update_every=10)
    if arg.optim == "sophia_aispace":
        config.optim.no_decay = ()  # aispace's SophiaG gets model.parameters(): one group, all decayed

    if arg.pretrained:
        config.init_from = f"{arg.pretrained}/model.safetensors"  # a file: the task imports the HF layout
        hf = gpt2_weights.load_config(arg.pretrained)  # the model is built from the config alone
        config.model.update(tokenizer="bpe", tokenizer_dir=arg.pretrained, variant="distilgpt2",
                            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                            n_inner=hf["n_inner"] or 0, vocab_size=hf["vocab_size"])
        config.optim.lr = 5e-5 if arg.optim == "adamw" else 2e-5

    if arg.runlocal:
        config_lib.make_runlocal(config, total_steps=300, checkpoint_every=300, eval_every=0, lr=2e-3,
                                 warmup_steps=30)
        config.batch_size = 32
        config.log_every = 25
        config.eval_steps = 4
        if not arg.pretrained:
            config.model.update(variant="mu", n_layer=2, n_head=4, n_embd=64)
        if arg.optim in ("sophia_g", "sophia_h"):
            # Measured on this task (bench/vsat_sophia.py): gamma 0.05 leaves a win rate of ~0.02
            # (nearly every coordinate clipped, i.e. sign descent); gamma 1 gives ~0.3, inside the
            # paper's advised 0.1-0.5.
            config.optim.lr = 2e-3
            config.optim.sophia.gamma = 1.0
    return config
