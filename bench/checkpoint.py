"""Checkpoint save and restore time, size on disk, and the cost of eojax's integrity checks.

  .venv/bin/python bench/checkpoint.py [--rounds 3] [--states mae,gpt2] [--dir /tmp]

States (float32, filled with random values so compression cannot shrink them below what training
writes):
- mae: configs/mae.py's default (not runlocal) train state, built by the real trainer (train.setup +
  init_state): params, AdamW moments, step.
- gpt2: a GPT-2-small-shaped train state, 124M params (vocab 50257, context 1024, 12 x 768) and
  AdamW's two moments: 373M floats.

Per round, into a fresh folder: `Checkpointer.save` (what the training loop waits for: the
finiteness check and Orbax's copy off the device) + `wait()` (Orbax's asynchronous write until
finalised, then the integrity record, which in training runs in a background thread at the next
save, overlapping training), then restore with a fresh
Checkpointer (verification included). The integrity parts are timed on their own on the same state
and step folder: the finiteness check (`nonfinite_arrays`, one device reduction per array), the
record (`record_integrity`, XXH3-64 of every file just written, so read from the page cache) and the
verification (`check_step`), against the time without them (total - integrity part):
- loop ovh: what the training loop waits for (the finiteness check; the record runs in a background
  thread at the next save);
- work ovh: all the integrity work (check + record), i.e. the CPU time it takes;
- restore ovh: the verification, read before restoring.
Medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from _common import load_config, print_table


def _mae_state():
    import jax

    from eojax import train

    config = load_config("mae")
    config.mesh = (("data", 1), ("fsdp", 1), ("model", 1))
    config.progress_bar = False
    run = train.setup(config, devices=jax.devices()[:1])
    state = _randomised(run.init_state())
    return state, run.abstract_state


def _gpt2_state():
    """GPT-2 small's parameter shapes (as Hugging Face's gpt2 checkpoint) and an AdamW state."""
    import jax
    import jax.numpy as jnp
    import optax

    from eojax import train

    d, vocab, context, layers = 768, 50257, 1024, 12
    block = {"ln_1": {"scale": (d,), "bias": (d,)}, "ln_2": {"scale": (d,), "bias": (d,)},
             "attn": {"c_attn": {"kernel": (d, 3 * d), "bias": (3 * d,)}, "c_proj": {"kernel": (d, d), "bias": (d,)}},
             "mlp": {"c_fc": {"kernel": (d, 4 * d), "bias": (4 * d,)}, "c_proj": {"kernel": (4 * d, d), "bias": (d,)}}}
    shapes = {"wte": (vocab, d), "wpe": (context, d), "ln_f": {"scale": (d,), "bias": (d,)},
              **{f"h_{i}": block for i in range(layers)}}
    params = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
    opt_state = optax.adamw(1e-4).init(params)
    state = _randomised(train.TrainState(step=jnp.int32(0), params=params, opt_state=opt_state,
                                         model_state={}, ema_model_state={}))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return state, abstract


def _randomised(state):
    """Every float array filled with normal noise (zeros and ones would compress to nothing)."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.02 if jnp.issubdtype(x.dtype, jnp.floating) else x
              for k, x in zip(keys, leaves)]
    return jax.block_until_ready(jax.tree.unflatten(tree, leaves))


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)


def bench(name: str, make, rounds: int, parent: str) -> tuple:
    import jax

    from eojax import checkpoint as ckpt_lib

    state, abstract = make()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    ckpt_lib.nonfinite_arrays(state)  # compiles the reductions once
    rows = {k: [] for k in ("blocks", "save", "finite", "record", "restore", "verify")}
    size = 0
    for i in range(rounds):
        folder = tempfile.mkdtemp(prefix=f"eojax-bench-ckpt-{name}-", dir=parent)
        try:
            checkpointer = ckpt_lib.Checkpointer(folder, keep=1, every=1)
            t = time.perf_counter()
            assert checkpointer.save(1, state, force=True)
            rows["blocks"].append(time.perf_counter() - t)  # what the training loop waits for
            checkpointer.wait()
            rows["save"].append(time.perf_counter() - t)
            checkpointer.close()
            step_dir = os.path.join(folder, "1")
            size = _size(step_dir)
            t = time.perf_counter()
            assert not ckpt_lib.nonfinite_arrays(state)
            rows["finite"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpt_lib.record_integrity(step_dir)
            rows["record"].append(time.perf_counter() - t)

            reader = ckpt_lib.Checkpointer(folder, keep=1, every=1)
            t = time.perf_counter()
            restored = jax.block_until_ready(reader.restore(1, abstract))
            rows["restore"].append(time.perf_counter() - t)
            reader.close()
            del restored
            t = time.perf_counter()
            assert ckpt_lib.check_step(step_dir)[0] == ckpt_lib.INTACT
            rows["verify"].append(time.perf_counter() - t)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in rows.items()}
    integrity = m["finite"] + m["record"]
    return (name, f"{n_params / 1e6:.1f}M", f"{size / 2**20:.0f}", f"{m['blocks']:.2f}", f"{m['save']:.2f}",
            f"{m['finite']:.3f}", f"{m['record']:.3f}", f"{100 * m['finite'] / (m['save'] - integrity):.1f}%",
            f"{100 * integrity / (m['save'] - integrity):.1f}%",
            f"{m['restore']:.2f}", f"{m['verify']:.3f}", f"{100 * m['verify'] / (m['restore'] - m['verify']):.1f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--states", default="mae,gpt2")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written")
    args = parser.parse_args(argv)
    import absl.logging
    import jax

    absl.logging.set_verbosity(absl.logging.WARNING)  # Orbax's INFO lines
    makers = {"mae": _mae_state, "gpt2": _gpt2_state}
    rows = [bench(name, makers[name], args.rounds, args.dir) for name in args.states.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds, checkpoints in {args.dir}")
    print_table(("state", "params", "MiB", "save() blocks s", "save s", "finite s", "record s", "loop ovh", "work ovh",
                 "restore s", "verify s", "restore ovh"), rows)


if __name__ == "__main__":
    sys.exit(main())
