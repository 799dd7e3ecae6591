"""Shared test helpers: configs by name, a few train steps, sharding checks, CLI runs."""
import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np

from eojax import checkpoint as ckpt_lib
from eojax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = (("data", 1), ("fsdp", 1), ("model", 1))


def config_path(name: str) -> str:
    return os.path.join(REPO, "configs", f"{name}.py")


def load_config(name: str, arg: str = "runlocal", **overrides):
    """configs/<name>.py:<arg> with dotted-key overrides, e.g. **{"optim.lr": 1e-3}."""
    spec = importlib.util.spec_from_file_location(f"eojax_config_{name}", config_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.progress_bar = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run_steps(config, devices, n=3):
    run = train.setup(config, devices=devices)
    state = run.init_state()
    losses = []
    for _ in range(n):
        state, metrics = run.train_step(state, run.next_batch())
        losses.append(float(metrics["loss"]))
    return run, state, losses


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def sharded_leaves(tree, axis):
    """Leaves whose sharding really splits them over mesh axis `axis`."""
    return [x for x in jax.tree.leaves(tree)
            if any(axis == a or (isinstance(a, tuple) and axis in a) for a in x.sharding.spec)
            and x.addressable_shards[0].data.shape != x.shape]


def assert_sharded_run_matches(config_name, mesh, axis, reference, n=3, param_atol=1e-5, **overrides):
    """n steps on the 8-device `mesh` equal the one-device `reference` (losses within 1e-5, params
    within `param_atol`), and the parameters and optimizer state are really split over `axis`.

    Adam divides each gradient by its own running RMS, so a parameter whose true gradient is ~0
    (an attention key bias: softmax ignores it) moves by ~lr either way on summation-order noise;
    models with such parameters need a looser `param_atol` than the plain MAE's 1e-5."""
    ref_params, ref_losses = reference
    _, state, losses = run_steps(load_config(config_name, mesh=mesh, **overrides), jax.devices(), n)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    diff = max_diff(ckpt_lib.host_numpy(state.params), ref_params)
    assert diff < param_atol, f"params differ by {diff}"
    sharded = sharded_leaves(state.params, axis)
    assert len(sharded) >= 4, f"no parameter is sharded over {axis}"
    assert len(sharded_leaves(state.opt_state, axis)) >= len(sharded)


def one_device_reference(config_name, n=3, **overrides):
    _, state, losses = run_steps(load_config(config_name, mesh=ONE_DEVICE, **overrides),
                                 jax.devices()[:1], n)
    return ckpt_lib.host_numpy(state.params), losses


def xla_flags(devices: int) -> str:
    """This process's XLA_FLAGS (set by conftest) with `devices` simulated CPU devices, for a subprocess."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return f"--xla_force_host_platform_device_count={devices} {flags.strip()}".strip()


def cli(command, config_arg, workdir, *extra, devices=2, env_extra=None, check=True):
    """`python -m eojax.main <command> --config=<configs/...:arg> --workdir=...` in a subprocess."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu")
    env.update(env_extra or {})
    name, _, arg = config_arg.partition(":")
    cmd = [sys.executable, "-m", "eojax.main", command, f"--config={config_path(name)}:{arg}",
           f"--workdir={workdir}", "--config.progress_bar=False", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def saved_tree(workdir, step):
    return ckpt_lib.read_state(os.path.join(workdir, "checkpoints", str(step)))
