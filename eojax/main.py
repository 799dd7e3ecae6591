"""eojax command line.

  eojax train --config=configs/mae.py:runlocal --workdir=/tmp/mae [--config.total_steps=100 ...]
  eojax eval  --config=configs/mae.py:runlocal --workdir=/tmp/mae
  eojax stats --config=configs/mae.py:runlocal      # per-band statistics of config.input, cached
  eojax export --config=configs/mae.py:runlocal --workdir=/tmp/mae   # per-window embeddings -> GeoTIFF
  eojax infer [FAMILY] --config=configs/diffusion.py:runlocal --workdir=/tmp/diff --prompt="a river"
        # the family's inference on the latest checkpoint: --prompt (repeatable), --input, --output,
        # --num_samples, --seed; FAMILY, when given, must be the config's task

`python -m eojax.main ...` is the same program.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "eval", "stats", "export", "infer")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:runlocal",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, pictures.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "infer: a text prompt (repeatable).")
_INPUT = flags.DEFINE_string("input", "", "infer: an input file (e.g. a GeoTIFF to predict on).")
_OUTPUT = flags.DEFINE_string("output", "", "infer / export: output folder (default <workdir>/infer, "
                                "<workdir>/features).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "infer: samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "infer: random seed.")


def _command(argv: list[str]) -> tuple[str, str | None]:
    """-> (command, family); only `infer` takes a family word (checked against config.task)."""
    ok = len(argv) == 2 and argv[1] in COMMANDS or len(argv) == 3 and argv[1] == "infer"
    if not ok:
        raise app.UsageError(f"usage: eojax {{{'|'.join(COMMANDS)}}} --config=FILE[:ARG] [--workdir=DIR] "
                             f"[--config.key=value ...]; got {' '.join(argv[1:]) or 'no command'}")
    return argv[1], (argv[2] if len(argv) == 3 else None)


def main(argv: list[str]) -> None:
    command, family = _command(argv)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/mae.py:runlocal")
    if family is not None and family != config.task:
        raise app.UsageError(f"eojax infer {family}: the config trains task {config.task!r}, not {family!r}")
    logging.getLogger().setLevel(logging.INFO)
    from eojax import hostmem
    if hostmem.status:
        logging.info(hostmem.status)

    if command == "stats":
        from eojax.data import pipeline
        print(json.dumps(pipeline.describe_stats(config.input), indent=2))
        return

    if not _WORKDIR.value:
        raise app.UsageError(f"eojax {command} needs --workdir=DIR")
    workdir = os.path.abspath(_WORKDIR.value)
    from eojax import train  # imports jax: keep `--help` and usage errors fast
    if command == "train":
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        result = train.train_and_evaluate(config, workdir)
        summary = {k: result[k] for k in ("train", "eval", "test", "best", "pictures")}
    elif command in ("export", "infer"):
        from eojax import tasks
        run, variables = train.load_for_inference(config, workdir)
        options = {"prompt": list(_PROMPT.value), "input": _INPUT.value, "num_samples": _NUM_SAMPLES.value,
                   "output": os.path.abspath(_OUTPUT.value or os.path.join(workdir, "infer" if command == "infer"
                                                                        else "features")),
                   "seed": _SEED.value}
        plug_in = tasks.require_plugin(run.task, command, f"eojax {command}")
        with run.scope():
            summary = {"features" if command == "export" else "infer": plug_in(run, variables, workdir, options)}
    else:
        summary = {"eval": train.evaluate_checkpoint(config, workdir)}
    print(json.dumps(summary, indent=2))


def run() -> None:
    """Console-script entry point. ml_collections reports an override of a key the config does not
    have as a bare AttributeError/KeyError while flags are parsed; say which flag it was."""
    from eojax import hostmem
    hostmem.tune_malloc()  # before jax is imported (main logs what it did)
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"'")
        culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        if not culprits:
            raise
        sys.exit(f"eojax: unknown config key {key!r} in {culprits[0]}: the config has no such field "
                 f"(see the config file, or `eojax train --config=... --helpfull`)")


if __name__ == "__main__":
    run()
