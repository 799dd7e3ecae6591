"""THE trainer: every family trains through `train_and_evaluate`.

It runs the phases of docs/architecture.md in order and knows nothing about any one family: the
family's input stage gives the data and its DataSpec, the task built from (config, spec) the model and
the loss, and the plug-ins the pictures.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import operator
import os
import re
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eojax import checkpoint as ckpt_lib
from eojax import config_lib, errors, lora, metric_writer, optim, parallel, tasks, viz, weights, zoo
from eojax.models import layers


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds. `model_state`: the model's mutable collections besides 'params' (e.g.
    BatchNorm's {'batch_stats': ...}; {} for most models), updated by the train step and used by eval.
    `ema_model_state`: their exponential moving average when optim.ema_decay > 0, else {}.
    `lora`: with config.lora, {'adapters': the low-rank adapters (eojax.lora), 'scale': alpha / rank};
    `params` is then the frozen base and the optimizer trains the adapters only. {} without."""
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    ema_model_state: Any
    lora: Any = flax.struct.field(default_factory=dict)


def trainable(state: TrainState):
    """The tree the optimizer updates: the adapters of a LoRA run, else the params."""
    return state.lora["adapters"] if state.lora else state.params


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Run:
    """Everything set up for training, before the loop (phases 2-5). Tests drive it step by step.
    The input stage and its train iterator are made when first used: a run set up from a saved
    DataSpec (`eojax infer` / `export`) never reads the training data."""
    config: ml_collections.ConfigDict
    task: tasks.Task
    mesh: Mesh
    rules: tuple
    optimizer: optim.Optimizer
    state_shardings: Any
    batch_shardings: Any
    abstract_state: Any
    init_state: Callable[[], TrainState]
    init_opt_state: Callable[[Any], Any]
    train_step: Callable[..., tuple[TrainState, dict]]  # (state, batch, hessian_batch=None)
    eval_step: Callable[[Any, Any, dict], dict]
    flops_per_step: float
    jit_step: Any  # the jitted train step, for lowering / compiling it (FLOP count, benches)
    lora: lora.Settings | None = None
    merge_adapters: Callable[[Any, Any, Any], Any] | None = None  # (base, adapters, scale) -> params, jitted
    _input: tasks.Input | None = None
    _train_iter: Any = None

    @property
    def input(self) -> tasks.Input:
        if self._input is None:
            self._input = tasks.make_input(self.config)
        return self._input

    @property
    def train_iter(self):
        if self._train_iter is None:
            self._train_iter = self.input.train(jax.process_index(), jax.process_count())
        return self._train_iter

    def lower_step(self):
        """The train step lowered for this run's shapes and shardings."""
        batches = (self.abstract_batch(),) * (2 if self.optimizer.hessian_batch_every else 1)
        with self.scope():
            return self.jit_step.lower(self.abstract_state, *batches)

    def compile_step(self):
        """The compiled train step (a jax.stages.Compiled: its memory_analysis() and cost_analysis()
        describe one device's program)."""
        return self.lower_step().compile()

    def scope(self):
        """Where this run's programs are traced: its mesh, logical-axis rules and kernel set."""
        return scope(self.mesh, self.rules, self.config.kernels)

    def abstract_batch(self) -> dict:
        """The global batch the train step takes, as ShapeDtypeStructs with their shardings."""
        dummy = self.task.dummy_batch(self.config.batch_size)
        return {k: jax.ShapeDtypeStruct(dummy[k].shape, dummy[k].dtype, sharding=self.batch_shardings[k])
                for k in self.batch_shardings}

    def global_batch(self, local_batch: dict) -> dict:
        """Host-local rows -> global arrays, keeping only what the task's step takes (not e.g. window
        positions)."""
        local = {k: local_batch[k] for k in self.batch_shardings}
        return parallel.make_global_batch(local, self.mesh, self.rules)

    def next_batch(self) -> dict:
        return self.global_batch(next(self.train_iter))


@contextlib.contextmanager
def scope(mesh: Mesh, rules, kernels: str):
    """The mesh, the logical-axis rules and the kernel set (`config.kernels`, models.layers.kernels:
    'auto' takes the XLA:CPU-tuned custom VJPs on CPU meshes, plain jax/flax elsewhere) in force while
    a run's programs are traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), layers.kernels(kernels, mesh.devices.flat[0].platform):
        yield


def _host_batch_size(config) -> int:
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    return config.batch_size // jax.process_count()


def setup(config: ml_collections.ConfigDict, devices=None, spec: tasks.DataSpec | None = None) -> Run:
    """Phases 2-5: mesh, input, task, sharded init, optimizer, compiled steps. With `spec` (a run's
    saved DataSpec) the task is built without reading any data. Weights named by a zoo name or an
    hf:// URL (zoo.SOURCE_KEYS) are fetched and checked first; the Run's config holds their paths."""
    config = zoo.resolve_config(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.normalize_rules(config.sharding_rules)
    split = parallel.batch_axis_size(mesh, rules)
    if config.batch_size % split:
        raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of the {split} ways "
                         f"the batch is split over the mesh {dict(mesh.shape)}")

    # Config mistakes first, before any data is read.
    tasks.task_class(config).check_config(config)
    optimizer = optim.build(config.optim, config.total_steps)
    lora_settings = lora.settings(config)
    if "sampled_obj_fn" in optimizer.needs:
        _check_sampled_loss(tasks.task_class(config))

    data_input = train_iter = None
    if spec is None:  # the input's shapes and facts first: headers, cached statistics, vocabulary
        data_input = tasks.make_input(config)
        spec = data_input.spec()
        train_iter = data_input.train(jax.process_index(), jax.process_count())
    task = tasks.get(config, spec)

    accum = int(config.optim.get("accum_steps", 1))
    if config.batch_size % (accum * split):
        raise ValueError(f"config.batch_size={config.batch_size} must split into optim.accum_steps={accum} "
                         f"micro-batches that each divide over {split} batch shards")

    dummy = task.dummy_batch(config.batch_size)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)

    def init_variables(r):
        """task.init's flax variables: {'params': ..., and any mutable collections}."""
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dummy)
        variables = dict(task.init(r, zeros))
        if "params" not in variables:
            raise TypeError(f"task '{task.name}': init must return flax variables {{'params': ..., ...}}, "
                            f"got keys {sorted(variables)}")
        return variables

    with scope(mesh, rules, config.kernels):
        boxed = jax.eval_shape(init_variables, init_rng)
    variable_shardings = parallel.logical_shardings(boxed, mesh, rules)
    param_shardings = variable_shardings.pop("params")
    model_state_shardings = variable_shardings  # unboxed statistics are replicated
    abstract_variables = nn.meta.unbox(boxed)
    abstract_params = abstract_variables.pop("params")
    replicated = NamedSharding(mesh, P())
    # LoRA: the adapters are small (rank x (d_in + d_out) per kernel), so they are replicated; the
    # optimizer is built over them alone. Their key is folded from the init key, which the model's init
    # still gets whole: a run's base params are the same with or without config.lora.
    lora_rng = jax.random.fold_in(init_rng, 0x4C6F5241)
    abstract_lora = (jax.eval_shape(lambda p: lora.new_state(p, lora_rng, lora_settings), abstract_params)
                     if lora_settings else {})
    lora_shardings = jax.tree.map(lambda _: replicated, abstract_lora)
    abstract_trainable = abstract_lora["adapters"] if lora_settings else abstract_params
    trainable_shardings = lora_shardings["adapters"] if lora_settings else param_shardings
    abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_trainable)
    opt_shardings = parallel.follow_params(abstract_opt, abstract_trainable, trainable_shardings, mesh)
    ema_shardings = model_state_shardings if optimizer.keeps_ema else {}
    state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                                 model_state=model_state_shardings, ema_model_state=ema_shardings,
                                 lora=lora_shardings)
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                                opt_state=abstract_opt, model_state=abstract_variables,
                                ema_model_state=abstract_variables if optimizer.keeps_ema else {},
                                lora=abstract_lora)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)

    def create_state(r):
        variables = nn.meta.unbox(init_variables(r))
        params = variables.pop("params")
        adapters = lora.new_state(params, lora_rng, lora_settings) if lora_settings else {}
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, model_state=variables,
                           ema_model_state=variables if optimizer.keeps_ema else {}, lora=adapters)
        return state.replace(opt_state=optimizer.tx.init(trainable(state)))

    jit_create = jax.jit(create_state, out_shardings=state_shardings)
    jit_opt_init = jax.jit(optimizer.tx.init, out_shardings=opt_shardings)
    merge_adapters = jax.jit(lora.merge, out_shardings=param_shardings) if lora_settings else None

    def init_opt_state(trainable_tree):
        """A fresh optimizer state for `trainable(state)`."""
        with scope(mesh, rules, config.kernels):
            return jit_opt_init(trainable_tree)

    def init_state():
        with scope(mesh, rules, config.kernels):
            lowered = jit_create.lower(init_rng)
            # Init runs once: on CPU, optimising its program costs more time than running it.
            options = {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else {}
            return lowered.compile(compiler_options=options)(init_rng)

    batch_shardings = parallel.global_batch_shardings(dummy, mesh, rules)
    step_fn = _make_train_step(task, optimizer, accum, step_rng, lora_settings)
    batches = (batch_shardings,) * (2 if optimizer.hessian_batch_every else 1)
    jit_step = jax.jit(step_fn, in_shardings=(state_shardings, *batches),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    jit_eval = jax.jit(lambda params, model_state, batch: task.eval_fn(params, model_state, batch, step_rng),
                       in_shardings=(param_shardings, model_state_shardings, batch_shardings),
                       out_shardings=replicated)

    def train_step(state, batch, hessian_batch=None):
        """`hessian_batch`: the fresh batch of a Hessian refresh (optimizer.takes_hessian_batch);
        other steps of such an optimizer estimate nothing and are given the step's own batch."""
        extra = (batch if hessian_batch is None else hessian_batch,) if optimizer.hessian_batch_every else ()
        with scope(mesh, rules, config.kernels):
            return jit_step(state, batch, *extra)

    def eval_step(params, model_state, batch):
        with scope(mesh, rules, config.kernels):
            return jit_eval(params, model_state, batch)

    run = Run(config=config, task=task, mesh=mesh, rules=rules, optimizer=optimizer,
              state_shardings=state_shardings, batch_shardings=batch_shardings, abstract_state=abstract_state,
              init_state=init_state, init_opt_state=init_opt_state, train_step=train_step,
              eval_step=eval_step, flops_per_step=0.0, jit_step=jit_step, lora=lora_settings,
              merge_adapters=merge_adapters, _input=data_input, _train_iter=train_iter)
    run.flops_per_step = _flops_per_step(run)
    return run


def _check_sampled_loss(task_class) -> None:
    if task_class.sampled_loss_fn is tasks.Task.sampled_loss_fn:
        raise tasks.NotApplicableError(
            f"optim.name='sophia_g' needs a model with logits (labels are sampled from them); the "
            f"'{task_class.name}' task has none. Use optim.name='sophia_h' or 'adamw'.")


def _make_train_step(task, optimizer, accum: int, base_rng, lora_settings: lora.Settings | None = None):
    """One optimizer step; with accum > 1, gradients are summed over micro-batches by lax.scan (the
    model state, e.g. BatchNorm statistics, is carried through the micro-batches in order).

    The step differentiates `trainable(state)`; every loss sees the model's params through `with_params`:
    the params themselves, or with LoRA the frozen base with the adapters applied (eojax.lora.apply)."""

    def train_step(state: TrainState, batch: dict, hessian_batch: dict | None = None):
        rng = jax.random.fold_in(base_rng, state.step)

        def with_params(fn, t, r):
            """fn(the model's params) for the trainable tree `t`; r: the randomness of this loss."""
            if lora_settings is None:
                return fn(t)
            return lora.apply(fn, state.params, t, state.lora["scale"], lora_settings.dropout, r)

        current = trainable(state)
        # Only the parameters that train are differentiated: a frozen subtree (SD's VAE and CLIP) is a
        # constant of the step, and its zero gradient is made once for the optimizer, never accumulated.
        frozen = optimizer.frozen(current) if optimizer.frozen and lora_settings is None else None
        live = optim.without_frozen(frozen, current)
        fixed = None if frozen is None else optim.without_frozen(jax.tree.map(operator.not_, frozen), current)

        def loss_and_grads(t, model_state, batch, rng):
            def loss(t):
                whole = optim.fill_frozen(frozen, t, fixed)
                value, aux, new_state = with_params(
                    lambda p: task.loss_fn(p, model_state, batch, rng, True), whole, rng)
                return value, (aux, new_state)

            (value, (aux, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(t)
            return value, aux, grads, new_state

        if accum == 1:
            loss, aux, grads, model_state = loss_and_grads(live, state.model_state, batch, rng)
        else:
            # Row j*accum + i goes to micro-batch i, so every device holds a share of each micro-batch.
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

            def body(carry, xs):
                sums, model_state = carry
                i, mb = xs
                *out, model_state = loss_and_grads(live, model_state, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, sums, tuple(out)), model_state), None

            shapes = jax.eval_shape(loss_and_grads, live, state.model_state,
                                    jax.tree.map(lambda x: x[0], micro), rng)
            zero = jax.tree.map(jnp.zeros_like, shapes[:3])
            (total, model_state), _ = jax.lax.scan(body, (zero, state.model_state), (jnp.arange(accum), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / accum, total)

        if frozen is not None:
            grads = optim.fill_frozen(frozen, grads, jax.tree.map(jnp.zeros_like, fixed))
        extra = {}
        if "obj_fn" in optimizer.needs:
            extra["obj_fn"] = lambda t: with_params(
                lambda p: task.loss_fn(p, state.model_state, batch, rng, True)[0], t, rng)
        if "sampled_obj_fn" in optimizer.needs:
            sampled = batch if hessian_batch is None else hessian_batch
            extra["sampled_obj_fn"] = lambda t, r: with_params(
                lambda p: task.sampled_loss_fn(p, state.model_state, sampled, r), t, r)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, current, **extra)
        new = optax.apply_updates(current, updates)
        ema_model_state = optimizer.average_model_state(state.ema_model_state, model_state, state.opt_state)
        metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
                   "lr": optimizer.schedule(state.step), **optimizer.diagnostics(opt_state, new)}
        # A LoRA step returns the base params as it got them (donated: the same buffers, bit-identical).
        updated = dict(params=new) if lora_settings is None else dict(lora={**state.lora, "adapters": new})
        return state.replace(step=state.step + 1, opt_state=opt_state, model_state=model_state,
                             ema_model_state=ema_model_state, **updated), metrics

    return train_step


def _flops_per_step(run: Run) -> float:
    """Model FLOPs of one step: the task's analytic count if it has one, else XLA's count of the program."""
    per_example = getattr(run.task, "train_flops_per_example", None)
    if per_example is not None:
        return float(per_example()) * run.config.batch_size
    cost = run.lower_step().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def evaluate(run: Run, variables: tuple, split: str = "eval") -> dict[str, float]:
    """eval_fn summed over the split's batches (arrays of any shape, e.g. a confusion matrix, summed
    elementwise in float64; `<k>_rows` outputs concatenated instead; eval_step's outputs are global, so
    they cover every host), then finalize_eval. `variables`: (params, model_state), as `eval_variables`
    gives them. `eval_steps` limits the eval split only: a test split is always read whole."""
    make = run.input.eval if split == "eval" else run.input.test
    data = make(jax.process_index(), jax.process_count())
    if data is None:
        return {}
    sums: dict[str, np.ndarray] = {}
    for i, local in enumerate(data):
        if split == "eval" and run.config.eval_steps and i >= run.config.eval_steps:
            break
        out = jax.device_get(run.eval_step(*variables, run.global_batch(local)))
        for k, v in out.items():
            v = np.asarray(v, np.float64)
            if k not in sums:
                sums[k] = v
            else:
                sums[k] = np.concatenate([sums[k], v]) if k.endswith("_rows") else sums[k] + v
    return run.task.finalize_eval(sums) if sums else {}


def eval_variables(run: Run, state: TrainState) -> tuple:
    """(params, model_state) to evaluate and sample with: their EMAs when optim.ema_decay > 0; a LoRA run's
    base params with its adapters (their EMA) merged in."""
    model_state = state.ema_model_state if run.optimizer.keeps_ema else state.model_state
    params = run.optimizer.eval_params(trainable(state), state.opt_state)
    if state.lora:
        with run.scope():
            params = run.merge_adapters(state.params, params, state.lora["scale"])
    return params, model_state


class BestKeeper:
    """Keeps the parameters of the best eval so far (`config.best_metric`) in <workdir>/best."""

    def __init__(self, config, workdir: str):
        self.metric, self.mode = config.best_metric, config.best_mode
        if self.mode not in ("max", "min"):
            raise ValueError(f"config.best_mode={self.mode!r} must be 'max' or 'min'")
        self.directory = os.path.join(workdir, "best")
        self.record_path = os.path.join(self.directory, "best.json")
        self.record = None
        if self.metric and os.path.exists(self.record_path):  # a resumed run remembers its best
            with open(self.record_path) as f:
                self.record = json.load(f)

    def update(self, step: int, metrics: dict, variables: tuple) -> bool:
        if not self.metric:
            return False
        if self.metric not in metrics:
            raise KeyError(f"config.best_metric={self.metric!r} is not an eval metric; "
                           f"eval gives {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.record is not None:
            better = value > self.record["value"] if self.mode == "max" else value < self.record["value"]
            if not better:
                return False
        keeper = ckpt_lib.Checkpointer(self.directory, keep=1, async_save=False)
        params, model_state = variables
        saved = keeper.save(step, {"params": params, "model_state": model_state}, force=True)
        keeper.close()
        if not saved:  # non-finite parameters are never kept
            return False
        self.record = {"step": step, "metric": self.metric, "value": value}
        if jax.process_index() == 0:
            with open(self.record_path, "w") as f:
                json.dump(self.record, f)
        return True

    def variables(self, abstract_state: TrainState):
        """The best (params, model_state), or None when no best was kept."""
        if self.record is None:
            return None
        return ckpt_lib.load_variables(self.directory, abstract_state.params, abstract_state.model_state)


def restore_or_init(run: Run, checkpointer: ckpt_lib.Checkpointer) -> TrainState:
    """Phase 6: this workdir's latest checkpoint, else `config.init_from`, else scratch."""
    step, state = checkpointer.restore_latest_intact(run.abstract_state, run.train_iter)
    if step is not None:  # the newest intact step (damaged newer ones are skipped, with a warning)
        logging.info("resuming from %s/%d", checkpointer.directory, step)
        if run.lora and float(state.lora["scale"]) != float(np.float32(run.lora.scale)):
            raise errors.CheckpointError(
                f"{checkpointer.directory}/{step} trained LoRA adapters with alpha / rank = "
                f"{float(state.lora['scale']):g}; config.lora gives {run.lora.scale:g}: keep config.lora.alpha")
        return state
    state = run.init_state()
    parts = run.task.pretrained_parts()
    if run.config.init_from or parts:
        params, model_state = state.params, state.model_state
        if run.config.init_from:
            params, model_state = weights.load(params, run.config.init_from, run.task, model_state)
        params, model_state = tasks.load_pretrained_parts(run.task, params, model_state)
        # A fresh optimizer state for the loaded params (an EMA must start from them, not the init).
        state = state.replace(params=params, model_state=model_state,
                              ema_model_state=model_state if run.optimizer.keeps_ema else {})
        state = state.replace(opt_state=run.init_opt_state(trainable(state)))
    return state


def _debug_kill(step: int, checkpointer: ckpt_lib.Checkpointer, during_save: bool) -> None:
    """Test hook: SIGKILL this process at a chosen step (EOJAX_DEBUG_SIGKILL_AT_STEP), optionally
    while a checkpoint is still being written (EOJAX_DEBUG_SIGKILL_DURING_SAVE)."""
    var = "EOJAX_DEBUG_SIGKILL_DURING_SAVE" if during_save else "EOJAX_DEBUG_SIGKILL_AT_STEP"
    if os.environ.get(var) == str(step):
        if not during_save:
            checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)


PREEMPTED_EXIT_CODE = errors.PREEMPTED  # 75, EX_TEMPFAIL: run the same command again to resume


class Preempted(SystemExit):
    """The run stopped on SIGTERM / SIGINT (or the cluster's preemption notice) after saving the step
    it had reached; running the same command again resumes from it. Exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, directory: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.directory = step, directory
        self.message = (f"preempted: stopped after step {step}, saved in {directory}; run the same command "
                        "again to resume")


class StopSignals:
    """SIGTERM and SIGINT ask the training loop to stop at the next step boundary, where it saves.
    A single process notes the signal itself. In a multi-process run JAX's preemption service (which
    owns SIGTERM there, and gets SIGINT forwarded) makes all processes agree on the step to stop at."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            wanted = {signal.SIGINT: self._note if not self._multi else self._forward}
            if not self._multi:
                wanted[signal.SIGTERM] = self._note
            for sig, handler in wanted.items():
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.received = signal.Signals(signum).name
        logging.warning("%s received: stopping after this step, once its checkpoint is saved", self.received)

    def _forward(self, signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None


class WorkdirLock:
    """<workdir>/eojax.lock (host, pid, process start, time) while a run trains there: a second trainer
    is refused, naming the holder; a lock left by a dead process of this host is taken over with a
    warning. In a multi-process run process 0 holds it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "eojax.lock")
        self.held = False

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not _is_dead(holder):
                    raise WorkdirLockedError(
                        f"{os.path.dirname(self.path)} is in use by another eojax run (host {holder.get('host')}, "
                        f"pid {holder.get('pid')}, since {holder.get('since')}); wait for it, or delete "
                        f"{self.path} if that run is gone")
                logging.warning("taking over %s, left by %s", self.path, holder or "an unreadable lock")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirLockedError(f"could not take {self.path}: another run took it at the same moment")

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


class WorkdirLockedError(RuntimeError):
    pass


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_dead(holder: dict) -> bool:
    """Whether the lock's process is gone (only knowable on this host)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return holder.get("start") is not None and _process_start(pid) != holder.get("start")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config.task` in `workdir`; returns the final train and eval metrics. Raises Preempted
    (a SystemExit with PREEMPTED_EXIT_CODE) after saving, on SIGTERM / SIGINT."""
    config_lib.validate(config)
    parallel.maybe_initialize_distributed(**config.distributed)
    with WorkdirLock(workdir), StopSignals() as stop, contextlib.ExitStack() as cleanup:
        return _train(config, workdir, stop, cleanup)


def _train(config, workdir: str, stop: StopSignals, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    if config.init_from and not zoo.is_remote(config.init_from) and "://" not in config.init_from \
            and not os.path.exists(config.init_from):
        raise errors.CheckpointError(f"config.init_from={config.init_from!r} does not exist")
    run = setup(config)
    if jax.process_index() == 0:
        # Once the lock is held and the config has passed setup's checks: a refused run overwrites nothing.
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state))
        config_lib.disk_check(workdir, size, config.keep_checkpoints)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, every=config.checkpoint_every,
        restart_from_scratch_if_corrupt=config.get("restart_from_scratch_if_corrupt", False))
    cleanup.callback(checkpointer.close)  # on any exit: pending saves finish, no thread outlives the run
    writer = metric_writer.MetricWriter(workdir, wandb=config.get("wandb"), config=config)
    cleanup.callback(writer.close)
    save_spec(run.task.spec, workdir)
    best = BestKeeper(config, workdir)
    state = restore_or_init(run, checkpointer)
    first_step = int(state.step)
    peak = metric_writer.peak_flops_per_device(config.peak_tflops)
    total_peak = peak * (jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count())

    progress = _progress(config, first_step)
    cleanup.callback(progress.close)
    pending_losses, last = [], {}
    tick, steps_since = time.perf_counter(), 0
    for step in range(first_step + 1, config.total_steps + 1):
        _debug_kill(step, checkpointer, during_save=False)
        # A Hessian refresh's fresh batch comes first, as in the official Sophia loop.
        hessian = run.next_batch() if run.optimizer.takes_hessian_batch(step - 1) else None
        state, metrics = run.train_step(state, run.next_batch(), hessian)
        pending_losses.append(metrics["loss"])
        steps_since += 1
        progress.update(1)
        is_last = step == config.total_steps
        preempted = stop.stop_at(step)
        saving = is_last or preempted or (config.checkpoint_every and step % config.checkpoint_every == 0)
        if saving or step % config.log_every == 0:
            _stop_if_nonfinite(pending_losses, step, checkpointer)
            pending_losses = []
        if step % config.log_every == 0 or is_last or preempted:
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - tick
            last["examples_per_sec"] = steps_since * config.batch_size / elapsed
            if run.flops_per_step:
                last["mfu"] = run.flops_per_step * steps_since / elapsed / total_peak
            writer.write(step, last)
            progress.set_postfix(loss=f"{last['loss']:.4g}")
            tick, steps_since = time.perf_counter(), 0
        if saving:
            checkpointer.save(step, state, run.train_iter, force=is_last or preempted)
            _debug_kill(step, checkpointer, during_save=True)
        if preempted:
            checkpointer.wait()
            raise Preempted(step, checkpointer.directory)
        if config.eval_every and step % config.eval_every == 0 and not is_last:
            variables = eval_variables(run, state)
            metrics = evaluate(run, variables)
            writer.write(step, metrics, prefix="eval")
            best.update(step, metrics, variables)
            if config.get("eval_pictures", True):
                write_pictures(run, variables, workdir, step, writer, during_training=True)
    progress.close()
    checkpointer.wait()

    final = eval_variables(run, state)
    eval_metrics = evaluate(run, final)
    if eval_metrics:
        writer.write(int(state.step), eval_metrics, prefix="eval")
        best.update(int(state.step), eval_metrics, final)
    kept = best.variables(run.abstract_state) if config.best_metric else None
    test_metrics = evaluate(run, final if kept is None else kept, split="test")
    if test_metrics:
        writer.write(int(state.step), test_metrics, prefix="test")
    pictures = write_pictures(run, final, workdir, int(state.step), writer)
    result = {"train": last, "eval": eval_metrics, "test": test_metrics, "best": best.record,
              "pictures": pictures}
    _write_results(run, workdir, result)
    return dict(result, state=state)


def _git_revision() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_results(run: Run, workdir: str, result: dict) -> None:
    """<workdir>/results.json: what was run on what, and what came out (one record per run)."""
    if jax.process_index() != 0:
        return
    record = {"config": json.loads(run.config.to_json_best_effort()), "git_revision": _git_revision(),
              "data_fingerprint": run.input.fingerprint(), "data_spec": run.task.spec.to_json(),
              "seed": run.config.seed,
              "devices": jax.device_count(), "processes": jax.process_count(),
              **{k: result[k] for k in ("train", "eval", "test", "best")}}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)


def write_pictures(run: Run, variables: tuple, workdir: str, step: int, writer: metric_writer.MetricWriter,
                   during_training: bool = False) -> list[str]:
    """The family's pictures plug-in at `step`: its PNGs in the workdir, also sent to the trackers
    (TensorBoard, W&B) as images named like the files without '_step<N>'. During training only when
    there is an eval split: a train batch taken for pictures would change the run's data stream."""
    plugin = tasks.plugin(run.task, "pictures")
    batch = _picture_batch(run, train_fallback=not during_training) if plugin is not None else None
    if batch is None:
        return []
    with run.scope():
        files = plugin(run, variables, batch, workdir, step)
    writer.write_images(step, {re.sub(r"_step\d+$", "", os.path.basename(f)[:-4]): viz.read_png(f)
                               for f in files if f.endswith(".png")})
    return files


def _picture_batch(run: Run, train_fallback: bool = True) -> dict | None:
    """The first eval batch (fixed windows, comparable across runs), else the next train batch."""
    data = run.input.eval(jax.process_index(), jax.process_count())
    local = next(iter(data), None) if data is not None else None
    if local is None and not train_fallback:
        return None
    return run.global_batch(local if local is not None else next(run.train_iter))


def _stop_if_nonfinite(losses: list, step: int, checkpointer: ckpt_lib.Checkpointer) -> None:
    values = np.asarray(jax.device_get(losses))
    if not np.all(np.isfinite(values)):
        bad = step - len(values) + 1 + int(np.argmin(np.isfinite(values)))
        checkpointer.wait()  # name only a checkpoint whose write has finished and was verified
        good = ckpt_lib.newest_verified_step(checkpointer.directory)
        kept = f"the newest verified checkpoint, step {good}, is kept in {checkpointer.directory}" \
            if good is not None else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"loss became non-finite at step {bad}; stopping the run; {kept}")


def _progress(config, first_step: int):
    return metric_writer.Progress(config.total_steps, first_step,
                                  enabled=config.progress_bar and jax.process_index() == 0)


SPEC_FILE = "data_spec.json"


def save_spec(spec: tasks.DataSpec, workdir: str) -> None:
    """<workdir>/data_spec.json: what the model was built from, so inference needs no training data."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, SPEC_FILE)
    with open(path + ".partial", "w") as f:
        json.dump(spec.to_json(), f, indent=1)
    os.replace(path + ".partial", path)


def saved_spec(workdir: str) -> tasks.DataSpec | None:
    """The DataSpec a run in `workdir` was trained with, or None (a run from before it was saved)."""
    path = os.path.join(workdir, SPEC_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return tasks.DataSpec.from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable DataSpec ({e}); delete it to rebuild it from the data") from e


def load_for_inference(config: ml_collections.ConfigDict, workdir: str,
                       checkpoint: str | None = None) -> tuple[Run, tuple]:
    """(run, (params, model_state) to evaluate the latest checkpoint of `workdir` with, or the step
    folder `checkpoint`), for `eojax eval` / `infer` / `export` and `eojax.load`. The model is built
    from the run's saved DataSpec when it has one (the training data need not be there), else from
    the config's input."""
    config_lib.validate(config)
    parallel.maybe_initialize_distributed(**config.distributed)
    run = setup(config, spec=saved_spec(workdir))
    return run, ckpt_lib.load_variables(checkpoint or workdir, run.abstract_state.params,
                                        run.abstract_state.model_state)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """`eojax eval`: the latest checkpoint of `workdir` on the task's eval input, and the test split
    on the kept best parameters when the run kept them (as training did)."""
    run, variables = load_for_inference(config, workdir)
    out = evaluate(run, variables)
    if config.best_metric and os.path.isdir(os.path.join(workdir, "best")):
        variables = ckpt_lib.load_variables(workdir, run.abstract_state.params, run.abstract_state.model_state,
                                            best=True)
    test = evaluate(run, variables, split="test")
    return dict(out, **{f"test_{k}": v for k, v in test.items()})
