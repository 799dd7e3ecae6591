"""A whole Stable Diffusion folder (tests/fixtures/sd_tiny, written by diffusers' save_pretrained with
random tiny models) against diffusers' StableDiffusionPipeline run by
scripts/fixtures/make_sd_fixture.py: the same initial latents, prompt, negative prompt and guidance
give the same final latents and image after 5 PNDM steps and after 5 DDIM steps. Neither torch nor
diffusers is needed here."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from eojax.diffusion import sd as sd_lib

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FOLDER = os.path.join(FIX, "sd_tiny")
# float32 through CLIP, 2 x 5 UNet calls with guidance 7.5 (which amplifies the difference of two
# predictions 7.5 x) and the VAE: relative to the largest value, measured 2-3e-6; 1e-4 leaves room
# for other CPUs' summation orders.
TOL = 1e-4


@pytest.fixture(scope="module")
def sd():
    return sd_lib.load(FOLDER)


@pytest.fixture(scope="module")
def io():
    return np.load(os.path.join(FIX, "sd_tiny_io.npz"))


def _meta():
    with open(os.path.join(FIX, "sd_tiny.json")) as f:
        return json.load(f)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("sampler", ["pndm", "ddim"])
def test_the_pipeline_gives_diffusers_latents_and_image(sd, io, sampler):
    m = _meta()
    latents = io["pipe_latents"].transpose(0, 2, 3, 1)
    kw = dict(num_steps=m["steps"], guidance_scale=m["guidance"], latents=latents, sampler=sampler)
    out = sd_lib.generate(sd, [m["prompt"]], m["negative_prompt"], return_latents=True, **kw)
    assert _rel(out, io[f"pipe_{sampler}_latents"].transpose(0, 2, 3, 1)) < TOL
    image = sd_lib.decode_latents(sd, out)
    assert _rel(image, io[f"pipe_{sampler}_image"]) < TOL
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_the_folder_scheduler_is_pndm_and_seeds_are_per_image(sd):
    assert sd.sampler_options["name"] == "pndm"
    m = _meta()
    a = sd_lib.generate(sd, [m["prompt"], "farmland"], num_steps=2, seeds=[3, 4], height=32, width=32,
                        return_latents=True)
    b = sd_lib.generate(sd, ["farmland"], num_steps=2, seeds=[4], height=32, width=32, return_latents=True)
    np.testing.assert_allclose(np.asarray(a[1:]), np.asarray(b), rtol=1e-4, atol=1e-4)  # batch-size summation order


def test_save_writes_the_same_files_back(sd, tmp_path):
    out = tmp_path / "copy"
    sd_lib.save(sd, str(out))
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        want = load_file(os.path.join(FOLDER, sub, f"{stem}.safetensors"))
        got = load_file(str(out / sub / f"{stem}.safetensors"))
        assert sorted(got) == sorted(k for k in want if not k.endswith("position_ids"))
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{sub}/{k}")
    again = sd_lib.load(str(out))
    jax.tree.map(np.testing.assert_array_equal, again.unet_params, sd.unet_params)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        sd_lib.save(sd, FOLDER)


def test_bad_folders_are_named_before_reading_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download"):
        sd_lib.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        sd_lib.load(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(FOLDER, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="the vae/ folder is missing"):
        sd_lib.load(str(broken))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ValueError, match="component 'unet' is 'UNet2DModel'"):
        sd_lib.load(str(broken))
