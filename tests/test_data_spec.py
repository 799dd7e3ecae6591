"""Every family states its input as a DataSpec before any model exists: the dummy batch that shapes
the model comes from it, it matches the batches the input really yields, results.json and
data_spec.json record it, and the family core is built from (config, spec) alone."""
import functools
import json

import jax
import numpy as np
import pytest
import rasterio

from eojax import tasks
from eojax.tasks.base import DataSpec, elements
from helpers import load_config

ONE = {"mesh": (("data", 1), ("fsdp", 1), ("model", 1)), "batch_size": 4}
FAMILIES = {
    "mae": ("mae", "runlocal", {}),
    "satmae": ("satmae", "runlocal", {}),
    "gridmae": ("gridmae", "runlocal", {}),
    "seg": ("seg", "encoder=mae,decoder=linear,mode=frozen,runlocal", {"input.num_crops": 8}),
    "vsat": ("vsat", "runlocal", {}),
    "diffusion": ("diffusion", "runlocal", {"input.synthetic_n": 16}),
    "geo": ("geo", "runlocal", {"input.num_windows": 16, "input.baseline_windows": 16}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spec_comes_first_and_matches_the_batches(family):
    name, arg, overrides = FAMILIES[family]
    config = load_config(name, arg, **ONE, **overrides)
    data = tasks.make_input(config)
    spec = data.spec()  # before any input iterator or model: no hidden build order
    assert isinstance(spec, DataSpec) and "weight" in spec.elements
    task = tasks.get(config, spec)
    dummy = task.dummy_batch(4)
    assert dummy == spec.batch(4)
    batch = next(iter(data.train(0, 1)))
    for key, shape in dummy.items():
        assert key in batch, f"{family}: the input yields no {key!r}"
        got = np.asarray(batch[key])
        assert got.shape == shape.shape and got.dtype == shape.dtype, (family, key, got.shape, got.dtype, shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_core_is_built_from_config_and_spec_alone(family, monkeypatch):
    """The spec survives JSON (results.json, data_spec.json); a core built from the read-back spec,
    with every Input method made to fail, gives the same parameters and the same loss."""
    name, arg, overrides = FAMILIES[family]
    config = load_config(name, arg, **ONE, **overrides)
    data = tasks.make_input(config)
    live = data.spec()
    batch = {k: np.asarray(v) for k, v in next(iter(data.train(0, 1))).items() if k in live.elements}
    read_back = DataSpec.from_json(json.loads(json.dumps(live.to_json())))
    assert read_back == live

    rng = jax.random.key(0)

    def loss_of(spec):
        task = tasks.get(config, spec)
        variables = dict(jax.jit(task.init)(rng, batch))
        params = variables.pop("params")
        loss = jax.jit(lambda p, s, b: task.loss_fn(p, s, b, jax.random.key(1), False)[0])(params, variables, batch)
        return jax.tree.map(np.shape, params), float(loss)

    live_shapes, live_loss = loss_of(live)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{family}: the core read the data")

    monkeypatch.setattr(rasterio, "open", refuse)
    for cls in type(data).__mro__[:-1]:
        for attr, value in vars(cls).items():
            if not attr.startswith("__") and (callable(value) or isinstance(value, (property, functools.cached_property))):
                monkeypatch.setattr(type(data), attr, refuse, raising=False)
    shapes, loss = loss_of(read_back)
    assert shapes == live_shapes and loss == live_loss and np.isfinite(loss)


def test_spec_batch_and_json():
    spec = DataSpec(elements(pixels=((3, 8, 8), np.uint16), weight=((), np.float32)), {"bands": ["B2", "B3", "B4"]})
    batch = spec.batch(5)
    assert batch["pixels"].shape == (5, 3, 8, 8) and batch["pixels"].dtype == np.uint16
    assert batch["weight"].shape == (5,) and batch["weight"].dtype == np.float32
    assert spec.to_json() == {"elements": {"pixels": {"shape": [3, 8, 8], "dtype": "uint16"},
                                           "weight": {"shape": [], "dtype": "float32"}},
                              "info": {"bands": ["B2", "B3", "B4"]}}
