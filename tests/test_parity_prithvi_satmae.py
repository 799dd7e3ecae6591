"""Parity with the reference implementations: PANGAEA's Prithvi_Encoder and techmn/satmae_pp's
MaskedAutoencoderGroupChannelViT / GroupChannelsVisionTransformer.

The fixtures (tests/fixtures/reference/{prithvi,satmae_pp}/, written by
scripts/fixtures/reference_prithvi_satmae.py from the reference code at small sizes with random
weights) hold checkpoints in the published layout and the reference's outputs on fixed inputs. Each
test imports the checkpoint through eojax's user path (the seg encoders' loader, the SatMAE++ task's
config.init_from) and compares within 1e-4 relative (max |a - b| / max |b|). No torch needed.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from eojax import weights
from eojax.checkpoint import CheckpointMismatchError
from eojax.mae import satmae as satmae_lib
from eojax.mae.satmae import GroupChannelViT, satmae_loss
from eojax.mae.satmae_task import SatMAETask
from eojax.mae import weights as satmae_weights
from eojax.models import encoders
from eojax.models.vit import patchify
from eojax.tasks.base import DataSpec
from eojax.weights import common

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reference")
TOL = 1e-4
S2_BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def meta(component: str) -> dict:
    with open(os.path.join(REF, component, "reference.json")) as f:
        return json.load(f)


def abstract_params(model, *shape):
    return nn.unbox(jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(1)},
                                   jnp.zeros(shape)))["params"]


# ------------------------------------------------------------------ Prithvi (PANGAEA)
def prithvi(frames: int):
    c = meta("prithvi")["sizes"]
    return encoders.build("prithvi", "mu", image_size=c["size"], patch_size=c["patch"], width=c["width"],
                          depth=c["depth"], heads=c["heads"], mlp_dim=int(c["width"] * c["mlp_ratio"]),
                          num_frames=frames, layers=tuple(c["layers"]), input_bands=tuple(c["bands"]))


def prithvi_import(frames: int):
    enc = prithvi(frames)
    size = meta("prithvi")["sizes"]["size"]
    params, report = common.load_encoder(os.path.join(REF, "prithvi", "Prithvi_100M.safetensors"),
                                         abstract_params(enc, 1, frames, size, size, 6), enc)
    return enc, params, report


def prithvi_outputs(frames: int):
    """(video (B, T, H, W, C), {layer: reference map (B, h, w, D)}); a 3-frame map is the frames'
    mean (eojax's multi-temporal output, docs/encoders.md; PANGAEA returns (B, D, T, h, w))."""
    io = np.load(os.path.join(REF, "prithvi", "io.npz"))
    want = {}
    for k in meta("prithvi")["sizes"]["layers"]:
        out = io[f"out_t{frames}_{k}"]
        want[k] = (out.mean(axis=2) if frames > 1 else out).transpose(0, 2, 3, 1)
    return io[f"video_t{frames}"].transpose(0, 2, 3, 4, 1), want


@pytest.mark.parametrize("frames", [3, 1])
def test_prithvi_matches_pangaea(frames):
    """The published 3-frame file: into a 3-frame model, and into a single-date model, where PANGAEA
    skips the checkpoint's pos_embed and uses its 3D sin-cos for T = 1 (t = 0)."""
    enc, params, report = prithvi_import(frames)
    assert {"norm.weight", "decoder_embed.weight", "mask_token"} <= set(report["ignored"])
    assert ("pos_embed" in report["ignored"]) == (frames == 1) and report["resized"] == {}
    video, want = prithvi_outputs(frames)
    got = jax.jit(enc.apply)({"params": params}, video)
    for g, k in zip(got, want):
        assert rel(g, want[k]) < TOL, (frames, k, rel(g, want[k]))


def test_prithvi_three_frame_model_on_single_date_input():
    """A 3-frame model given one frame at run time: the T = 1 sin-cos, as the reference's 1-frame model."""
    enc, params, _ = prithvi_import(3)
    video, want = prithvi_outputs(1)
    got = jax.jit(enc.apply)({"params": params}, video[:, 0])  # (B, H, W, C)
    for g, k in zip(got, want):
        assert rel(g, want[k]) < TOL


# ------------------------------------------------------------------ SatMAE++ pretraining (MAE)
GROUPS = {"s2": "sentinel2_10", "contiguous": ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))}


def satmae_task(case: str, pred_order: str) -> SatMAETask:
    """The SatMAE++ core as `eojax train --config=configs/satmae.py` builds it, at the fixture's sizes,
    with config.init_from the fixture's checkpoint (no data read: the DataSpec is given)."""
    c = meta("satmae_pp")["sizes"]
    mlp = int(c["width"] * c["mlp_ratio"])
    config = ConfigDict(dict(
        task="satmae", init_from=os.path.join(REF, "satmae_pp", "pretrain.safetensors"),
        input=dict(window=c["size"], scales=(1, 2, 4)),
        model=dict(variant="mu", groups=GROUPS[case], patch_size=c["patch"], mask_ratio=c["mask_ratio"],
                   pred_order=pred_order, spatial_mask=case == "contiguous", norm_pix_loss=False,
                   width=c["width"], depth=c["depth"], heads=c["heads"], mlp_dim=mlp,
                   group_embed_dim=c["channel_embed"], decoder_width=c["decoder_width"],
                   decoder_depth=c["decoder_depth"], decoder_heads=c["decoder_heads"], decoder_mlp_dim=mlp,
                   decoder_group_embed_dim=c["decoder_channel_embed"], multiscale_ratio=c["proj_ratio"],
                   dropout=0.0, dtype="float32", param_dtype="float32", scan=False, remat=False,
                   attention_impl="xla")))
    return SatMAETask(config, DataSpec({}, {"band_names": S2_BANDS}))


def satmae_import(task: SatMAETask):
    size = task.config.input.window
    init = jax.jit(task.model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                    jnp.zeros((1, size, size, 10)))
    params, _ = weights.load(nn.unbox(init)["params"], task.config.init_from, task)  # config.init_from
    return params


def satmae_forward(task, params, io, monkeypatch):
    """The model on the fixture's images, its masking fed the reference's noise (eojax's own
    random_masking: argsort of the noise, the first K kept, as the reference)."""
    with monkeypatch.context() as m:
        m.setattr(jax.random, "uniform", lambda rng, shape: jnp.asarray(io["noise"]).reshape(shape))
        return jax.jit(lambda p, x: task.model.apply({"params": p}, x, rngs={"mask": jax.random.key(0)}))(
            params, io["imgs"].transpose(0, 2, 3, 1))


def reference_layout(pred, groups, p):
    """eojax's per-group predictions (B, N, p*p*Cg), pixels (row, col, band) -> the reference's
    forward_decoder output (B, C, N, p*p), channels in group order."""
    parts = []
    for pr, g in zip(pred, groups):
        b, n, _ = pr.shape
        parts.append(np.asarray(pr).reshape(b, n, p * p, len(g)).transpose(0, 3, 1, 2))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("case,pred_order", [("s2", "auto"), ("s2", "reference"), ("contiguous", "bands")])
def test_satmae_pretraining_matches_reference(case, pred_order, monkeypatch):
    """MaskedAutoencoderGroupChannelViT with the S2 grouping (independent masking, multi-scale head)
    and with contiguous groups (spatial masking): mask, encoder, per-group decoder, reconstruction,
    2x / 4x outputs and the losses. With the S2 grouping the decoder is read in SatMAE++'s order,
    which the default pred_order='auto' chooses for a checkpoint file; with contiguous groups eojax's
    own order is the same."""
    io = np.load(os.path.join(REF, "satmae_pp", f"pretrain_{case}.npz"))
    task = satmae_task(case, pred_order)
    assert task.model.pred_order == ("bands" if case == "contiguous" else "reference")
    params = satmae_import(task)
    out = satmae_forward(task, params, io, monkeypatch)
    p, groups = task.model.patch_size, task.model.groups
    np.testing.assert_array_equal(out["mask"], io["mask"])
    np.testing.assert_array_equal(out["restore_idx"], io["ids_restore"])
    assert rel(out["latent"], io["latent"]) < TOL
    assert rel(reference_layout(out["pred"], groups, p), io["pred"]) < TOL
    # The reference's reconstruction: its (B, C, N, p*p) prediction unpatchified as band order.
    recon = patchify(out["recon"], p)  # (B, N, p*p*C), pixels (row, col, band)
    b, n = recon.shape[:2]
    assert rel(np.asarray(recon).reshape(b, n, p * p, -1).transpose(0, 3, 1, 2), io["pred"]) < TOL
    if "up2" in io:
        assert rel(out["up2"], io["up2"].transpose(0, 2, 3, 1)) < TOL
        assert rel(out["up4"], io["up4"].transpose(0, 2, 3, 1)) < TOL
    # Losses: the task's (0.6 MSE + 0.4 multi-scale L1, as engine_pretrain.py) and norm_pix_loss.
    imgs = jnp.asarray(io["imgs"].transpose(0, 2, 3, 1))
    images = {"image": imgs, "image_2x": imgs.repeat(2, 1).repeat(2, 2), "image_4x": imgs.repeat(4, 1).repeat(4, 2)}
    valid = {k.replace("image", "valid"): jnp.ones(v.shape[:3], bool) for k, v in images.items()}
    loss, aux = task.loss(out, images, valid)
    assert rel(aux["mse"], io["loss"]) < TOL
    assert rel(0.5 * aux["l1_2x"] + 0.5 * aux["l1_4x"], io["ms_loss"]) < TOL
    assert rel(loss, 0.6 * io["loss"] + 0.4 * io["ms_loss"]) < TOL
    single_scale = {k: v for k, v in out.items() if k not in ("up2", "up4")}
    normpix, _ = satmae_loss(single_scale, imgs, None, p, groups, norm_pix_loss=True,
                             pred_order=task.model.pred_order)
    assert rel(normpix, io["loss_normpix"]) < TOL


def test_satmae_pretraining_in_eojax_order_differs(monkeypatch, caplog):
    """pred_order='bands' (eojax's fix, the default without a checkpoint file) on the published S2
    checkpoint: imported with a warning, and its multi-scale output is not the reference's."""
    io = np.load(os.path.join(REF, "satmae_pp", "pretrain_s2.npz"))
    task = satmae_task("s2", "bands")
    params = satmae_import(task)
    assert "pred_order='reference'" in caplog.text
    out = satmae_forward(task, params, io, monkeypatch)
    assert rel(out["up2"], io["up2"].transpose(0, 2, 3, 1)) > 0.1
    no_file = satmae_task("s2", "auto")
    no_file.config.init_from = ""  # training from scratch: eojax's order
    assert no_file.model.pred_order == "bands"


# ------------------------------------------------------------------ SatMAE++ fine-tuning ViT
def finetune_kwargs(size: int) -> dict:
    c = meta("satmae_pp")["sizes"]
    return dict(image_size=size, patch_size=c["patch"], groups=satmae_lib.GROUPS_S2_10, width=c["width"],
                depth=c["depth"], heads=c["heads"], mlp_dim=int(c["width"] * c["mlp_ratio"]),
                group_embed_dim=c["channel_embed"], learned_embed=True)


@pytest.mark.parametrize("size", [None, "finetune_size"])
def test_satmae_finetuned_vit_trained_embeddings(size):
    """GroupChannelsVisionTransformer with trained pos_embed / channel_embed / channel_cls_embed: all
    tokens after the final norm, at the checkpoint's size and at another one (main_finetune.py drops a
    pos_embed of another shape: the model's sin-cos; the trained channel_embed still loads)."""
    c = meta("satmae_pp")["sizes"]
    size = c[size] if size else c["size"]
    io = np.load(os.path.join(REF, "satmae_pp", "finetune.npz"))
    x, want = (io["x"], io["tokens"]) if size == c["size"] else (io[f"x{size}"], io[f"tokens{size}"])
    kwargs = finetune_kwargs(size)
    model = GroupChannelViT(**kwargs)
    path = os.path.join(REF, "satmae_pp", "finetune.safetensors")
    params = satmae_weights.load_pretrained(path, abstract_params(model, 1, size, size, 10), kwargs,
                                            strict=False)  # the classifier head is dropped
    got = jax.jit(model.apply)({"params": params}, x.transpose(0, 2, 3, 1))
    assert rel(got, want) < TOL
    if size == c["size"]:
        assert rel(got[:, 0], io["cls"]) < TOL


def test_satmae_finetuned_checkpoint_as_seg_encoder():
    """The seg encoder 'satmae' (learned_embed=True in model.encoder_args) through the seg loader:
    the last block's map (with the final norm) is the reference's tokens, group-averaged; the
    classifier is reported, not refused. Without learned_embed the trained embeddings are an error."""
    c = meta("satmae_pp")["sizes"]
    size, g = c["size"], c["size"] // c["patch"]
    io = np.load(os.path.join(REF, "satmae_pp", "finetune.npz"))
    path = os.path.join(REF, "satmae_pp", "finetune.safetensors")
    kw = {k: v for k, v in finetune_kwargs(size).items() if k != "groups"}
    enc = encoders.build("satmae", "mu", layers=(c["depth"] - 1,), groups=satmae_lib.GROUPS_S2_10, **kw)
    params, report = common.load_encoder(path, abstract_params(enc, 1, size, size, 10), enc)
    assert set(report["ignored"]) == {"head.weight", "head.bias"}
    (fmap,) = jax.jit(enc.apply)({"params": params}, io["x"].transpose(0, 2, 3, 1))
    want = io["tokens"][:, 1:].reshape(len(io["x"]), 3, g, g, -1).mean(axis=1)
    assert rel(fmap, want) < TOL
    fixed = encoders.build("satmae", "mu", layers=(c["depth"] - 1,), groups=satmae_lib.GROUPS_S2_10,
                           **dict(kw, learned_embed=False))
    with pytest.raises(CheckpointMismatchError, match="learned_embed=True"):
        common.load_encoder(path, abstract_params(fixed, 1, size, size, 10), fixed)


def test_satmae_published_pth_wrapper_reads_as_safetensors():
    """finetune.pth is the reference's {'model', 'epoch', 'args'} file; eojax reads the same tensors
    (torch only for this check: the tests above read the .safetensors)."""
    pytest.importorskip("torch", reason="reading a .pth needs torch")
    pth = satmae_weights.load_state_dict(os.path.join(REF, "satmae_pp", "finetune.pth"))
    st = satmae_weights.load_state_dict(os.path.join(REF, "satmae_pp", "finetune.safetensors"))
    assert pth.keys() == st.keys()
    for k in st:
        np.testing.assert_array_equal(pth[k], st[k])
