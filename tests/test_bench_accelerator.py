"""bench/accelerator.py in its CPU smoke mode: every family's row measured under the kernel set an
accelerator runs ('plain'; the bench's other set, the XLA:CPU custom VJPs, is what every other CPU
test trains with, and tests/test_kernels.py holds the two equal).

The bench runs as a user runs it (a subprocess of the CLI, one CPU device, the suite's XLA flags and
compilation cache); its --json report is checked row by row. `problems` is the check, and the second
test shows it rejects reports that are wrong in each way it looks for.
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO, xla_flags

pytestmark = pytest.mark.slow  # one smoke run of the whole bench: ~50-100 s

FAMILIES = ("mae", "satmae", "gpt2", "unet", "upernet")
KERNEL_SETS = ("plain",)  # of the bench's ("plain", "xla_cpu"): the smoke run's, to keep the suite short
POSITIVE = ("step_s", "throughput", "peak_memory_bytes", "flops_per_step", "compile_s")


def problems(report: dict) -> list[str]:
    """What is wrong with a bench report: a missing or failed row, a non-finite or non-positive
    step time / throughput / memory / FLOP count, an MFU outside (0, 1]."""
    found = []
    rows = {}
    for r in report.get("rows", []):
        rows.setdefault((r.get("family"), r.get("kernels")), []).append(r)
    for family in FAMILIES:
        for kernels in KERNEL_SETS:
            got = rows.get((family, kernels), [])
            name = f"{family}/{kernels}"
            if len(got) != 1:
                found.append(f"{name}: {len(got)} rows")
                continue
            r = got[0]
            if "error" in r:
                found.append(f"{name}: {r['error']}")
                continue
            for key in POSITIVE:
                v = r.get(key)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                    found.append(f"{name}: {key}={v!r}")
            mfu = r.get("mfu")
            if not (isinstance(mfu, float) and 0.0 < mfu <= 1.0):
                found.append(f"{name}: mfu={mfu!r}")
            if not (isinstance(r.get("n_steps"), int) and r["n_steps"] >= 1):
                found.append(f"{name}: n_steps={r.get('n_steps')!r}")
            if r.get("batch", 0) < 2:
                found.append(f"{name}: batch={r.get('batch')!r}")
    return found


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_accelerator") / "smoke.json"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join("bench", "accelerator.py"), "--smoke", "--json", str(out),
                           "--kernels", ",".join(KERNEL_SETS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_smoke_measures_every_family(smoke):
    proc, report = smoke
    assert report is not None, f"no --json report (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    found = problems(report)
    assert not found, "\n".join(found) + f"\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report["platform"] == "cpu" and report["tiny"] and report["devices"] == 1
    assert report["peak_flops"] > 0 and "measured" in report["peak_source"]
    # The printed report: the header names the device and jax; the markdown table has a row per family.
    assert f"jax {report['jax']}" in proc.stdout and report["device_kind"] in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(FAMILIES) * len(KERNEL_SETS), "\n".join(table)
    assert not any("FAILED" in line for line in table)


def test_problems_rejects_bad_reports(smoke):
    _, report = smoke
    assert report is not None
    good = report["rows"]

    def with_rows(rows):
        return {**report, "rows": rows}

    def changed(index, **fields):
        rows = copy.deepcopy(good)
        rows[index].update(fields)
        return with_rows(rows)

    assert problems(with_rows(good[1:]))  # a row missing
    assert problems(with_rows(good + [copy.deepcopy(good[0])]))  # a row twice
    assert problems(changed(2, error="RESOURCE_EXHAUSTED: out of memory"))
    assert problems(changed(3, mfu=1.5))
    assert problems(changed(3, mfu=0.0))
    assert problems(changed(4, step_s=float("nan")))
    assert problems(changed(0, throughput=-1.0))
    assert problems(changed(1, peak_memory_bytes=None))
    assert problems(changed(2, flops_per_step=0.0))
    assert not problems(with_rows(copy.deepcopy(good)))
