"""Sophia-G as published, aispace's Sophia variant, the GNB Hessian estimator and Sophia diagnostics.

Sophia-G (`optim.name='sophia_g'`) is the official SophiaG (Liuhong99/Sophia: sophia.py and the
training loop train_sophiag.py), step for step:
- momentum m = b1 * m + (1 - b1) * g, no bias correction;
- update clip(m / (rho * bs * h + 1e-15), -1, 1) (rho = optim.sophia.gamma, 1e-15 = sophia.eps,
  1 = sophia.clip), then decoupled weight decay and the learning rate;
- h = EMA_b2 of the squared gradient of the loss on labels sampled from the model (GNB), refreshed
  after steps k, 2k, ... (the loop's `iter_num % k == k - 1`) at the parameters those steps produced,
  the sampled gradient first clipped to `optim.clip_norm` as the loop clips it. eojax refreshes at
  the start of step t (t = k, 2k, ...) at the current parameters: the same parameters, and the
  refreshed h is first used by the same update (step t). The loop draws a fresh batch for the
  estimate; eojax's train step uses step t's batch (docs/vsat.md).
- bs (the loop's total_bs * block_size) is the sampled-label count n of the estimate: h here is the
  EMA of n * g * g, which is n * EMA(g * g) for the loop's constant bs.

GNB (Liu et al. 2023, Alg. 2). For a mean loss L(w) = (1/n) sum_i l(f_i(w), y_i) with a softmax
cross-entropy l, sample labels y_hat_i ~ softmax(f_i(w)) from the model itself and take
g = grad_w (1/n) sum_i l(f_i(w), y_hat_i). Because E[p_i - e_{y_hat_i}] = 0 and the samples are
independent, E[g g^T] = (1/n^2) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, so

    h = n * g * g      is an unbiased estimate of diag(GN(L)) = diag((1/n) sum_i J_i^T H_i J_i).

aispace's variant (`optim.name='sophia_aispace'`): the kyegomez copy of SophiaG that
koyacolab/aispace trained with (its sophia.py, called by Hugging Face's Trainer as step()): every
step h = EMA_b2 of the TRUE-label gradient squared, the momentum EMA applied twice with the same
gradient, and the update clip(m / (rho * 5120 * h + 1e-15), -1, 1) (bs = step()'s default 5120).
No sampled labels, no refresh interval.

Gradient clipping (`optim.clip_norm`) for both: torch.nn.utils.clip_grad_norm_'s factor
min(1, c / (norm + 1e-6)), which the official loop and Hugging Face's Trainer apply.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import SophiaState

AISPACE_BS = 5120  # kyegomez SophiaG.step(bs=5120): the Trainer never passes bs


class GNBState(NamedTuple):
    # A raw uint32 PRNGKey (not a typed key) so Orbax checkpoints it as a plain array.
    key: jax.Array


def sample_labels(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """Integer labels drawn from the model's own predictive distribution softmax(logits).

    Gradients never flow through the sampling (stop_gradient): GNB differentiates the loss at fixed
    sampled labels. Shape: logits.shape[:-1], dtype int32.
    """
    return jax.random.categorical(rng, jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)


def clip_like_torch(tree: Any, max_norm: float) -> Any:
    """tree * min(1, max_norm / (global norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    factor = jnp.minimum(1.0, max_norm / (optax.global_norm(tree) + 1e-6))
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), tree)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    return optax.stateless(lambda updates, params=None: clip_like_torch(updates, max_norm))


def gnb_estimator(seed: int = 0, clip_norm: float = 0.0,
                  frozen: Optional[Callable[[Any], Any]] = None) -> optax.GradientTransformationExtraArgs:
    """Hessian-diagonal estimator: update(updates, state, params, sampled_obj_fn=...) -> (h, state).

    sampled_obj_fn(params, rng) -> (mean loss on labels sampled from the model, label-token count n)
    and h = n * g**2, g = grad of that mean loss. n may be a traced array (e.g. a count of valid
    tokens); it is treated as a constant. clip_norm > 0: g is clipped to that global norm first (as
    the official loop does), over the trainable parameters: `frozen(params)` (a bool tree, True =
    frozen) marks those whose g is zeroed, since torch leaves frozen parameters without a gradient.
    """

    def init_fn(params):
        del params
        return GNBState(key=jax.random.PRNGKey(seed))

    def update_fn(updates, state, params=None, sampled_obj_fn=None, **extra):
        del updates, extra
        _check_gnb_args(params, sampled_obj_fn)
        key, sub = jax.random.split(state.key)

        def loss_and_count(p):
            out = sampled_obj_fn(p, sub)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError("sampled_obj_fn(params, rng) must return (mean loss on sampled labels, "
                                 f"number of label tokens); got {type(out).__name__}")
            return out[0], out[1]

        grads, n = jax.grad(loss_and_count, has_aux=True)(params)
        n = jax.lax.stop_gradient(n)
        if frozen is not None:
            grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen(params))
        if clip_norm > 0:
            grads = clip_like_torch(grads, clip_norm)
        h = jax.tree.map(lambda g: jnp.asarray(n, g.dtype) * g * g, grads)
        return h, GNBState(key=key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_gnb_args(params, sampled_obj_fn):
    if params is None:
        raise ValueError("Sophia-G (GNB estimator) needs params in tx.update(grads, state, params, ...)")
    if sampled_obj_fn is None:
        raise ValueError(
            "Sophia-G (optim.name='sophia_g') needs tx.update(..., sampled_obj_fn=fn) with "
            "fn(params, rng) -> (mean loss on labels sampled from the model, number of label tokens)")


# ---------------------------------------------------------------- ratios (update and win rate)

Ratio = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def official_ratio(gamma: float, eps: float) -> Ratio:
    """(m, h, count) -> m / (gamma * h + eps): the official SophiaG's m / (rho * bs * h + 1e-15)."""
    return lambda m, h, count: m / (gamma * h + eps)


def optax_ratio(b1: float, gamma: float, eps: float) -> Ratio:
    """(m, h, count) -> m_hat / max(gamma * h, eps), m_hat = m / (1 - b1**count): optax.contrib's
    scale_by_sophia (Sophia-H), whose stored count is the number of updates so far."""
    def ratio(m, h, count):
        correction = jnp.where(count > 0, 1.0 - jnp.power(jnp.float32(b1), count.astype(jnp.float32)), 1.0)
        return (m / correction) / jnp.maximum(gamma * h, eps)
    return ratio


def _ema(decay: float, old: Any, new: Any) -> Any:
    """decay * old + (1 - decay) * new, in old's dtype (torch's mul_(decay).add_(new, 1 - decay))."""
    return jax.tree.map(lambda o, x: (decay * o + (1.0 - decay) * x).astype(o.dtype), old, new)


def _clipped(ratio: Ratio, mu, nu, count, clip: float):
    return jax.tree.map(lambda m, h: jnp.clip(ratio(m, h, count), -clip, clip), mu, nu)


# ---------------------------------------------------------------- the two scalings

def scale_by_sophia_g(b1: float, b2: float, gamma: float, eps: float, clip: float, update_every: int,
                      estimator: optax.GradientTransformationExtraArgs
                      ) -> optax.GradientTransformationExtraArgs:
    """The official SophiaG's scaling (module docstring); its state is optax's SophiaState, whose
    count is the number of updates so far. update(grads, state, params, sampled_obj_fn=...)."""
    ratio = official_ratio(gamma, eps)

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SophiaState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros,
                           hessian_fn_state=estimator.init(params))

    def update_fn(updates, state, params=None, sampled_obj_fn=None, **extra):
        _check_gnb_args(params, sampled_obj_fn)

        def refresh(est_state, nu):
            h, est_state = estimator.update(updates, est_state, params, sampled_obj_fn=sampled_obj_fn)
            return est_state, _ema(b2, nu, h)

        # The loop refreshes after steps with iter_num % k == k - 1, i.e. before update k, 2k, ...
        due = (state.count > 0) & (state.count % update_every == 0)
        est_state, nu = jax.lax.cond(due, refresh, lambda s, n: (s, n), state.hessian_fn_state, state.nu)
        mu = _ema(b1, state.mu, updates)
        count = optax.safe_int32_increment(state.count)
        return _clipped(ratio, mu, nu, count, clip), SophiaState(count, mu, nu, est_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_sophia_aispace(b1: float, b2: float, gamma: float, eps: float,
                            clip: float) -> optax.GradientTransformationExtraArgs:
    """aispace's kyegomez SophiaG (module docstring): per step h <- EMA_b2(g * g), m <- EMA_b1(g)
    twice, update clip(m / (gamma * 5120 * h + eps), -clip, clip)."""
    ratio = official_ratio(gamma * AISPACE_BS, eps)

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SophiaState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros,
                           hessian_fn_state=optax.EmptyState())

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        nu = _ema(b2, state.nu, jax.tree.map(lambda g: g * g, updates))
        # step() calls update_exp_avg() and then updates exp_avg again in _single_tensor_sophiag.
        mu = _ema(b1, _ema(b1, state.mu, updates), updates)
        count = optax.safe_int32_increment(state.count)
        return _clipped(ratio, mu, nu, count, clip), SophiaState(count, mu, nu, state.hessian_fn_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------- diagnostics

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


def win_rate(state: SophiaState, ratio: Ratio, clip: float, include: Any = None) -> jax.Array:
    """Fraction of coordinates whose pre-clip ratio |ratio(m, h, count)| is below `clip`, from the
    state as stored after the last update (for sophia_g / sophia_aispace exactly the m and h that
    update used; for sophia_h's optax scaling h may be the newer EMA a refresh left for the next).
    The official loop's `num_effective / num_param`; the Sophia paper suggests keeping it between
    0.1 and 0.5 (too low -> raise gamma).
    `include`: optional bool tree like the params (False = leave out, e.g. frozen params).
    """
    if include is None:
        include = jax.tree.map(lambda _: True, state.mu)

    def wins(m, h, keep):
        if not keep:
            return jnp.zeros((), jnp.float32)
        r = ratio(m.astype(jnp.float32), h.astype(jnp.float32), state.count)
        return jnp.sum(jnp.abs(r) < clip).astype(jnp.float32)

    won = sum(jax.tree.leaves(jax.tree.map(wins, state.mu, state.nu, include)))
    total = sum(m.size for m, keep in zip(jax.tree.leaves(state.mu), jax.tree.leaves(include)) if keep)
    return jnp.asarray(won, jnp.float32) / max(total, 1)
