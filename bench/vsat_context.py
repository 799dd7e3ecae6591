"""The Virtual Satellite's context mode on aispace's job: train briefly, then fill one cloudy date of a
~100 x 100 patch, timed the way a user runs it (the CLI, a fresh process each).

  .venv/bin/python bench/vsat_context.py [--steps 100] [--target 2017-07-15] [--workdir DIR] [--json out.json]

Data: the real eo-learn Sentinel-2 NDVI patch of the shared data (101 x 100 pixels, 67 dates after the
same-day mosaic); its 2017-07-15 has 4,702 cloudy pixels, the size of aispace's job (a 100 x 100 patch,
4,630 cloudy pixels on one date, 8 min 38 s on a GPU generating one row at a time).

Rows of the table:
  train   `eojax train` of configs/vsat.py's default model for --steps steps: examples/s and tokens/s
          (examples x the sequence length) and MFU from the trainer's own log (MFU against the measured
          f32 matmul peak of this CPU), from its last logging window.
  infer   `eojax infer` on that checkpoint: the wall time of the whole command (start-up, imports,
          restore, the infill's compilation, the infill, writing every date's GeoTIFF and the PNG), and
          the infill alone (metrics.json 'seconds': compilation included).
The quality of such a short run is not the point here (docs/vsat.md has the measured accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import REPO, print_table

DATA = os.environ.get("EOJAX_TEST_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")


def _cli(command: str, workdir: str, args: list[str]) -> float:
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eojax.main", command, "--config=configs/vsat.py",
                    f"--workdir={workdir}", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - tick


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--target", default="2017-07-15")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="eojax_vsat_bench_")
    print("workdir:", workdir)
    patch = os.path.join(DATA, "eolearn", "TestEOPatch")
    data = [f"--config.input.root={patch}", "--config.input.source=eopatch", "--config.input.feature=NDVI",
            "--config.input.bands=()",
            "--config.input.decimals=4", "--config.input.rounding=nearest", "--config.input.same_day=mosaic",
            f"--config.input.target_date={args.target}", "--config.input.holdout=none"]
    train_args = data + [f"--config.total_steps={args.steps}", f"--config.checkpoint_every={args.steps}",
                         "--config.eval_every=0", f"--config.log_every={max(1, args.steps // 4)}",
                         "--config.progress_bar=False"]
    train_s = _cli("train", workdir, train_args)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "examples_per_sec" in r][-1]
    with open(os.path.join(workdir, "data_spec.json")) as f:
        length = 1 + sum(v["shape"][0] for k, v in json.load(f)["elements"].items()
                         if k in ("own_mask", "nb_mask", "an_mask"))
    infer_s = _cli("infer", workdir, data)
    with open(os.path.join(workdir, "infer", "metrics.json")) as f:
        infer = json.load(f)
    rows = [("train", f"{args.steps} steps", f"{train_s:.0f} s", f"{last['examples_per_sec']:.0f}",
             f"{last['examples_per_sec'] * length:.0f}", f"{last['mfu']:.3f}"),
            ("infer", f"{infer['to_fill']} cloudy px ({infer['target_date']})", f"{infer_s:.1f} s",
             f"{infer['pixels_per_sec']:.0f} px/s", f"infill alone {infer['seconds']:.1f} s", "")]
    print_table(("stage", "work", "wall (whole command)", "examples/s", "tokens/s", "MFU"), rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train": {"seconds": train_s, **last, "tokens_per_example": length},
                       "infer": {"seconds": infer_s, **{k: infer[k] for k in ("to_fill", "seconds", "pixels_per_sec")}}},
                      f, indent=2)


if __name__ == "__main__":
    main()
