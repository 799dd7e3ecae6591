"""The surface every family exposes to the one trainer (see docs/architecture.md)."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from eojax import zoo
from eojax.data.stats import BandStats


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

    @classmethod
    def from_json(cls, record: Mapping) -> "DataSpec":
        """The inverse of to_json (e.g. a run's data_spec.json)."""
        return cls({k: (tuple(e["shape"]), e["dtype"]) for k, e in record["elements"].items()},
                   dict(record.get("info", {})))


def stats_info(stats) -> dict:
    """A BandStats (or None) as DataSpec info: per-band mean and std."""
    if stats is None:
        return {"mean": None, "std": None}
    return {"mean": [float(v) for v in stats.mean], "std": [float(v) for v in stats.std]}


def elements(**arrays) -> dict[str, tuple[tuple[int, ...], str]]:
    """DataSpec elements from keyword (shape, dtype) pairs, e.g. elements(weight=((), np.float32))."""
    return {k: (tuple(int(n) for n in shape), np.dtype(dtype).name) for k, (shape, dtype) in arrays.items()}


class Input:
    """A family's input stage: reads what the config names (file headers, cached statistics, a
    vocabulary), states it as a DataSpec, and makes the split iterators. It holds the data; the Task,
    built from (config, spec) alone, never touches it."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self._spec = None

    def spec(self) -> DataSpec:
        """The DataSpec (built once, by build_spec)."""
        if self._spec is None:
            self._spec = self.build_spec()
        return self._spec

    def build_spec(self) -> DataSpec:
        """The DataSpec from what the config names: file headers, cached statistics, a vocabulary;
        no iterator runs before it."""
        raise NotImplementedError

    def train(self, process_index: int, process_count: int) -> Iterator[dict]:
        """A checkpointable iterator of host-local numpy batches."""
        raise NotImplementedError

    def eval(self, process_index: int, process_count: int) -> Iterable[dict] | None:
        return None

    def test(self, process_index: int, process_count: int) -> Iterable[dict] | None:
        """A held-out test split, evaluated once at the end on the best (or final) parameters."""
        return None

    def fingerprint(self) -> Any:
        """Something that identifies the training data (e.g. a hash of file names and sizes), recorded
        in results.json; None when the input cannot tell."""
        return None


class SplitInput(Input):
    """An Input whose train / eval / test streams are its 'train' / 'val' / 'test' splits, each made
    by `_input(split, process_index, process_count)` (None for a split the data lacks)."""

    def _input(self, split: str, process_index: int, process_count: int):
        raise NotImplementedError

    def train(self, process_index, process_count):
        return self._input("train", process_index, process_count)

    def eval(self, process_index, process_count):
        return self._input("val", process_index, process_count)

    def test(self, process_index, process_count):
        return self._input("test", process_index, process_count)


class Task:
    """A family's core: the model, its loss and its evaluation, built from (config, spec) and
    stateless (every method is a pure function of its arguments, the config and the spec).

    `input_class` names the family's Input. `plugins` names its optional extras as "module:function"
    (imported when used; see `plugin`):
      'pictures': fn(run, variables, batch, workdir, step) -> list of written files
      'infer':    fn(run, variables, workdir, options) -> JSON-able summary   (`eojax infer`)
      'export':   fn(run, variables, workdir, options) -> list of written files (`eojax export`)
    `variables` is (params, model_state) as train.eval_variables gives them."""

    name = "base"
    input_class: ClassVar[type[Input]] = Input
    plugins: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: ml_collections.ConfigDict, spec: DataSpec):
        self.config, self.spec = config, spec

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Config mistakes as one-line errors, before any data is read (the trainer calls it first)."""

    @property
    def model(self):
        raise NotImplementedError

    def dummy_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the train step takes, as shapes: from the DataSpec."""
        return self.spec.batch(batch_size)

    def init(self, rng: jax.Array, batch: dict) -> dict:
        """Flax variables: {'params': ...} plus any mutable collections (e.g. 'batch_stats'), which the
        trainer keeps as the model state."""
        raise NotImplementedError

    def loss_fn(self, params, state, batch, rng, train: bool):
        """-> (loss, aux metrics, new model state). `state`: the mutable collections ({} for most
        models); a model without any returns it unchanged."""
        raise NotImplementedError

    def sampled_loss_fn(self, params, state, batch, rng):
        """(mean loss on labels sampled from the model's own logits, number of labels): Sophia-G.
        A family without logits leaves it out (the trainer then refuses optim.name='sophia_g')."""
        raise NotImplementedError

    def eval_fn(self, params, state, batch, rng) -> dict[str, jax.Array]:
        raise NotImplementedError

    def finalize_eval(self, sums: dict[str, Any]) -> dict[str, float]:
        """`sums`: eval_fn's outputs summed over all eval batches (numpy, any shape), except those named
        `<k>_rows`: one row per example, concatenated over the batches (padding rows included: give their
        weights as another `_rows` output), for statistics that are not sums (KID's kernel means).
        Default: every `<k>_sum` divided by `count`."""
        count = max(float(sums.get("count", 0.0)), 1e-12)
        return {k[:-4]: float(v) / count for k, v in sums.items() if k.endswith("_sum")}

    def load_pretrained(self, path: str, init_params):
        """Params from a published checkpoint (`config.init_from=<file or non-eojax folder>`), in this
        family's layout."""
        raise NotApplicableError(f"the '{self.name}' task imports no checkpoint files ({path}); "
                                 "config.init_from takes an eojax run folder here")

    def load_pretrained_variables(self, path: str, init_params, init_model_state):
        """(params, model_state) from a published checkpoint: what weights.load calls. By default
        load_pretrained's params and the model state as initialised; a family whose files also carry
        model state (a torchvision ResNet's BatchNorm running statistics) overrides it."""
        return self.load_pretrained(path, init_params), init_model_state

    def pretrained_parts(self) -> dict[str, str]:
        """{top-level params subtree: published source} loaded over the initialised params besides
        config.init_from (e.g. a frozen text encoder), each by `load_pretrained_part`."""
        return {}

    def load_pretrained_part(self, subtree: str, source: str, init_params):
        raise NotImplementedError

    def load_pretrained_part_variables(self, subtree: str, source: str, init_params, init_model_state):
        """(the subtree's params, model_state): load_pretrained_part's params and the state as
        initialised; a family whose part carries model state (a ResNet's statistics) overrides it."""
        return self.load_pretrained_part(subtree, source, init_params), init_model_state


def load_pretrained_parts(task: Task, params, model_state) -> tuple[Any, Any]:
    """(params, model_state) with every `task.pretrained_parts()` subtree loaded over them (a source
    may be a zoo name or hf:// URL: eojax.zoo.resolve)."""
    for subtree, source in task.pretrained_parts().items():
        source = zoo.resolve(source, f"the {subtree} weights")
        part, model_state = task.load_pretrained_part_variables(subtree, source, params[subtree], model_state)
        params = {**params, subtree: part}
    return params, model_state


def plugin(task: Task, kind: str):
    """The family's `kind` plug-in ('pictures', 'infer', 'export') as a function, or None."""
    target = task.plugins.get(kind)
    if target is None:
        return None
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def require_plugin(task: Task, kind: str, command: str):
    fn = plugin(task, kind)
    if fn is None:
        raise NotApplicableError(f"the '{task.name}' task has no `{command}` entry point (it registers no "
                                 f"{kind!r} plug-in)")
    return fn


def stats_from_info(info: Mapping):
    """DataSpec info (stats_info's mean / std) -> a BandStats, or None without statistics."""
    if info.get("mean") is None:
        return None
    mean = np.asarray(info["mean"], np.float64)
    return BandStats(mean=mean, std=np.asarray(info["std"], np.float64), count=np.zeros(len(mean), np.int64),
                     band_names=list(info.get("band_names") or []))


def apply_model(model, params, state, *args, train: bool, **kwargs):
    """model.apply with the model state -> (output, new state). In training the mutable collections
    (BatchNorm's batch statistics) are updated; in eval they are only read."""
    variables = {"params": params, **state}
    if train and state:
        out, new_state = model.apply(variables, *args, train=True, mutable=list(state), **kwargs)
        return out, dict(new_state)
    return model.apply(variables, *args, train=train, **kwargs), state
