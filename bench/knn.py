"""Weighted k-NN evaluation (eojax.classify.knn, DINO's k = 20, T = 0.07) of frozen embeddings on CPU.

  /work/main/.venv/bin/python bench/knn.py [--train 10000] [--test 10000] [--dim 768] [--classes 62]
                                           [--chunks auto,256,2048] [--repeats 3] [--json out.json]

Random embeddings and labels (the cost does not depend on the values). One row per test chunk size:
  first call      wall time of the first knn_classify call: compile + run
  steady          median wall time of `--repeats` further calls (the compiled program reused)
  test emb/s      test embeddings classified per second, steady
  sim block       the (chunk, N_train) float32 similarity block, the largest array a chunk holds
One CPU device, as a user's single-host run; other processes on a shared machine slow it down.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

if __name__ == "__main__":  # one CPU device, as a user's single-host run
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402


def bench_chunk(chunk: int | None, train, train_labels, test, test_labels, k: int, repeats: int) -> dict:
    import jax
    from eojax.classify import knn

    jax.clear_caches()  # every row pays its own compile
    t = time.perf_counter()
    result = knn.knn_classify(train, train_labels, test, test_labels, k=k, chunk_size=chunk)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        knn.knn_classify(train, train_labels, test, test_labels, k=k, chunk_size=chunk)
        times.append(time.perf_counter() - t)
    used = min(chunk or knn.auto_chunk(len(train)), len(test))
    steady = statistics.median(times)
    return {"chunk": used, "auto": chunk is None, "first_call_s": first, "steady_s": steady,
            "min_s": min(times), "test_per_s": len(test) / steady,
            "sim_block_mb": used * len(train) * 4 / 2**20, "top1": result.top1, "top5": result.top5}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=62)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunks", default="auto,256,2048", help="test rows per chunk, comma separated; auto = "
                                                               "knn.auto_chunk(N_train)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    ap.add_argument("--json", help="also write the settings and rows here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    train = jnp.asarray(rng.normal(size=(args.train, args.dim)).astype(np.float32))  # on the device, as
    test = jnp.asarray(rng.normal(size=(args.test, args.dim)).astype(np.float32))    # embed() leaves them
    train_labels = rng.integers(0, args.classes, args.train)
    test_labels = rng.integers(0, args.classes, args.test)
    rows = []
    for c in args.chunks.split(","):
        rows.append(bench_chunk(None if c == "auto" else int(c), train, train_labels, test, test_labels,
                                args.k, args.repeats))
    gflop = 2 * args.train * args.test * args.dim / 1e9  # the similarity matmul, which dominates
    print(f"# bench/knn.py: {args.train:,} train x {args.test:,} test embeddings, dim {args.dim}, "
          f"{args.classes} classes, k={args.k}; {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
          f"jax {jax.__version__}; similarity matmul {gflop:.0f} GFLOP\n")
    print_table(("chunk", "first call s", "steady s", "test emb/s", "GFLOP/s", "sim block MB", "note"),
                [(f"{r['chunk']}{' (auto)' if r['auto'] else ''}", f"{r['first_call_s']:.2f}",
                  f"{r['steady_s']:.2f}", f"{r['test_per_s']:,.0f}", f"{gflop / r['steady_s']:.0f}",
                  f"{r['sim_block_mb']:.0f}", f"top-1 {r['top1']:.3f} (random: ~{1 / args.classes:.3f})")
                 for r in rows])
    print("\nfirst call: compile + run; steady: median of the timed calls (fastest in the JSON); the machine may "
          "be shared, so timings are approximate")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "device": jax.devices()[0].device_kind, "gflop": gflop, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
