"""CNN encoders in the segmentation family: PANGAEA's supervised UNet baseline (encoder 'unet' +
decoder 'unet', trained from scratch) and ResNet (torchvision layout, BatchNorm statistics as model
state) under every mode. References: PANGAEA's UNet parameter count and its forward pass written with
torch's functional ops, numpy's padding, torchvision-layout fixture files (tests/fixtures/resnet)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, traverse_util
from safetensors.numpy import load_file

from eojax import checkpoint as ckpt_lib
from eojax import optim, train
from eojax.models.encoders import build
from eojax.seg import data as segdata
from eojax.seg import modes as seg_modes
from eojax.seg.decoders import SegmentationModel, build_decoder
from eojax.seg.decoders.blocks import resize
from eojax.seg.decoders.unet import UNetDecoder, pad_to
from eojax.seg.task import SegTask
from helpers import ONE_DEVICE, load_config

RESNET_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "resnet", "basic.safetensors")
FIXTURE_ARCH = dict(block="basic", stage_sizes=(2, 2, 2, 2), width=8)  # tests/fixtures/resnet/meta.json 'basic'


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return segdata.synthetic_burnscars(tmp_path_factory.mktemp("burnscars"), size=64, n_train=10, n_test=4)


def cnn_config(root, encoder="unet", decoder="unet", mode="random", arg="", **overrides):
    """runlocal on 32-px crops, batch 4, 8-channel decoders."""
    overrides = {"mesh": ONE_DEVICE, "batch_size": 4, "peak_tflops": 1.0, **overrides}
    c = load_config("seg", f"encoder={encoder},decoder={decoder},mode={mode},runlocal{arg}", **overrides)
    c.input.update(root=str(root), crop=32, eval_batch_size=2)
    if "channels" in c.model.decoder_args:
        c.model.decoder_args.channels = 8
    return c


def _host(tree):
    return ckpt_lib.host_numpy(tree)


def _snap(state):
    """Host copies of params and model state (the train step donates, and so deletes, its input)."""
    return _host(state.params), _host(state.model_state)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _moved(a, b):
    return [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


# ------------------------------------------------------------------ the UNet baseline

def test_unet_has_pangaeas_shapes_widths_and_size():
    """Topology (64, 128, 256, 512) on 6 bands at 512 px (HLS burn scars): maps at strides 1-16,
    decoder steps leaving 256 / 128 / 64 / 64 channels, logits at the input size (odd sizes too),
    and PANGAEA's parameter count: 14,790,722 for 2 classes, counted with torch on PANGAEA's
    UNet encoder + decoder (pangaea/encoders/unet_encoder.py, pangaea/decoders/unet.py)."""
    enc = build("unet", "base", input_bands=("B2", "B3", "B4", "B8A", "B11", "B12"))
    assert enc.strides == (1, 2, 4, 8, 16) and enc.feature_dims == (64, 128, 256, 512, 512)
    model = SegmentationModel(enc, build_decoder("unet", 2))
    x = jax.ShapeDtypeStruct((2, 512, 512, 6), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x))
    maps = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables, x)
    assert [m.shape for m in maps] == [(2, 512, 512, 64), (2, 256, 256, 128), (2, 128, 128, 256),
                                       (2, 64, 64, 512), (2, 32, 32, 512)]
    assert sum(a.size for a in jax.tree.leaves(variables["params"])) == 14_790_722
    dec = variables["params"]["decoder"]
    assert [dec[f"up{i}"]["conv"]["conv1"]["conv"]["kernel"].shape[-1] for i in (4, 3, 2, 1)] == [256, 128, 64, 64]
    assert dec["up4"]["conv"]["conv0"]["conv"]["kernel"].shape == (3, 3, 1024, 256)  # [skip 512, up 512]
    assert "pyramid" not in dec  # a CNN's maps pass the pyramid untouched
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (2, 512, 512, 2)
    odd = jax.ShapeDtypeStruct((1, 67, 45, 6), jnp.float32)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, odd).shape == (1, 67, 45, 2)


def test_pad_to_is_pangaeas_f_pad():
    """PANGAEA's Up pads the upsampled map by (d // 2, d - d // 2) per axis; negative d crops."""
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 2)).astype(np.float32)
    got = np.asarray(pad_to(jnp.asarray(x), (7, 7)))
    np.testing.assert_array_equal(got, np.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0))))
    np.testing.assert_array_equal(np.asarray(pad_to(jnp.asarray(x), (3, 6))), x[:, 1:])  # d = -1: one row off the top


def _numpy_variables(model, *inputs, seed=0):
    """Random variables of `model`'s shapes without running its init (jax.eval_shape only: no
    compilation): kernels ~ N(0, 1 / fan_in), norm scales and running variances in [0.5, 2], biases and
    running means in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *inputs))

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        lo, hi = (0.5, 2.0) if name in ("var", "scale") else (-0.5, 0.5)
        return rng.uniform(lo, hi, s.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _torch_unet(params, stats, images, depth):
    """PANGAEA's UNet forward in eval mode with torch's functional ops (NCHW), on eojax's parameters."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731

    def double_conv(p, s, x):
        for i in range(2):
            conv, norm = p[f"conv{i}"]["conv"], f"norm{i}"
            x = F.conv2d(x, t(conv["kernel"]).permute(3, 2, 0, 1), t(conv["bias"]), padding=1)
            x = F.relu(F.batch_norm(x, t(s[norm]["mean"]), t(s[norm]["var"]), t(p[norm]["scale"]),
                                    t(p[norm]["bias"]), False, 0.1, 1e-5))
        return x

    enc, enc_s, dec, dec_s = params["encoder"], stats["encoder"], params["decoder"], stats["decoder"]
    xs = [double_conv(enc["in_conv"], enc_s["in_conv"], t(images).permute(0, 3, 1, 2))]
    for k in range(1, depth + 1):
        xs.append(double_conv(enc[f"down{k}"], enc_s[f"down{k}"], F.max_pool2d(xs[-1], 2)))
    y = xs[-1]
    for i in range(depth, 0, -1):  # up4 (coarsest) ... up1
        up = dec[f"up{i}"]["up"]
        y = F.conv_transpose2d(y, t(up["kernel"]).permute(2, 3, 0, 1), t(up["bias"]), stride=2)
        skip = xs[i - 1]
        dy, dx = skip.shape[2] - y.shape[2], skip.shape[3] - y.shape[3]
        y = F.pad(y, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
        y = double_conv(dec[f"up{i}"]["conv"], dec_s[f"up{i}"]["conv"], torch.cat([skip, y], 1))
    head = dec["head"]["cls"]["conv"]
    return F.conv2d(y, t(head["kernel"]).permute(3, 2, 0, 1), t(head["bias"])).permute(0, 2, 3, 1).numpy()


def test_unet_forward_matches_pangaeas_with_torch_ops():
    """Eval mode, random BatchNorm statistics, an odd 37 x 29 input (floor pooling, then padding)."""
    topology = (4, 8, 16, 32)
    model = SegmentationModel(build("unet", None, topology=topology), build_decoder("unet", 3))
    images = np.random.default_rng(1).normal(size=(2, 37, 29, 5)).astype(np.float32)
    variables = _numpy_variables(model, images)
    ours = np.asarray(jax.jit(model.apply)(variables, images))
    ref = _torch_unet(variables["params"], variables["batch_stats"], images, len(topology))
    assert ours.shape == ref.shape == (2, 37, 29, 3)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_unet_decoder_uses_every_skip_map():
    """Changing any one of the encoder's maps (each skip, and the deepest) changes the logits."""
    dims, sizes = (8, 16, 32, 64, 64), (16, 8, 4, 2, 1)
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(2, s, s, d)).astype(np.float32) for s, d in zip(sizes, dims)]
    decoder = UNetDecoder(num_classes=2)
    variables = _numpy_variables(decoder, maps)
    # Training mode: BatchNorm renormalises every step's output, so a deep map's change is not drowned
    # by torch's small default init (noise, not a constant shift, which BatchNorm would remove).
    run = jax.jit(lambda m: decoder.apply(variables, m, train=True, mutable=["batch_stats"])[0])
    base = np.asarray(run(maps))
    assert base.shape == (2, 16, 16, 2)
    for i in range(len(maps)):
        changed = list(maps)
        changed[i] = maps[i] + rng.normal(size=maps[i].shape).astype(np.float32)
        assert np.abs(np.asarray(run(changed)) - base).max() > 1e-3, f"map {i} is unused"


def test_unet_trains_from_scratch_through_the_trainer(chips, tmp_path):
    """encoder=unet,decoder=unet (mode random by default): steps on one batch lower its loss, encoder
    and decoder parameters and BatchNorm statistics all move; frozen / retrain_input / a published
    init_from file are refused."""
    config = cnn_config(chips, mode="random", **{"optim.warmup_steps": 0})
    config.model.encoder_args = dict(topology=(4, 8))  # 3 maps, 5 DoubleConvs: quicker to compile
    assert load_config("seg", "encoder=unet,decoder=unet,runlocal").model.mode == "random"
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    assert set(state.model_state["batch_stats"]) == {"encoder", "decoder"}
    params0, model_state0 = _snap(state)
    batch = run.next_batch()
    losses = []
    for _ in range(8):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    params, model_state = _snap(state)
    for part in ("encoder", "decoder"):
        assert all(_moved(params0[part], params[part])), part
        assert all(_moved(model_state0["batch_stats"][part], model_state["batch_stats"][part])), part
    for mode in ("frozen", "retrain_input"):
        with pytest.raises(ValueError, match="trained from scratch"):
            SegTask.check_config(cnn_config(chips, mode=mode))
    path = str(tmp_path / "unet.npz")
    np.savez(path, x=np.zeros(1))
    finetune = SegTask(cnn_config(chips, mode="finetune"), run.task.spec)
    with pytest.raises(ValueError, match="no published checkpoint"):
        finetune.load_pretrained(path, state.params)


# ------------------------------------------------------------------ ResNet as a segmentation encoder

@pytest.mark.parametrize("decoder", ["upernet", "fcn", "linear", "unet"])
def test_resnet_encoder_and_decoders_give_logits_at_the_input_size(decoder):
    """The four stage maps (strides 4-32) go to the decoders as they are (no ViT pyramid neck, so no
    'pyramid' parameters); logits come back at the input size, odd sizes included."""
    kwargs = {} if decoder in ("linear", "unet") else {"channels": 8}
    model = SegmentationModel(build("resnet", "mu"), build_decoder(decoder, 3, **kwargs))
    x = jax.ShapeDtypeStruct((2, 66, 50, 4), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x))
    assert "pyramid" not in variables["params"]["decoder"]
    assert "encoder" in variables["batch_stats"]  # the ResNet's statistics, beside any decoder's
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (2, 66, 50, 3)
    if decoder == "upernet":  # one lateral per ResNet map, each of its own width (mu: 8, 16, 32; 64 to the PSP)
        dec = variables["params"]["decoder"]
        assert [dec[f"lateral_{i}"]["conv"]["conv"]["kernel"].shape[2] for i in range(3)] == [8, 16, 32]
        assert dec["psp_bottleneck"]["conv"]["conv"]["kernel"].shape[2] == 64 + 4 * 8


def test_linear_decoder_on_a_resnet_upsamples_the_stride_32_map():
    """linear reads the last map (stride 32: 64 px -> 2 x 2) and its logits are that map's 1x1 conv
    resized bilinearly to the image."""
    model = SegmentationModel(build("resnet", "mu"), build_decoder("linear", 2))
    images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    maps, logits = jax.jit(lambda v, x: (model.apply(v, x, method="features"), model.apply(v, x)))(variables, images)
    assert maps[-1].shape == (1, 2, 2, 64)
    head = nn.meta.unbox(variables["params"])["decoder"]["head"]["cls"]["conv"]
    last = np.einsum("bhwc,ck->bhwk", np.asarray(maps[-1]), np.asarray(head["kernel"][0, 0])) + np.asarray(head["bias"])
    want = resize(jnp.asarray(last), (64, 64))  # blocks.resize: torch's bilinear, tested in test_seg
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)


def _torch_stats(sd):
    """The fixture's running statistics as eojax paths (torchvision names: layer1.0.bn1 -> layer1_0/bn1,
    layer2.0.downsample.1 -> layer2_0/downsample_bn)."""
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.*)\.running_(mean|var)", key)
        if m:
            path = re.sub(r"layer(\d)\.(\d+)\.", r"layer\1_\2/", m[1]).replace("downsample.1", "downsample_bn")
            out[(*path.split("/"), m[2])] = value
    return out


def test_frozen_resnet_from_a_torchvision_file_keeps_params_and_statistics(chips, tmp_path):
    """init_from=<torchvision-layout ResNet file> through the trainer's restore puts its running
    statistics in the model state (the decoder's stay as initialised); frozen training steps leave
    the encoder's params AND statistics bit-identical while the decoder's statistics move."""
    config = cnn_config(chips, "resnet", "fcn", "frozen", init_from=RESNET_FIXTURE)
    config.model.encoder_args = dict(FIXTURE_ARCH)
    run = train.setup(config, devices=jax.devices()[:1])
    fresh_params, fresh_state = _snap(run.init_state())
    state = train.restore_or_init(run, ckpt_lib.Checkpointer(str(tmp_path / "ckpt")))
    params0, model_state0 = _snap(state)
    want = _torch_stats(load_file(RESNET_FIXTURE))
    got = traverse_util.flatten_dict(model_state0["batch_stats"]["encoder"])
    assert set(got) == set(want) and len(want) == 2 * 20  # 20 BatchNorms in ResNet-18's layout
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    assert _same(model_state0["batch_stats"]["decoder"], fresh_state["batch_stats"]["decoder"])
    assert not _same(params0["encoder"], fresh_params["encoder"])  # the file's weights
    losses = []
    for _ in range(2):
        state, metrics = run.train_step(state, run.next_batch())
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)), losses
    params, model_state = _snap(state)
    assert _same(params0["encoder"], params["encoder"])
    assert _same(model_state0["batch_stats"]["encoder"], model_state["batch_stats"]["encoder"])
    assert all(_moved(model_state0["batch_stats"]["decoder"], model_state["batch_stats"]["decoder"]))


def test_finetune_resnet_updates_its_statistics(chips):
    config = cnn_config(chips, "resnet", "linear", "finetune", **{"optim.warmup_steps": 0})
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    params0, model_state0 = _snap(state)
    state, _ = run.train_step(state, run.next_batch())
    params, model_state = _snap(state)
    # every running mean and variance moved
    assert all(_moved(model_state0["batch_stats"]["encoder"], model_state["batch_stats"]["encoder"]))
    assert all(_moved(params0["encoder"], params["encoder"]))


def test_resnet_retrain_input_freezes_all_but_conv1():
    """retrain_input's freeze regex (INPUT_LAYERS: torchvision's stem conv) over a ResNet's parameter
    paths: only conv1/kernel trains (the optimizer's mask, tested through the trainer in test_seg)."""
    assert seg_modes.input_layer("resnet") == "conv1"
    freeze = re.compile(seg_modes.retrain_input_freeze("resnet"))
    assert load_config("seg", "encoder=resnet,mode=retrain_input").optim.freeze == (freeze.pattern,)
    enc = build("resnet", "18")
    shapes = jax.eval_shape(enc.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32))
    paths = jax.tree.leaves(optim.param_paths(nn.meta.unbox(shapes["params"])))
    trained = [p for p in paths if not freeze.match(f"encoder/{p}")]
    assert trained == ["conv1/kernel"] and "layer1_0/conv1/kernel" in paths


def test_resnet_probe_sweep_reads_and_keeps_its_statistics(chips):
    """A frozen probe sweep runs the encoder once in eval mode with its statistics (model state beside
    the probes'), and leaves them bit-identical."""
    run = train.setup(cnn_config(chips, "resnet", "linear", "frozen", arg=",sweep=2"), devices=jax.devices()[:1])
    state = run.init_state()
    _, model_state0 = _snap(state)
    state, metrics = run.train_step(state, run.next_batch())
    assert np.isfinite(float(metrics["loss"]))
    _, model_state = _snap(state)
    assert set(model_state["batch_stats"]) == {"encoder"}  # linear probes keep no statistics
    assert _same(model_state0["batch_stats"]["encoder"], model_state["batch_stats"]["encoder"])
