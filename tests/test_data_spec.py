"""Every family states its input as a DataSpec before any model exists: the dummy batch that shapes
the model comes from it, it matches the batches the input really yields, and results.json records it."""
import json

import numpy as np
import pytest

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
    task = tasks.get(load_config(name, arg, **ONE, **overrides))
    spec = task.data_spec()  # before any input iterator or model: no hidden build order
    assert isinstance(spec, DataSpec) and "weight" in spec.elements
    json.dumps(spec.to_json())  # serialisable, as results.json records it
    dummy = task.dummy_batch(4)
    assert dummy == spec.batch(4)
    batch = next(iter(task.train_input(0, 1)))
    for key, shape in dummy.items():
        assert key in batch, f"{family}: the input yields no {key!r}"
        got = np.asarray(batch[key])
        assert got.shape == shape.shape and got.dtype == shape.dtype, (family, key, got.shape, got.dtype, shape)


def test_spec_batch_and_json():
    spec = DataSpec(elements(pixels=((3, 8, 8), np.uint16), weight=((), np.float32)), {"bands": ["B2", "B3", "B4"]})
    batch = spec.batch(5)
    assert batch["pixels"].shape == (5, 3, 8, 8) and batch["pixels"].dtype == np.uint16
    assert batch["weight"].shape == (5,) and batch["weight"].dtype == np.float32
    assert spec.to_json() == {"elements": {"pixels": {"shape": [3, 8, 8], "dtype": "uint16"},
                                           "weight": {"shape": [], "dtype": "float32"}},
                              "info": {"bands": ["B2", "B3", "B4"]}}
