"""Time from nothing to the first finished train step of configs/mae.py:runlocal, single CPU device.

  .venv/bin/python bench/compile_time.py [--runs 1] [--config configs/mae.py:runlocal]

Each run is a fresh Python process (no jit cache in memory; JAX's persistent compilation cache is
off unless the environment turns it on, and this bench turns it off explicitly). Phases:

  import       `import jax` + `from eojax import train`
  setup()      mesh, input pipeline (opens the synthetic scenes, cached band stats), task, parameter
               shapes by jax.eval_shape (a trace, no compile), optimizer; the jitted init and step
               are only *defined* here, and MAE's FLOPs are analytic, so nothing is compiled yet
  init_state   trace + lower + compile of the sharded init, then running it
  first batch  the first Grain batch, put on the device
  first step   trace + lower + compile of the train step, then one step
  second step  one step, already compiled: first - second ~ the step's compile cost

JAX's own monitoring events split each phase's time into trace / lower (jaxpr -> StableHLO) /
XLA backend compile. Target: the first step's compile (trace + lower + backend) under 15 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "BENCH_RESULT "
TARGET_S = 15.0
PHASES = ("import", "config", "setup()", "init_state", "first batch", "first step", "second step")
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}


def child(config_arg: str) -> dict:
    t_start, c_start = time.perf_counter(), time.process_time()
    import jax
    from jax._src import monitoring  # the public jax.monitoring lacks the duration listener in some versions

    from eojax import train
    jax.config.update("jax_enable_compilation_cache", False)

    current = {"phase": "import"}
    compile_s: dict[str, dict[str, float]] = {}

    def listener(event, duration, **_):
        kind = EVENTS.get(event)
        if kind:
            d = compile_s.setdefault(current["phase"], {})
            d[kind] = d.get(kind, 0.0) + duration

    monitoring.register_event_duration_secs_listener(listener)
    times = {"import": time.perf_counter() - t_start}
    # CPU seconds of this process too: on a shared machine they move much less than wall time.
    cpu = {"import": time.process_time() - c_start}

    def phase(name, fn):
        current["phase"] = name
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        jax.block_until_ready(out)
        times[name] = time.perf_counter() - t
        cpu[name] = time.process_time() - c
        return out

    def load_config():
        import importlib.util
        path, _, arg = config_arg.partition(":")
        spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg or None)
        config.mesh = (("data", 1), ("fsdp", 1), ("model", 1))
        config.progress_bar = False
        return config

    config = phase("config", load_config)
    run = phase("setup()", lambda: train.setup(config, devices=jax.devices()[:1]))
    state = phase("init_state", run.init_state)
    batch = phase("first batch", run.next_batch)
    state, _ = phase("first step", lambda: run.train_step(state, batch))
    state, metrics = phase("second step", lambda: run.train_step(state, batch))
    times["total to first step"] = sum(times[p] for p in PHASES[:-1])
    cpu["total to first step"] = sum(cpu[p] for p in PHASES[:-1])
    return {"times": times, "cpu": cpu, "compile": compile_s, "loss": float(metrics["loss"]),
            "device": str(jax.devices()[0]), "jax": jax.__version__}


def _fresh_run(config_arg: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    # A single device, as a user's one-host run gets: drop an inherited simulated-device count.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--config", config_arg],
                          capture_output=True, text=True, cwd=REPO, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    sys.exit(f"the timed run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mae.py:runlocal", help="FILE[:ARG], relative to the repo")
    ap.add_argument("--runs", type=int, default=1, help="fresh processes; the table shows the median")
    ap.add_argument("--json", help="also write the per-run results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.config)), flush=True)
        return

    runs = []
    for i in range(args.runs):
        print(f"fresh process {i + 1}/{args.runs}: {args.config} ...", flush=True)
        runs.append(_fresh_run(args.config))

    def med(get):
        return statistics.median(get(r) for r in runs)

    print(f"\n{args.config}, {runs[0]['device']}, jax {runs[0]['jax']}, median of {len(runs)} fresh process(es)\n")
    head = ("phase", "wall s", "cpu s", "trace s", "lower s", "XLA compile s")  # trace/lower/compile: wall s
    rows = []
    for p in PHASES + ("total to first step",):
        c = lambda r, k: r["compile"].get(p, {}).get(k, 0.0)
        rows.append((p, f"{med(lambda r: r['times'][p]):.2f}", f"{med(lambda r: r['cpu'][p]):.2f}",
                     *(f"{med(lambda r: c(r, k)):.2f}" if p in PHASES else "" for k in ("trace", "lower", "compile"))))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = " | ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))

    step_compile = med(lambda r: sum(r["compile"].get("first step", {}).values()))
    step_gap = med(lambda r: r["times"]["first step"] - r["times"]["second step"])
    verdict = "PASS" if step_compile < TARGET_S else "FAIL"
    print(f"\nfirst-step compile (trace + lower + XLA): {step_compile:.2f} s "
          f"(first - second step: {step_gap:.2f} s); target < {TARGET_S:.0f} s: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
