"""Sophia-G: the Gauss-Newton-Bartlett (GNB) Hessian-diagonal estimator, plus Sophia diagnostics.

Sophia itself (momentum, Hessian EMA, clipped ratio, refresh every k steps) is optax.contrib's
scale_by_sophia; eojax only plugs a different `hessian_diagonal_fn` into it.

GNB (Liu et al. 2023, Alg. 2). For a mean loss L(w) = (1/n) sum_i l(f_i(w), y_i) with a softmax
cross-entropy l, sample labels y_hat_i ~ softmax(f_i(w)) from the model itself and take
g = grad_w (1/n) sum_i l(f_i(w), y_hat_i). Because E[p_i - e_{y_hat_i}] = 0 and the samples are
independent, E[g g^T] = (1/n^2) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, so

    h = n * g * g      is an unbiased estimate of diag(GN(L)) = diag((1/n) sum_i J_i^T H_i J_i).

The official implementation keeps the EMA of g*g and multiplies by rho * batch_tokens at step time;
scaling by n here and using gamma for rho is the same update.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import SophiaState


class GNBState(NamedTuple):
    # A raw uint32 PRNGKey (not a typed key) so Orbax checkpoints it as a plain array.
    key: jax.Array


def sample_labels(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """Integer labels drawn from the model's own predictive distribution softmax(logits).

    Gradients never flow through the sampling (stop_gradient): GNB differentiates the loss at fixed
    sampled labels. Shape: logits.shape[:-1], dtype int32.
    """
    return jax.random.categorical(rng, jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)


def gnb_estimator(seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Hessian-diagonal estimator for optax.contrib.scale_by_sophia(hessian_diagonal_fn=...).

    update(updates, state, params, sampled_obj_fn=...) -> (h, state) where
    sampled_obj_fn(params, rng) -> (mean loss on labels sampled from the model, label-token count n)
    and h = n * g**2, g = grad of that mean loss. n may be a traced array (e.g. a count of valid
    tokens); it is treated as a constant.
    """

    def init_fn(params):
        del params
        return GNBState(key=jax.random.PRNGKey(seed))

    def update_fn(updates, state, params=None, sampled_obj_fn=None, **extra):
        del updates, extra
        if params is None:
            raise ValueError("Sophia-G (GNB estimator) needs params in tx.update(grads, state, params, ...)")
        if sampled_obj_fn is None:
            raise ValueError(
                "Sophia-G (optim.name='sophia_g') needs tx.update(..., sampled_obj_fn=fn) with "
                "fn(params, rng) -> (mean loss on labels sampled from the model, number of label tokens)")
        key, sub = jax.random.split(state.key)
        def loss_and_count(p):
            out = sampled_obj_fn(p, sub)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError("sampled_obj_fn(params, rng) must return (mean loss on sampled labels, "
                                 f"number of label tokens); got {type(out).__name__}")
            return out[0], out[1]

        grads, n = jax.grad(loss_and_count, has_aux=True)(params)
        n = jax.lax.stop_gradient(n)
        h = jax.tree.map(lambda g: jnp.asarray(n, g.dtype) * g * g, grads)
        return h, GNBState(key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_sophia_state(opt_state: Any) -> Optional[SophiaState]:
    """The (single) SophiaState inside a chained optimizer state, or None."""
    found = []

    def visit(node):
        if isinstance(node, SophiaState):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(opt_state)
    if len(found) > 1:
        raise ValueError(f"expected one SophiaState in the optimizer state, found {len(found)}")
    return found[0] if found else None


def win_rate(state: SophiaState, b1: float, gamma: float, eps: float, clip: float,
             include: Any = None) -> jax.Array:
    """Fraction of coordinates whose pre-clip ratio |m_hat| / max(gamma * h, eps) is below `clip`.

    Uses the state as stored after the last update: m_hat = state.mu / (1 - b1**state.count), which is
    exactly the momentum the last update used, and h = state.nu, which is the Hessian EMA the last
    update used except right after a refresh step (every update_every steps, the EMA is refreshed
    after the update is formed), when it is the newer one the next step will use. The Sophia paper
    suggests keeping this between 0.1 and 0.5; too low -> raise gamma.
    `include`: optional bool tree like the params (False = leave out, e.g. frozen params).
    """
    count = state.count
    correction = jnp.where(count > 0, 1.0 - jnp.power(jnp.float32(b1), count.astype(jnp.float32)), 1.0)
    if include is None:
        include = jax.tree.map(lambda _: True, state.mu)

    def wins(m, h, keep):
        if not keep:
            return jnp.zeros((), jnp.float32)
        ratio = jnp.abs(m.astype(jnp.float32) / correction) / jnp.maximum(
            gamma * h.astype(jnp.float32), eps)
        return jnp.sum(ratio < clip).astype(jnp.float32)

    won = sum(jax.tree.leaves(jax.tree.map(wins, state.mu, state.nu, include)))
    total = sum(m.size for m, keep in zip(jax.tree.leaves(state.mu), jax.tree.leaves(include)) if keep)
    return jnp.asarray(won, jnp.float32) / max(total, 1)
