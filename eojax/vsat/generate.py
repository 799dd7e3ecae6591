"""Batched, jit-compiled generation for eojax's GPT2, with a KV cache and optional FSM constraints.

One jitted function per (model, settings): prefill the left-padded prompt batch in one pass (its
real tokens packed, so padding costs no projection or MLP FLOPs), then a `lax.while_loop` of
single-token decode steps through the cache (GPT2.decode) that ends after `max_new_tokens` or as
soon as every row has stopped; the last token is chosen after the loop, so no step runs the model
for logits nobody reads. Each row stops on its own, at a stop token or
in a final state of the constraint; a stopped row emits `pad_id` from then on and its tokens no longer
enter the cache. Greedy (temperature 0) or sampled (temperature, optional top-k), deterministic from
the PRNG key: step t draws with fold_in(key, t).

Constrained decoding (generic; eojax.data's text formats build the tables):
  allowed    (S, V) bool   which tokens state s may emit
  next_state (S, V) int32  the state after emitting token v in state s
  start      (B,)  int32   each row's first state
At every step the logits of tokens not allowed in the row's state are set to -inf before the choice,
the state then advances by the emitted token, and a state that allows no token is final (the row
stops there). The chosen token is checked against `allowed` once more after the choice, so not even
NaN logits can produce a disallowed token. Tokens no state ever allows are never scored: the output
projection runs over the K tokens some state allows (GPT2.decode's vocab_subset), which leaves the
choice unchanged (disallowed tokens could not win) and for a tabular vocabulary of digits and column
names skips almost all of GPT-2's 50257-wide output matmul.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eojax.models.gpt2 import GPT2


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint:
    """A finite-state machine over tokens (see the module docstring)."""

    allowed: np.ndarray  # (S, V) bool
    next_state: np.ndarray  # (S, V) int

    def __post_init__(self):
        allowed, nxt = np.asarray(self.allowed), np.asarray(self.next_state)
        if allowed.ndim != 2 or allowed.dtype != bool:
            raise ValueError(f"Constraint.allowed must be a (states, vocab) bool array, got {allowed.dtype} {allowed.shape}")
        if nxt.shape != allowed.shape or nxt.dtype.kind not in "iu":
            raise ValueError(f"Constraint.next_state must be an int array of shape {allowed.shape}, "
                             f"got {nxt.dtype} {nxt.shape}")
        bad = (nxt < 0) | (nxt >= allowed.shape[0])
        if np.any(bad & allowed):
            s, v = np.argwhere(bad & allowed)[0]
            raise ValueError(f"Constraint.next_state[{s}, {v}] = {nxt[s, v]} is not a state (0..{allowed.shape[0] - 1})")
        object.__setattr__(self, "allowed", allowed)
        # Disallowed entries are never followed; clip them so a stray value cannot index out of range.
        object.__setattr__(self, "next_state", np.clip(nxt, 0, allowed.shape[0] - 1).astype(np.int32))

    @property
    def num_states(self) -> int:
        return self.allowed.shape[0]


class Generation(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) int32, pad_id after a row stopped
    lengths: jax.Array  # (B,) generated tokens per row, the stop token included
    finished: jax.Array  # (B,) bool: stopped (stop token or final state) rather than out of budget
    states: jax.Array  # (B,) final constraint state (0 without a constraint)
    logits: jax.Array | None  # (B, max_new_tokens, K) the model's scores before constraining, if asked


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
    """Token lists -> (tokens (B, P) int32 left-padded, lengths (B,) int32)."""
    lengths = np.array([len(s) for s in sequences], np.int32)
    p = int(lengths.max()) if length is None else length
    if lengths.max() > p:
        raise ValueError(f"a prompt of {lengths.max()} tokens does not fit length {p}")
    out = np.full((len(sequences), p), pad_id, np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            out[i, p - len(s):] = s
    return out, lengths


def pick_tokens(logits, key, allowed=None, temperature: float = 0.0, top_k: int = 0):
    """Next token index per row from (B, K) logits: argmax (temperature <= 0) or a sample from
    softmax(logits / temperature) over the top_k best (0 = all); only `allowed` (B, K) entries."""
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    if temperature <= 0:
        idx = jnp.argmax(logits, axis=-1)
    elif top_k and top_k < logits.shape[-1]:
        # Draw among the k best only: one Gumbel variate per kept token instead of per vocabulary
        # entry (random bits for 50257 entries per row cost more than the model's step on a CPU).
        best, where = jax.lax.top_k(logits, top_k)
        pick = jax.random.categorical(key, best / temperature, axis=-1)
        idx = jnp.take_along_axis(where, pick[:, None], axis=-1)[:, 0]
    else:
        idx = jax.random.categorical(key, logits / temperature, axis=-1)
    if allowed is not None:
        ok = jnp.take_along_axis(allowed, idx[:, None], axis=-1)[:, 0]
        idx = jnp.where(ok, idx, jnp.argmax(allowed, axis=-1))
    return idx.astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def make_generate(model: GPT2, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                  pad_id: int = 0, return_logits: bool = False, prefill_length: int | None = None):
    """The jitted generator for these settings (prefill_length: GPT2.decode's packed_length, static):
    fn(params, prompts (B, P), lengths (B,), key, stops (n,) token ids, allowed (S, K), next_state (S, K),
       start (B,), vocab (K,) token ids or None) -> Generation.
    Without a constraint, a one-state machine that allows everything stands in (the same program).
    `generate` is the checked front end; this is what a benchmark times and reuses."""

    def fn(params, prompts, lengths, key, stops, allowed, next_state, start, vocab):
        b, p = prompts.shape
        variables = {"params": params}
        cache = model.init_cache(b, p + max_new_tokens)
        prompt_mask = jnp.arange(p)[None, :] >= (p - lengths)[:, None]
        logits, cache = model.apply(variables, prompts, cache, token_mask=prompt_mask, vocab_subset=vocab,
                                    last_only=True, packed_length=prefill_length, method=GPT2.decode)
        k = logits.shape[-1]

        def final(state):
            return ~allowed[state].any(-1)

        carry = dict(t=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, 0], state=start,
                     finished=final(start), n=jnp.zeros((b,), jnp.int32),
                     tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                     scores=jnp.zeros((b, max_new_tokens, k) if return_logits else (0,), jnp.float32))

        def cond(c):  # the last token is emitted after the loop
            return (c["t"] < max_new_tokens - 1) & ~jnp.all(c["finished"])

        def emit(c):
            """Choose and record step t's token from c's logits -> (new carry, token, active)."""
            t, active = c["t"], ~c["finished"]
            idx = pick_tokens(c["logits"], jax.random.fold_in(key, t), allowed[c["state"]], temperature, top_k)
            token = jnp.where(active, idx if vocab is None else vocab[idx], pad_id)
            state = jnp.where(active, next_state[c["state"], idx], c["state"])
            stopped = active & (jnp.isin(token, stops) | final(state))
            out = dict(c, t=t + 1, state=state, finished=c["finished"] | stopped, n=c["n"] + active,
                       tokens=c["tokens"].at[:, t].set(token))
            if return_logits:
                out["scores"] = c["scores"].at[:, t].set(c["logits"])
            return out, token, active

        def body(c):
            out, token, active = emit(c)
            out["logits"], out["cache"] = _step(token, active, c["cache"])
            return out

        def _step(token, active, cache):
            logits, cache = model.apply(variables, token[:, None], cache, token_mask=active[:, None],
                                        vocab_subset=vocab, method=GPT2.decode)
            return logits[:, 0], cache

        c = jax.lax.while_loop(cond, body, carry)
        # If every row stopped early, no row is active here and this records only padding.
        c, _, _ = emit(c)
        return Generation(c["tokens"], c["n"], c["finished"], c["state"], c["scores"] if return_logits else None)

    return jax.jit(fn)


def generate(model: GPT2, params, prompts, lengths, key=None, **settings) -> Generation:
    """Continue each left-padded prompt row (prompts (B, P) int, lengths (B,) real tokens at its end).

    settings: max_new_tokens (required), temperature (0 = greedy), top_k (0 = all), stop_tokens,
    pad_id, constraint (a Constraint), start_state (B,), return_logits, restrict_vocab. With a
    constraint, rows start in `start_state` (default 0) and, when `restrict_vocab` (default), only
    the tokens some state allows are scored (the Generation's logits then have those K columns, in
    increasing token order); a stop token is then only ever emitted where the machine allows it.
    Inputs are checked before anything is compiled."""
    fn, args = prepare(model, params, prompts, lengths, key, **settings)
    return fn(*args)


def packed_length(lengths, width: int, buckets: int = 16) -> int | None:
    """Slots for the packed prefill of prompts of these lengths padded to `width`: their total,
    rounded up to one of `buckets` sizes so that batches of similar prompts share one compiled
    program; None (no packing) when that saves nothing."""
    full = len(lengths) * width
    step = max(8, -(-full // buckets))
    n = -(-int(np.sum(lengths)) // step) * step
    return None if n >= full else n


def prepare(model: GPT2, params, prompts, lengths, key=None, *, max_new_tokens: int, temperature: float = 0.0,
            top_k: int = 0, stop_tokens: Sequence[int] = (), pad_id: int = 0, constraint: Constraint | None = None,
            start_state=None, return_logits: bool = False, restrict_vocab: bool = True):
    """(the jitted generator, its arguments) for `generate`'s inputs, checked: what a benchmark
    compiles once (fn.lower(*args).compile()) and then times."""
    prompts = np.asarray(prompts)
    lengths = np.asarray(lengths)
    if prompts.ndim != 2 or prompts.dtype.kind not in "iu":
        raise ValueError(f"prompts must be a (batch, length) int array, got {prompts.dtype} {prompts.shape}")
    b, p = prompts.shape
    if lengths.shape != (b,) or lengths.min(initial=1) < 1 or lengths.max(initial=0) > p:
        raise ValueError(f"lengths must be ({b},) ints in 1..{p} (a prompt needs at least one token), got {lengths}")
    if prompts.min(initial=0) < 0 or prompts.max(initial=0) >= model.vocab_size:
        raise ValueError(f"prompt token ids must lie in 0..{model.vocab_size - 1}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(lengths.max()) + max_new_tokens > model.n_positions:
        raise ValueError(f"prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"n_positions {model.n_positions}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    key = jax.random.key(0) if key is None else key

    if constraint is None:  # a one-state machine that allows every token
        constraint = Constraint(np.ones((1, model.vocab_size), bool), np.zeros((1, model.vocab_size), np.int32))
        start_state = None
    if constraint.allowed.shape[1] != model.vocab_size:
        raise ValueError(f"constraint covers {constraint.allowed.shape[1]} tokens, the model has {model.vocab_size}")
    start = np.zeros((b,), np.int32) if start_state is None else np.asarray(start_state, np.int32)
    if start.shape != (b,) or start.min() < 0 or start.max() >= constraint.num_states:
        raise ValueError(f"start_state must be ({b},) states in 0..{constraint.num_states - 1}")
    allowed, next_state, vocab = constraint.allowed, constraint.next_state, None
    scored = allowed.any(axis=0)
    if restrict_vocab and not scored.all():  # (the whole vocabulary needs no gather)
        vocab = np.flatnonzero(scored).astype(np.int32)
        allowed, next_state = allowed[:, vocab], next_state[:, vocab]
    stops = np.array(list(stop_tokens) or [-1], np.int32)
    fn = make_generate(model, max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                       pad_id=int(pad_id), return_logits=bool(return_logits),
                       prefill_length=packed_length(lengths, p))
    return fn, (params, jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32), key, jnp.asarray(stops),
                jnp.asarray(allowed), jnp.asarray(next_state, jnp.int32), jnp.asarray(start),
                None if vocab is None else jnp.asarray(vocab))
