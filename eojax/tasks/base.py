"""The surface every family exposes to the one trainer (see docs/architecture.md)."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np


class NotApplicableError(ValueError):
    """A trainer feature that makes no sense for this task (e.g. Sophia-G without logits)."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a family's input gives its model, fixed before any model exists: `elements`, the
    per-example shape and dtype of every array the train step takes, and `info`, JSON-able facts
    about the data the model depends on (band names, statistics, class names, vocabulary size).
    The dummy batch that shapes and initialises the model comes from it; results.json records it."""

    elements: Mapping[str, tuple[tuple[int, ...], str]]
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((batch_size, *shape), np.dtype(dtype))
                for k, (shape, dtype) in self.elements.items()}

    def to_json(self) -> dict:
        elements = {k: {"shape": list(shape), "dtype": np.dtype(dtype).name} for k, (shape, dtype) in self.elements.items()}
        return {"elements": elements, "info": dict(self.info)}


def stats_info(stats) -> dict:
    """A BandStats (or None) as DataSpec info: per-band mean and std."""
    if stats is None:
        return {"mean": None, "std": None}
    return {"mean": [float(v) for v in stats.mean], "std": [float(v) for v in stats.std]}


def elements(**arrays) -> dict[str, tuple[tuple[int, ...], str]]:
    """DataSpec elements from keyword (shape, dtype) pairs, e.g. elements(weight=((), np.float32))."""
    return {k: (tuple(int(n) for n in shape), np.dtype(dtype).name) for k, (shape, dtype) in arrays.items()}


class Task:
    """Base class: a family subclasses it and fills in the model, the loss and its input.

    Build order: `data_spec()` first (it reads only what the config names: file headers, cached
    statistics, a vocabulary), then the model and the trainer's dummy batch from it; the input
    iterators may be built in any order after that."""

    name = "base"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # Input first (trainer phase 3): models may take their channel count from the data.
    def train_input(self, process_index: int, process_count: int) -> Iterator[dict]:
        raise NotImplementedError

    def eval_input(self, process_index: int, process_count: int) -> Iterable[dict] | None:
        return None

    def test_input(self, process_index: int, process_count: int) -> Iterable[dict] | None:
        """A held-out test split, evaluated once at the end on the best (or final) parameters."""
        return None

    def data_spec(self) -> DataSpec:
        """The input's DataSpec, built from the config alone (cheap to ask again: the facts behind it
        are cached)."""
        raise NotImplementedError

    @property
    def model(self):
        raise NotImplementedError

    def dummy_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the train step takes, as shapes: from the DataSpec."""
        return self.data_spec().batch(batch_size)

    def init(self, rng: jax.Array, batch: dict) -> dict:
        """Flax variables: {'params': ...} plus any mutable collections (e.g. 'batch_stats'), which the
        trainer keeps as the model state."""
        raise NotImplementedError

    def loss_fn(self, params, state, batch, rng, train: bool):
        """-> (loss, aux metrics, new model state). `state`: the mutable collections ({} for most
        models); a model without any returns it unchanged."""
        raise NotImplementedError

    def sampled_loss_fn(self, params, state, batch, rng):
        """(mean loss on labels sampled from the model's own logits, number of labels): Sophia-G."""
        raise NotApplicableError(
            f"optim.name='sophia_g' needs a model with logits (labels are sampled from them); "
            f"the '{self.name}' task has none. Use optim.name='sophia_h' or 'adamw'.")

    def eval_fn(self, params, state, batch, rng) -> dict[str, jax.Array]:
        raise NotImplementedError

    def finalize_eval(self, sums: dict[str, Any]) -> dict[str, float]:
        """`sums`: eval_fn's outputs summed over all eval batches (numpy, any shape).
        Default: every `<k>_sum` divided by `count`."""
        count = max(float(sums.get("count", 0.0)), 1e-12)
        return {k[:-4]: float(v) / count for k, v in sums.items() if k.endswith("_sum")}

    def load_pretrained(self, path: str, abstract_params):
        """Params from a published checkpoint (`config.init_from=<file or non-eojax folder>`), in this
        family's layout."""
        raise NotApplicableError(f"the '{self.name}' task imports no checkpoint files ({path}); "
                                 "config.init_from takes an eojax run folder here")

    def embed(self, params, state, batch) -> jax.Array:
        """(B, D) embedding per example, for `eojax export` (encoder families)."""
        raise NotApplicableError(f"the '{self.name}' task has no encoder embedding to export")

    def write_pictures(self, params, state, batch, workdir: str, step: int) -> list[str]:
        return []

    def infer(self, params, state, workdir: str, options: dict) -> dict:
        """`eojax infer`: the family's inference on the trained parameters; options has prompt (list),
        input, output, num_samples, seed. Returns a JSON-able summary."""
        raise NotApplicableError(f"the '{self.name}' task has no `eojax infer` entry point")

    def data_fingerprint(self) -> Any:
        """Something that identifies the training data (e.g. a hash of file names and sizes), recorded
        in results.json; None when the task cannot tell."""
        return None


def apply_model(model, params, state, *args, train: bool, **kwargs):
    """model.apply with the model state -> (output, new state). In training the mutable collections
    (BatchNorm's batch statistics) are updated; in eval they are only read."""
    variables = {"params": params, **state}
    if train and state:
        out, new_state = model.apply(variables, *args, train=True, mutable=list(state), **kwargs)
        return out, dict(new_state)
    return model.apply(variables, *args, train=train, **kwargs), state
