"""Infill throughput of a distilgpt2-sized GPT-2: eojax's batched jit generator vs transformers' generate,
and training tokens/s + MFU of the same model.

  .venv/bin/python bench/vsat_infill.py [--prompt 70] [--new 50] [--batches 64,256] [--torch-batch 64]
                                        [--single-rows 6] [--reps 2] [--train-batch 8] [--train-len 128]
                                        [--train-steps 4] [--only torch_single,torch_batched,eojax,train]

Model: 6 layers x 768 (12 heads, mlp 3072), vocab 50257, 1024 positions: distilgpt2's shape with random
weights (the speed does not depend on them), float32. Rows: aispace-like lengths, a prompt of
`--prompt` +- 10 tokens (the known columns, "B01 is 1234, B02 is ...") and exactly `--new` generated
tokens per row (no stop token: every framework does the same work), sampled with temperature 0.7 and
top-k 50 (GReaT's sampling). Prompts are left-padded in every batched run.

  torch one row at a time  aispace's way: generate() per row (batch 1, no padding)
  torch batched            one generate() over `--torch-batch` left-padded rows with an attention mask
  eojax batched            eojax.vsat.generate: prefill + lax.while_loop of cached decode steps, one
                           jit; compile time reported on its own, rows/s from the best of `--reps` runs
  eojax constrained        the same plus a GReaT-format token machine (name -> ' is' -> number tokens
                           -> ',' -> next name, 12 columns, 1000 number tokens): only the 1014 tokens
                           it can emit are scored, so the 50257-wide output matmul shrinks to 1014

Every measurement runs in its own fresh child process (no thread pools or allocator shared with another);
torch runs with OpenMP's default wait policy, as shipped (PASSIVE, used until session 7, slowed its
one-row generate 1.6-2.4x). Training: forward + backward + AdamW
(eojax.optim) on a fixed (batch, length) token batch; FLOPs = 3 x forward matmuls (blocks with the full
L x L attention square + the vocab projection, eojax.models.gpt2.flops_per_sequence); MFU against the
measured f32 matmul peak of this CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import MARK, print_table, run_child, single_device_env

VOCAB, N_POSITIONS = 50257, 1024
TEMPERATURE, TOP_K = 0.7, 50
NAMES, NUMBERS = 12, 1000  # the constrained machine's columns and number tokens


def _prompts(batch: int, prompt: int, seed: int):
    """Random token rows of prompt +- 10 tokens, left-padded to prompt + 10 (pad id 0)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt - 10, prompt + 11, batch).astype(np.int32)
    tokens = np.zeros((batch, prompt + 10), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, -n:] = rng.integers(1, VOCAB, n)
    return tokens, lengths


def _great_machine():
    """name_j -> ' is' -> number -> (number | ',') ... ',' -> name_{j+1}, cyclic over the columns, no
    final state (rows always run the full budget). Token ids are arbitrary stand-ins."""
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.choice(np.arange(1, VOCAB), NAMES + 2 + NUMBERS, replace=False)
    names, is_, comma, numbers = ids[:NAMES], ids[NAMES], ids[NAMES + 1], ids[NAMES + 2:]
    # states: 4 per column: 0 name, 1 ' is', 2 first number token, 3 more number tokens or ','
    s = 4 * NAMES
    allowed = np.zeros((s, VOCAB), bool)
    nxt = np.zeros((s, VOCAB), np.int32)
    for j in range(NAMES):
        b = 4 * j
        allowed[b, names[j]], nxt[b, names[j]] = True, b + 1
        allowed[b + 1, is_], nxt[b + 1, is_] = True, b + 2
        allowed[b + 2, numbers], nxt[b + 2, numbers] = True, b + 3
        allowed[b + 3, numbers], nxt[b + 3, numbers] = True, b + 3
        allowed[b + 3, comma], nxt[b + 3, comma] = True, 4 * ((j + 1) % NAMES)
    return allowed, nxt


# -- eojax (child) ----------------------------------------------------------------------------------
def _eojax_model():
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from eojax.models.gpt2 import GPT2, gpt2_config
    model = GPT2(**gpt2_config("distilgpt2", vocab_size=VOCAB, n_positions=N_POSITIONS), dropout=0.0)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(0))
    return model, params


def run_eojax_gen(args) -> dict:
    import jax

    from eojax.vsat import generate as gen

    model, params = _eojax_model()
    out = {"framework": "eojax", "jax": jax.__version__, "runs": []}
    allowed, nxt = _great_machine()
    for constrained in (False, True):
        for batch in args.batches:
            tokens, lengths = _prompts(batch, args.prompt, seed=batch)
            kw = dict(max_new_tokens=args.new, temperature=TEMPERATURE, top_k=TOP_K)
            if constrained:
                kw.update(constraint=gen.Constraint(allowed, nxt), start_state=(jax.numpy.arange(batch) % NAMES) * 4)
            fn, fargs = gen.prepare(model, params, tokens, lengths, jax.random.key(1), **kw)
            t = time.perf_counter()
            compiled = fn.lower(*fargs).compile()
            compile_s = time.perf_counter() - t
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                res = compiled(*fargs)
                jax.block_until_ready(res)
                times.append(time.perf_counter() - t)
            n = jax.device_get(res.lengths)
            assert (n == args.new).all(), f"rows generated {set(n.tolist())} tokens, not {args.new}"
            if constrained:
                toks, start = jax.device_get(res.tokens), jax.device_get(fargs[7])
                _check_machine(allowed, nxt, start, toks)
            out["runs"].append({"batch": batch, "constrained": constrained, "compile_s": compile_s,
                                "best_s": min(times), "median_s": statistics.median(times),
                                "rows_per_s": batch / min(times)})
            print(f"  eojax batch {batch} constrained={constrained}: compile {compile_s:.1f} s, "
                  f"best {min(times):.2f} s -> {batch / min(times):.1f} rows/s", file=sys.stderr, flush=True)
    return out


def _check_machine(allowed, nxt, start, tokens):
    for row, s in enumerate(start):
        for tok in tokens[row]:
            assert allowed[s, tok], f"row {row} emitted {tok} in state {s}"
            s = nxt[s, tok]


def run_eojax_train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from eojax import optim
    from eojax.models.gpt2 import flops_per_sequence

    model, params = _eojax_model()
    cfg = optim.default_config()
    cfg.update(name="adamw", lr=1e-4, weight_decay=0.01, clip_norm=1.0)
    tx = optim.build(cfg, total_steps=1000).tx
    opt_state = tx.init(params)

    def loss_fn(p, tokens, rng):
        logits = model.apply({"params": p}, tokens, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(p, s, tokens, rng):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, rng)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    tokens = jnp.asarray(_prompts(args.train_batch, args.train_len - 10, 0)[0][:, :args.train_len])
    t = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens, jax.random.key(0))
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    times = []
    for i in range(args.train_steps):
        t = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, tokens, jax.random.key(i + 1))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    cfg_m = dict(n_embd=model.n_embd, n_layer=model.n_layer, vocab_size=model.vocab_size)
    flops = flops_per_sequence(cfg_m, args.train_len, training=True) * args.train_batch
    return {"framework": "eojax-train", "compile_s": compile_s, "step_s": statistics.median(times),
            "min_step_s": min(times), "tokens_per_s": args.train_batch * args.train_len / statistics.median(times),
            "flops_per_step": flops, "loss": float(loss)}


# -- transformers (children) ------------------------------------------------------------------------
def _torch_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=768, n_layer=6, n_head=12,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=0)
    return torch, GPT2LMHeadModel(cfg).eval()


def _torch_generate(torch, model, ids, mask, new):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                              top_k=TOP_K, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)


def run_torch_single(args) -> dict:
    import transformers
    torch, model = _torch_model()
    tokens, lengths = _prompts(args.single_rows + 1, args.prompt, seed=1)
    rows = [torch.from_numpy(tokens[i, -n:][None].astype("int64")) for i, n in enumerate(lengths)]
    _torch_generate(torch, model, rows[0], torch.ones_like(rows[0]), args.new)  # warm-up
    t = time.perf_counter()
    for r in rows[1:]:
        out = _torch_generate(torch, model, r, torch.ones_like(r), args.new)
        assert out.shape[1] == r.shape[1] + args.new
    dt = time.perf_counter() - t
    return {"framework": "torch-single", "rows": args.single_rows, "seconds": dt,
            "rows_per_s": args.single_rows / dt, "torch": torch.__version__, "transformers": transformers.__version__}


def run_torch_batched(args) -> dict:
    import numpy as np
    torch, model = _torch_model()
    b = args.torch_batch
    tokens, lengths = _prompts(b, args.prompt, seed=b)
    ids = torch.from_numpy(tokens.astype(np.int64))
    mask = torch.from_numpy((np.arange(tokens.shape[1])[None] >= tokens.shape[1] - lengths[:, None]).astype(np.int64))
    _torch_generate(torch, model, ids[:4], mask[:4], 4)  # warm-up
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        out = _torch_generate(torch, model, ids, mask, args.new)
        times.append(time.perf_counter() - t)
    assert out.shape == (b, tokens.shape[1] + args.new)
    return {"framework": "torch-batched", "batch": b, "best_s": min(times), "rows_per_s": b / min(times)}


CHILDREN = {"torch_single": run_torch_single, "torch_batched": run_torch_batched, "eojax": run_eojax_gen,
            "train": run_eojax_train}


# -- parent -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=70, help="mean prompt tokens (rows get +-10)")
    ap.add_argument("--new", type=int, default=50, help="generated tokens per row")
    ap.add_argument("--batches", default="64,256", help="eojax batch sizes")
    ap.add_argument("--torch-batch", type=int, default=64)
    ap.add_argument("--single-rows", type=int, default=6, help="rows timed one at a time (torch)")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per batched measurement (best kept)")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-len", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--only", default=",".join(CHILDREN), help="comma list of " + ",".join(CHILDREN))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    if args.child:
        print(MARK + json.dumps(CHILDREN[args.child](args)), flush=True)
        return

    from eojax import metric_writer
    peak = metric_writer.measured_matmul_flops(repeats=30)
    load = os.getloadavg()
    print(f"peak f32 matmul {peak / 1e9:.1f} GFLOP/s ({os.cpu_count()} cores); load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}", flush=True)
    has_torch = subprocess.run([sys.executable, "-c", "import torch, transformers"], capture_output=True).returncode == 0
    results = {}
    passthrough = ["--prompt", str(args.prompt), "--new", str(args.new), "--batches", ",".join(map(str, args.batches)),
                   "--torch-batch", str(args.torch_batch), "--single-rows", str(args.single_rows), "--reps",
                   str(args.reps), "--train-batch", str(args.train_batch), "--train-len", str(args.train_len),
                   "--train-steps", str(args.train_steps)]
    for name in args.only.split(","):
        if name.startswith("torch") and not has_torch:
            results[name] = "torch / transformers not installed: no reference numbers"
            continue
        env = single_device_env()  # torch keeps OpenMP's default wait policy, as shipped (see bench/mae_step.py)
        print(f"running {name} ...", flush=True)
        results[name] = run_child(__file__, ["--child", name, *passthrough], env, name)
    peak = max(peak, metric_writer.measured_matmul_flops(repeats=30))

    shape = f"6x768 vocab {VOCAB}, prompt {args.prompt}+-10, {args.new} new tokens, T={TEMPERATURE} top-k {TOP_K}"
    rows, base = [], {}
    single, batched = results.get("torch_single"), results.get("torch_batched")
    if isinstance(single, dict):
        base["single"] = single["rows_per_s"]
        rows.append((f"torch {single['torch']} generate, 1 row at a time", f"{single['rows_per_s']:.2f}", "-", "-", "-",
                     f"{single['rows']} rows"))
    if isinstance(batched, dict):
        base["batched"] = batched["rows_per_s"]
        rows.append(("torch generate, batched", f"{batched['rows_per_s']:.1f}", "-", "-", "-",
                     f"batch {batched['batch']}"))
    ej = results.get("eojax")
    if isinstance(ej, dict):
        for r in ej["runs"]:
            x1 = f"{r['rows_per_s'] / base['single']:.0f}x" if "single" in base else "-"
            xb = f"{r['rows_per_s'] / base['batched']:.1f}x" if "batched" in base else "-"
            name = "eojax generate" + (", constrained (1014 scored tokens)" if r["constrained"] else "")
            rows.append((name, f"{r['rows_per_s']:.1f}", x1, xb, f"{r['compile_s']:.0f}", f"batch {r['batch']}"))
    print(f"\n## infill rows/s ({shape})\n")
    print_table(("run", "rows/s", "vs 1-at-a-time", "vs torch batched", "compile s", "batch"), rows)
    tr = results.get("train")
    if isinstance(tr, dict):
        mfu = tr["flops_per_step"] / tr["step_s"] / peak
        print(f"\n## training step (forward + backward + AdamW, f32, batch {args.train_batch} x {args.train_len} tokens)\n")
        print_table(("run", "tokens/s", "step ms", "best ms", "MFU", "compile s"),
                    [("eojax GPT-2 6x768", f"{tr['tokens_per_s']:.0f}", f"{tr['step_s'] * 1e3:.0f}",
                      f"{tr['min_step_s'] * 1e3:.0f}", f"{100 * mfu:.1f}%", f"{tr['compile_s']:.0f}")])
        print(f"\nMFU = {tr['flops_per_step'] / 1e9:.0f} GFLOP per step / median step / peak {peak / 1e9:.0f} GFLOP/s")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"\n{name}: {r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "load": load, **results}, f, indent=2)


if __name__ == "__main__":
    main()
