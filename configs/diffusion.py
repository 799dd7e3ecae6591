"""Text-to-image diffusion (UNet + a small text encoder) on caption/image pairs, or the fine-tuning of a
Stable Diffusion 1.5 folder (sd15).

  eojax train --config=configs/diffusion.py:runlocal --workdir=/tmp/eojax_diffusion
  eojax infer diffusion --config=configs/diffusion.py:runlocal --workdir=/tmp/eojax_diffusion \
      --prompt="a dense forest" --prompt="farmland with a small town"
  eojax train --config=configs/diffusion.py:sd15,sd_folder=DIR --workdir=/tmp/eojax_sd15 \
      --config.input.captions=RSICD/dataset_rsicd.json
  eojax infer diffusion --config=configs/diffusion.py:sd15,sd_folder=DIR --workdir=/tmp/eojax_sd15 \
      --prompt="a satellite image of a crop field" --negative_prompt="blurry"
  eojax train --config=configs/diffusion.py:sd15_tiny --workdir=/tmp/eojax_sd15_tiny
  # sd_folder=zoo:stable-diffusion-v1-5 fetches SD-1.5 from the Hugging Face Hub once (docs/zoo.md)

Trains a text-conditioned UNet (epsilon or v prediction, min-SNR weighting optional, EMA of the weights)
on captions in the RSICD layout or HF `metadata.jsonl` (`input.captions=<file>`); with `input.captions`
empty it writes synthetic scenes whose captions name their land cover (eojax.data.synthetic, cached in
~/.cache/eojax). Eval: denoising loss at fixed timesteps and the Frechet distance (FD, with its sample
count) between held-out images and samples for their captions, in a random-init MAE-encoder feature
space unless `fd.mae_run_dir` names an eojax MAE run, or in InceptionV3 pool3 space with
`fd.features=inception fd.inception_weights=<local pytorch-fid / torchvision state dict>`.

Arguments (comma separated): runlocal, multispectral (10-band synthetic GeoTIFFs in and out), latent (the
fixed space-to-depth autoencoder: the UNet runs at half resolution), gpt2=<local Hugging Face GPT-2 folder>
(frozen GPT-2 hidden states as the caption encoder, its params frozen with optim.freeze; the folder needs
config.json, model.safetensors, vocab.json + merges.txt or tokenizer.json).
`:runlocal` is a 32x32 RGB model (the lossless space-to-depth autoencoder folds 2x2 pixels into 12 channels,
so the UNet (32/64 channels, attention at 8x8) runs at 16x16), v-prediction, 400 steps of batch 16 on 1,280
synthetic pairs (247 held out), DPM-Solver++ 2M with 10 steps and guidance 2. Measured on a shared, heavily
loaded 2-core CPU: ~10 min in all (train step ~0.45 s, two compiles of ~2 min, each FD eval ~2-3 min); the
held-out loss fell 0.197 -> 0.129 and the FD (247 samples, 64-d random-init MAE features) 2.95 -> 1.86 between
the evals at steps 200 and 400. Samples are still noisy at this size: it is a smoke test, not a generator.

sd15,sd_folder=DIR (or --config.model.sd_folder=DIR): the diffusion project's fine-tune of Stable Diffusion
1.5 (diffusers' train_text_to_image.py as its train.sh ran it; eojax/diffusion/sd_finetune.py): the folder's
UNet (859.5M parameters) trains, its VAE and CLIP ViT-L/14 text encoder are frozen (optim.freeze: no
optimizer moments); images resized (bilinear) and centre-cropped to 224, randomly flipped, to [-1, 1];
latents = a VAE posterior sample x 0.18215; the folder's DDPM betas (scaled-linear 0.00085 -> 0.012, 1000
steps), epsilon prediction, plain MSE; AdamW (0.9, 0.999, eps 1e-8, weight decay 1e-2 on every parameter),
lr 1e-6 constant, batch 1 x 4 accumulated, clipping 1.0, EMA 0.9999, 3,500 steps, checkpoints every 500,
remat per UNet block, bf16 compute on accelerators (model.dtype 'auto'), FSDP (mesh fsdp = all devices; on
N devices give --config.batch_size=4N). Prompts: an image's captions joined with ' ', 77 CLIP tokens, no
caption dropout. Samples (pictures, `eojax infer`): the folder's PNDM, 100 steps, guidance 7.5, the
project's negative prompt and ' , 8k, best quality, high-resolution' suffix, at 512x512 as its pipeline
made them; the FD eval: 100 held-out images (eval_steps 25) against samples for their prompts at 224. It
needs a GPU: 15.4 GB of float32 state (the UNet's params, AdamW moments and EMA 13.8 GB; the frozen VAE
and CLIP, 207M parameters, and their EMA copy 1.7 GB) plus gradients and activations. Without sd_folder it stops
with one line saying how to get the folder. The model.* size keys are SD-1.5's for the record; the model
is what the folder's config.json files say.
sd15_tiny (sd_folder=DIR optional): the same path on the tiny random folder tests/fixtures/sd_tiny (32x32
images, 16x16x4 latents, CLIP width 32) with 64 synthetic RSICD-layout pairs written at 48x48 and resized
to 32; 4 steps (batch 1 x 4), FD over the held-out pairs, 3-step PNDM samples. Measured (CLI, 2-core CPU,
load ~1): 1 min 37 s, nearly all compiling (a step runs in ~0.5 s); train loss 1.23 -> 1.16, eval loss
1.18, FD 8.2 over 15 samples: the folder is random, so the numbers only show that the path runs.
"""
import os

from ml_collections import config_dict

from eojax import config_lib

# The diffusion project's sampling prompts (its utils/constants.py).
NEGATIVE_PROMPT = ("weird colors, low quality, jpeg artifacts, lowres, grainy, deformed structures, blurry, opaque, "
                   "low contrast, distorted details, details are low")
PROMPT_SUFFIX = " , 8k, best quality, high-resolution"
TINY_SD_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures", "sd_tiny")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, sd15=False, sd15_tiny=False, sd_folder="", multispectral=False,
                               latent=False, gpt2="")
    config = config_lib.trainer_defaults()
    config.task = "diffusion"
    config.total_steps = 50_000
    config.batch_size = 64
    config.log_every = 100
    config.eval_every = 5_000
    config.checkpoint_every = 5_000

    config.input = dict(
        captions="",  # RSICD-style .json or metadata .jsonl; empty = synthetic pairs
        synthetic_n=4096, synthetic_layout="rsicd", synthetic_bands="rgb",
        bands=(),  # 1-based band indices to read; empty = all
        max_value=0.0,  # data value mapped to +1 (0: 255 for 8-bit files, else 5000)
        image_size=64, max_len=16, vocab_size=0, eval_fraction=0.1, worker_count=0,
        synthetic_size=0,  # synthetic images are written at this size (0: image_size) and resized when read
        skip_missing_images=False)  # True: leave out (with a warning) listed images that do not exist

    config.model = dict(
        block_out_channels=(64, 128, 256), attention=(False, True, True), layers_per_block=2, heads=4,
        transformer_depth=1, norm_groups=32,
        # 'small': a transformer trained with the UNet (text_width/depth/heads); 'gpt2': frozen GPT-2
        # hidden states from the local Hugging Face folder text_init_from (its n_embd is the context width).
        text_encoder="small", text_init_from="", text_width=128, text_depth=2, text_heads=4,
        caption_dropout=0.1,
        autoencoder="", autoencoder_factor=2, latent_scale=1.0,  # '' = pixel space; 'space_to_depth'
        # A diffusers Stable Diffusion folder to fine-tune (eojax/diffusion/sd_finetune.py); '' = off.
        sd_folder="",
        remat=False,  # recompute each UNet block in the backward pass (gradient checkpointing)
        dtype="float32")  # or 'bfloat16'; 'auto': bfloat16 on accelerators, float32 on CPU
    config.diffusion = dict(
        schedule=dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02),
        prediction="epsilon",  # or 'v_prediction'
        min_snr_gamma=5.0,  # 0 = plain MSE
        eval_timesteps=(50, 250, 500, 750, 950))
    # With model.sd_folder, name '' is the folder's scheduler (another name keeps its betas and spacing).
    # negative_prompt: what guidance steers away from ('' = the empty caption); prompt_suffix: added to the
    # prompts of the pictures and `eojax infer`; image_size: theirs (0 = input.image_size).
    config.sampler = dict(name="ddim", num_steps=50, eta=0.0, guidance_scale=3.0, clip=1.0, negative_prompt="",
                          prompt_suffix="", image_size=0)
    # FD features: 'mae' (an eojax MAE run's encoder, fd.mae_run_dir; random-init when empty) or 'inception'
    # (InceptionV3 pool3 from the local file fd.inception_weights: .safetensors / .npz / .pth state dict of
    # pytorch-fid's pt_inception weights, or of torchvision's inception_v3 with inception_variant='torchvision').
    config.fd = dict(enabled=True, features="mae", inception_weights="", inception_variant="pytorch-fid",
                     mae_run_dir="", feature_width=64, feature_depth=2, feature_heads=4, patch_size=4, seed=0,
                     kid_subsets=100, kid_subset_size=1000)  # KID beside FD: clean-fid's subsets
    config.pictures = dict(samples_per_class=4, max_classes=6)
    config.infer = dict(geotiff=False)

    config.optim = config_lib.mae_adamw(lr=2e-4, warmup_steps=500)
    config.optim.update(b2=0.999, weight_decay=0.01, ema_decay=0.999)

    if arg.sd15 or arg.sd15_tiny:
        sd15_recipe(config, arg.sd_folder or (TINY_SD_FOLDER if arg.sd15_tiny else None))
    if arg.sd15_tiny:
        config.input.update(image_size=32, synthetic_size=48, synthetic_n=64, eval_fraction=0.25)
        config.update(total_steps=4, checkpoint_every=2, log_every=1, eval_steps=0)
        config.sampler.update(num_steps=3, image_size=0)
        config.pictures.update(samples_per_class=1, max_classes=2)
    if arg.runlocal:
        config_lib.make_runlocal(config, total_steps=400, checkpoint_every=200, eval_every=200,
                                 lr=2e-3, warmup_steps=20)
        config.log_every = 20
        config.eval_steps = 0  # the whole held-out set: FD needs its samples
        config.input.update(synthetic_n=1280, image_size=32, max_len=12, eval_fraction=0.2)
        # The lossless space-to-depth 'autoencoder' (2x2 pixels -> 12 channels, as in simple
        # diffusion): the UNet runs at 16x16, 4x cheaper than at 32x32 on a CPU.
        config.model.update(block_out_channels=(32, 64), attention=(False, True), layers_per_block=1,
                            heads=4, norm_groups=8, text_width=32, text_depth=1, text_heads=2,
                            autoencoder="space_to_depth", autoencoder_factor=2)
        config.sampler.update(name="dpmpp_2m", num_steps=10, guidance_scale=2.0)
        # v-prediction: a tiny, briefly trained eps-model's errors at high noise are amplified by
        # sqrt((1 - abar) / abar) (up to ~150x on the linear schedule) when x0 is formed; v's are not.
        config.diffusion.prediction = "v_prediction"
        config.optim.ema_decay = 0.99
    if arg.multispectral:
        config.input.synthetic_bands = "sentinel2"
        config.infer.geotiff = True
    if arg.gpt2:
        config.model.update(text_encoder="gpt2", text_init_from=arg.gpt2)
        config.optim.freeze = ("^text_encoder/",)
    if arg.latent:
        config.model.update(autoencoder="space_to_depth", autoencoder_factor=2)
    return config


def sd15_recipe(config, folder: str | None) -> None:
    """diffusers' train_text_to_image.py as the diffusion project's train.sh ran it on SD-1.5 (module
    docstring); `folder` None: required, named by the task's config check."""
    # None stays a str field (placeholder) so that --config.model.sd_folder=DIR can set it
    config.model.update(sd_folder=config_dict.placeholder(str) if folder is None else folder, remat=True, dtype="auto", caption_dropout=0.0, text_encoder="small",
                        autoencoder="",
                        # SD-1.5's shapes, for the record: the folder's config.json files define the model
                        block_out_channels=(320, 640, 1280, 1280), attention=(True, True, True, False),
                        layers_per_block=2, heads=8, norm_groups=32, text_width=768, text_depth=12, text_heads=12)
    # --resolution=224 --center_crop --random_flip; without input.captions the synthetic pairs are written at
    # 128 (their landscapes are 384 pixels wide) and resized to 224 when read
    config.input.update(image_size=224, max_len=77, synthetic_size=128)
    config.diffusion.update(prediction="epsilon", min_snr_gamma=0.0)
    config.diffusion.schedule.update(name="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    config.sampler.update(name="", num_steps=100, guidance_scale=7.5, eta=0.0, clip=0.0,
                          negative_prompt=NEGATIVE_PROMPT, prompt_suffix=PROMPT_SUFFIX, image_size=512)
    config.optim.update(name="adamw", lr=1e-6, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=1e-2, no_decay=(),  # torch's AdamW over unet.parameters() decays all
                        clip_norm=1.0, ema_decay=0.9999, accum_steps=4, freeze=("^text_encoder/", "^vae/"))
    config.update(batch_size=4, total_steps=3500, checkpoint_every=500, log_every=50, eval_every=0,
                  eval_steps=25, mesh=(("data", 1), ("fsdp", -1), ("model", 1)))
    config.pictures.update(samples_per_class=4, max_classes=6)
