"""eojax command line.

  eojax train --config=configs/mae.py:runlocal --workdir=/tmp/mae [--config.total_steps=100 ...]
  eojax eval  --config=configs/mae.py:runlocal --workdir=/tmp/mae
  eojax stats --config=configs/mae.py:runlocal      # per-band statistics of config.input, cached
  eojax export --config=configs/mae.py:runlocal --workdir=/tmp/mae   # per-window embeddings -> GeoTIFF

`python -m eojax.main ...` is the same program.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "eval", "stats", "export")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:runlocal",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, pictures.")


def _command(argv: list[str]) -> str:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: eojax {{{'|'.join(COMMANDS)}}} --config=FILE[:ARG] [--workdir=DIR] "
                             f"[--config.key=value ...]; got {' '.join(argv[1:]) or 'no command'}")
    return argv[1]


def main(argv: list[str]) -> None:
    command = _command(argv)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/mae.py:runlocal")
    logging.getLogger().setLevel(logging.INFO)

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
        summary = {"train": result["train"], "eval": result["eval"], "pictures": result["pictures"]}
    elif command == "export":
        from eojax.infer import features
        summary = {"features": features.export_run_features(config, workdir)}
    else:
        summary = {"eval": train.evaluate_checkpoint(config, workdir)}
    print(json.dumps(summary, indent=2))


def run() -> None:
    """Console-script entry point. ml_collections reports an override of a key the config does not
    have as a bare AttributeError/KeyError while flags are parsed; say which flag it was."""
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
