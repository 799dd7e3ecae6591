"""ResNet gives torchvision's outputs: tests/fixtures/resnet/ was written by torchvision's own ResNet
code with random weights and randomised BatchNorm statistics (scripts/fixtures/make_resnet_fixture.py;
versions in meta.json), ResNet-18's and ResNet-50's stage layouts at reduced width, and imported here
through eojax.weights.resnet from the .safetensors torchvision's state dict was saved to."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, traverse_util
from safetensors.numpy import load_file

from eojax.checkpoint import CheckpointMismatchError
from eojax.models.encoders import build
from eojax.models.resnet import ResNet, param_count
from eojax.seg.decoders import SegmentationModel, build_decoder
from eojax.weights import common
from eojax.weights import resnet as rw

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "resnet")
TOL = 1e-4  # max |eojax - reference| / max |reference|, per output
with open(os.path.join(FIXTURES, "meta.json")) as f:
    META = json.load(f)


def model_of(name: str, **kw) -> ResNet:
    c = META["configs"][name]
    block = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}[c["block"]]
    return ResNet(block=block, stage_sizes=tuple(c["stage_sizes"]), width=c["width"],
                  num_classes=META["num_classes"], **kw)


def weights_path(name: str) -> str:
    return os.path.join(FIXTURES, f"{name}.safetensors")


def outputs(name: str) -> dict:
    with np.load(os.path.join(FIXTURES, f"{name}_outputs.npz")) as z:
        return {k: z[k] for k in z.files}


def rel(a, b) -> float:
    b = np.asarray(b)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def forward(model, variables, images):
    """Eval mode: (stage maps, pooled, logits) in one program."""
    def run(m, x):
        return m.stages(x), m.pooled(x), m.logits(x)
    return jax.jit(lambda v, x: model.apply(v, x, method=run))(variables, images)


@pytest.mark.parametrize("name", ["basic", "bottleneck"])
def test_torchvision_checkpoint_gives_reference_outputs(name):
    model, ref = model_of(name), outputs(name)
    variables, report = rw.load_variables(weights_path(name), model)
    assert set(variables) == {"params", "batch_stats"} and not report["adapted"]
    assert all(k.endswith("num_batches_tracked") for k in report["ignored"])
    maps, pooled, logits = forward(model, variables, jnp.asarray(ref["images"]))
    assert rel(logits, ref["logits"]) < TOL
    assert rel(pooled, ref["pooled"]) < TOL
    for i, m in enumerate(maps):  # the four stage maps, channels-last: 66 x 50 -> 17x13, 9x7, 5x4, 3x2
        assert m.shape == ref[f"map{i}"].shape and rel(m, ref[f"map{i}"]) < TOL, i


def test_timm_layout_is_torchvision_layout():
    """timm's resnet18 / resnet50 state dicts (keys and shapes recorded from timm) are exactly the key
    table the converter reads, so a timm file converts at full size; both libraries' are recorded."""
    with open(os.path.join(FIXTURES, "layouts.json")) as f:
        layouts = json.load(f)
    for depth in ("18", "50"):
        model = build("resnet", depth, num_classes=1000)
        table = {e.key: list(e.shape) for e in rw._entries(model, 3)}
        for lib in ("timm", "torchvision"):
            layout = layouts[f"{lib}/resnet{depth}"]
            assert {k: v for k, v in layout.items() if not k.endswith("num_batches_tracked")} == table, lib
    model = build("resnet", "18", num_classes=1000)
    sd = {k: np.broadcast_to(np.float32(0.5), s) for k, s in layouts["timm/resnet18"].items()}
    variables, _ = rw.resnet_from_torch(sd, model)
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)  # noqa: E731
    assert shapes(variables) == shapes(rw.abstract_variables(model, 3))


def test_adapt_input_conv_is_timms_rule():
    sd, ref = load_file(weights_path("basic")), outputs("basic")
    w = sd["conv1.weight"]
    for c in (1, 2, 4, 6):
        np.testing.assert_allclose(rw.adapt_input_conv(w, c), ref[f"adapt_{c}"], rtol=1e-6, atol=1e-7)
    assert np.array_equal(rw.adapt_input_conv(w, 3), w)
    # the stated rule, directly: bands cycle R, G, B, R and the kernel is scaled by 3 / 4
    np.testing.assert_array_equal(rw.adapt_input_conv(w, 4)[:, 3], w[:, 0] * np.float32(0.75))


def test_four_bands_through_the_adaptation_rule_match_the_reference():
    model, ref = model_of("basic", input_bands=("B2", "B3", "B4", "B8")), outputs("basic")
    variables, report = rw.load_variables(weights_path("basic"), model)
    assert report["adapted"] == {"conv1.weight": (3, 4)}
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 4, 8)
    maps, pooled, logits = forward(model, variables, jnp.asarray(ref["images4"]))
    assert rel(logits, ref["logits4"]) < TOL and rel(pooled, ref["pooled4"]) < TOL
    assert all(rel(m, ref[f"map{i}_4"]) < TOL for i, m in enumerate(maps))


def test_train_mode_uses_batch_statistics_and_updates_running_ones_as_torch():
    model, ref = model_of("basic"), outputs("basic")
    sd = load_file(weights_path("basic"))
    variables, _ = rw.load_variables(weights_path("basic"), model)
    images = jnp.asarray(ref["images"])
    # one forward pass (each pass in training moves the running statistics once)
    logits, new = jax.jit(lambda v, x: model.apply(v, x, train=True, method="logits", mutable=["batch_stats"]))(
        variables, images)
    assert rel(logits, ref["train_logits"]) < TOL
    assert rel(logits, ref["logits"]) > 0.01  # batch statistics, not the running ones

    # torch's updated running statistics, read through the same key table
    trained = {**sd, **{k[len("train_"):]: v for k, v in ref.items() if k.startswith("train_")
                        and k.endswith(("running_mean", "running_var"))}}
    want = traverse_util.flatten_dict(rw.resnet_from_torch(trained, model)[0]["batch_stats"])
    old = traverse_util.flatten_dict(variables["batch_stats"])
    got = traverse_util.flatten_dict(jax.tree.map(np.asarray, new["batch_stats"]))
    assert got.keys() == want.keys() == old.keys()
    b = images.shape[0]
    pixels = {"bn1": b * 33 * 25, **{f"layer{s + 1}": b * int(np.prod(ref[f"map{s}"].shape[1:3])) for s in range(4)}}
    for path in got:
        if path[-1] == "mean":  # momentum 0.1 of the batch mean
            np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
        else:  # torch adds the unbiased batch variance, flax the biased one (docs/fidelity.md)
            n = pixels[path[0].split("_")[0]]
            torch_batch = (want[path] - 0.9 * old[path]) / 0.1 * (n - 1) / n
            np.testing.assert_allclose((got[path] - 0.9 * old[path]) / 0.1, torch_batch, rtol=1e-4, atol=1e-5,
                                       err_msg=str(path))
    # evaluation reads the running statistics (the updated ones now) and changes nothing
    updated = {**variables, "batch_stats": new["batch_stats"]}
    assert rel(model.apply(updated, images, method="logits"), logits) > 0.01
    assert rel(model.apply(updated, images, method="logits"), ref["logits"]) > 1e-3


def test_bad_checkpoints_name_the_key():
    model = model_of("basic")
    sd = {k: np.asarray(v) for k, v in load_file(weights_path("basic")).items()}
    with pytest.raises(CheckpointMismatchError, match=r"missing in checkpoint: layer2\.0\.bn1\.running_var \(16,\)"):
        rw.resnet_from_torch({k: v for k, v in sd.items() if k != "layer2.0.bn1.running_var"}, model)
    bad = {**sd, "layer1.0.conv2.weight": np.zeros((8, 8, 3, 2), np.float32)}
    with pytest.raises(CheckpointMismatchError,
                       match=r"shape of layer1\.0\.conv2\.weight: checkpoint \(8, 8, 3, 2\) vs model \(8, 8, 3, 3\)"):
        rw.resnet_from_torch(bad, model)
    extra = {**sd, "layer5.0.conv1.weight": np.zeros((1,), np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"not in this model: layer5\.0\.conv1\.weight"):
        rw.resnet_from_torch(extra, model)
    assert "layer5.0.conv1.weight" in rw.resnet_from_torch(extra, model, strict=False)[1]["ignored"]
    with pytest.raises(CheckpointMismatchError, match=r"missing in checkpoint: fc\.weight \(10, 64\)"):
        rw.resnet_from_torch({k: v for k, v in sd.items() if not k.startswith("fc.")}, model)
    with pytest.raises(CheckpointMismatchError, match=r"shape of conv1\.weight: checkpoint \(8, 3, 7, 7\) vs model "
                                                      r"\(16, 3, 7, 7\)"):
        rw.resnet_from_torch(sd, model_of("basic").clone(width=16))
    headless, report = rw.resnet_from_torch({f"backbone.{k}": v for k, v in sd.items()}, model.clone(num_classes=0))
    assert "fc" not in headless["params"] and "classifier head" in report["ignored"]["backbone.fc.weight"]
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        rw.load_variables("nope.safetensors", model)


def test_export_round_trip_and_the_encoder_loader():
    model = model_of("bottleneck")
    sd = {k: np.asarray(v) for k, v in load_file(weights_path("bottleneck")).items()}
    variables, _ = rw.resnet_from_torch(sd, model)
    back = rw.resnet_to_torch(variables, model)
    assert back.keys() == sd.keys()
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
    # weights.common.load_encoder (what seg's config.init_from uses): params placed, statistics in the report
    abstract = rw.abstract_variables(model, 3)["params"]
    params, report = common.load_encoder(weights_path("bottleneck"), abstract, model)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, abstract)
    np.testing.assert_array_equal(report["batch_stats"]["layer3_5"]["bn2"]["var"], sd["layer3.5.bn2.running_var"])


def test_encoder_registry_strides_and_published_param_counts():
    enc = build("resnet", "18", input_bands=("B2", "B3", "B4", "B8"))
    x = jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32)
    variables = jax.eval_shape(enc.init, jax.random.key(0), x)
    maps = jax.eval_shape(lambda v, x: enc.apply(v, x), variables, x)
    assert [m.shape for m in maps] == [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256), (2, 2, 2, 512)]
    assert enc.strides == (4, 8, 16, 32) and enc.feature_dims == (64, 128, 256, 512) and enc.embed_dim == 512
    assert build("resnet", "50").feature_dims == (256, 512, 1024, 2048)
    # torchvision's counts (ResNet18_Weights / ResNet50_Weights num_params; without fc: minus 512*1000+1000,
    # 2048*1000+1000); BatchNorm running statistics: 2 per channel of every norm
    assert param_count(build("resnet", "18", num_classes=1000)) == {"params": 11_689_512, "batch_stats": 9_600}
    assert param_count(build("resnet", "18"))["params"] == 11_176_512
    assert param_count(build("resnet", "50", num_classes=1000))["params"] == 25_557_032
    assert param_count(build("resnet", "50"))["params"] == 23_508_032
    mu = build("resnet", "mu", input_bands=("B2", "B3", "B4", "B8"), layers=(1, 3))
    with pytest.raises(ValueError, match=r"images have 5 channels .* input_bands \('B2', 'B3', 'B4', 'B8'\) say 4"):
        jax.eval_shape(mu.init, jax.random.key(0), jnp.zeros((1, 32, 32, 5)))
    with pytest.raises(ValueError, match=r"layers \(0, 4\) must be stage indices in 0..3"):
        jax.eval_shape(mu.clone(layers=(0, 4)).init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="logits needs num_classes > 0"):
        v = jax.eval_shape(mu.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
        jax.eval_shape(lambda v: mu.apply(v, jnp.zeros((1, 32, 32, 4)), method="logits"), v)


def test_segmentation_model_on_resnet_keeps_encoder_statistics():
    """A seg model with a ResNet encoder: the encoder's BatchNorm statistics are model state beside the
    decoder's; the FCN head reads the last (stride-32) map, logits come back at the image size."""
    model = SegmentationModel(build("resnet", "mu", input_bands=("B2", "B3", "B4")), build_decoder("fcn", 3))
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x),
                               x)
    assert {"encoder", "decoder"} <= set(variables["batch_stats"])
    logits, new = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                          rngs={"dropout": jax.random.key(2)}), variables, x)
    assert logits.shape == (2, 64, 64, 3) and set(new["batch_stats"]) == {"encoder", "decoder"}
    assert nn.meta.unbox(variables)["params"]["encoder"]["layer4_0"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
