"""The one optimizer builder: `build(config.optim, total_steps) -> Optimizer`.

AdamW, SGD (momentum / Nesterov), Sophia-H (Hutchinson, optax.contrib), Sophia-G (the official
SophiaG of Liuhong99/Sophia, sophia.py) and aispace's Sophia variant ('sophia_aispace', the kyegomez
copy koyacolab/aispace trained with, sophia.py), with warmup + decay schedules, weight-decay masks,
frozen parameters and global-norm clipping (torch's clip_grad_norm_ formula for the two torch-derived
Sophias, optax's for the rest). Parameter trees are plain (unboxed) nested dicts of arrays; masks are
regexes matched with re.search on the '/'-joined parameter path, e.g. 'encoder/block_0/ln1/scale'.

Weight decay (`no_decay`): the default skips biases ('bias$'), norm scales ('scale$': flax LayerNorm /
GroupNorm / RMSNorm name theirs 'scale'), and embeddings. An embedding is a parameter whose *own name*
contains 'embed' ('embed[^/]*$': nn.Embed's 'embedding', 'pos_embed', 'channel_embed', ...) or
'pos_emb', plus cls / mask tokens. A kernel that merely lives under a module named like
'patch_embed' is a linear projection and IS decayed, as in MAE / timm.

Frozen parameters (`freeze`) get an update of exactly 0.0, so they stay bit-identical:
- AdamW / SGD: optax.multi_transform with set_to_zero for the frozen group, so no moments are kept
  for them and clip_norm's global norm covers trainable gradients only.
- Sophia: its Hessian estimator differentiates obj_fn / sampled_obj_fn over the whole parameter
  tree, so the chain keeps full-tree state; frozen gradients are zeroed at the start (so clipping
  and momentum ignore them; Sophia-G also zeroes them in the sampled gradient before clipping it) and
  frozen updates are zeroed at the end (weight decay would move them).
A freeze pattern that matches no parameter is an error (a typo would silently train everything).

SGD weight decay is coupled (added to the gradient before momentum, as torch.optim.SGD); AdamW and
Sophia decay is decoupled (lr * wd * param, as optax.adamw and the Sophia reference code).

Parameter groups (`lr_scales`): (regex, factor) pairs; a parameter's whole update (its learning rate,
decoupled weight decay included) is multiplied by the factor of the first pattern that matches it, as
torch's per-group lr does; e.g. (('^encoder/', 0.1),) fine-tunes a pretrained encoder gently.

Layer-wise lr decay (`layer_decay` < 1): MAE / BEiT's `param_groups_lrd` + `get_layer_id_for_vit`
(SatMAE++ fine-tunes with it). Each parameter gets a layer id: 0 for the embeddings
(`layer_decay_embed`: cls_token, pos_embed, patch_embed*, CROMA's linear_input), i + 1 for block i
(`layer_decay_block`, whose named group `block` is the index; a match without that group is a scanned
stack whose leading axis is the block index), and num_layers = depth + 1 for everything else (final
norm, heads, decoders), depth being the largest block index + 1. Its update is multiplied by
layer_decay ** (num_layers - id), on top of its `lr_scales` factor; like lr_scales it scales the whole
update (decoupled weight decay included, as the reference's per-group lr does). Weight decay is still
`no_decay`'s (the reference skips 1-D parameters and cls / pos embeddings: eojax's default patterns
skip the same ones in a ViT, its 2-D per-head q / k / v biases included).

EMA (`ema_decay` > 0): the optimizer state also keeps an exponential moving average of the parameters
(after each update), so it is sharded like them and checkpointed with the run; `eval_params` returns it.
The decay warms up as min(ema_decay, (1 + n) / (10 + n)) over the n updates so far, so early averages
are not dominated by the random initialisation. Frozen parameters have no average (None in its tree, as
diffusers keeps the EMA of the UNet only): `eval_params` takes them as they are, since they never change.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

try:
    from optax.contrib import scale_by_sophia
except ImportError:  # optax 0.2.x exports only the full `sophia` chain; the scaling part is here
    from optax.contrib._sophia import scale_by_sophia

from eojax.optim import sophia as sophia_lib
from eojax.optim.schedules import SCHEDULES, make_schedule
from eojax.optim.sophia import gnb_estimator, sample_labels

__all__ = ["NAMES", "SCHEDULES", "EmaState", "Optimizer", "build", "default_config", "fill_frozen", "gnb_estimator",
           "layer_ids", "param_paths", "sample_labels", "without_frozen"]

NAMES = ("adamw", "sgd", "sophia_h", "sophia_g", "sophia_aispace")
_NEEDS = {"adamw": (), "sgd": (), "sophia_h": ("obj_fn",), "sophia_g": ("sampled_obj_fn",),
          "sophia_aispace": ()}


def default_config() -> ml_collections.ConfigDict:
    """Every optimizer field with its default; experiment configs start from this."""
    return ml_collections.ConfigDict(dict(
        name="adamw",              # adamw | sgd | sophia_h | sophia_g | sophia_aispace
        lr=1e-3,                   # peak learning rate
        schedule="cosine",         # cosine | cosine_restarts | linear | constant | step
        warmup_steps=0,            # linear warmup from 0 to lr
        end_lr_factor=0.0,         # cosine / linear decay to lr * end_lr_factor at total_steps
        # 'cosine_restarts': num_cycles cosines from lr to lr * end_lr_factor after the warmup, each
        # restarting at lr (Hugging Face's cosine with hard restarts when end_lr_factor is 0)
        num_cycles=1,
        step_boundaries=(0.6, 0.9),  # 'step': fractions of total_steps
        step_factor=0.1,           # 'step': lr *= step_factor at each boundary
        weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8,  # AdamW
        momentum=0.0, nesterov=False,  # SGD
        clip_norm=0.0,             # global-norm gradient clipping; 0 = off
        no_decay=("bias$", "scale$", "embed[^/]*$", "pos_emb[^/]*$", "(^|/)cls(_token)?$",
                  "mask_token"),
        freeze=(),                 # regexes of parameters that must not change
        lr_scales=(),              # ((regex, factor), ...): per-group lr multipliers, first match wins
        # Layer-wise lr decay (MAE / BEiT; module docstring): < 1 multiplies the update of a parameter of
        # layer id k by layer_decay ** (depth + 1 - k); 1.0 = off. layer_decay_block: regex whose named
        # group `block` is the block index (a match without it: a scanned stack, leading axis = block);
        # layer_decay_embed: regex of the layer-0 (embedding) parameters. re.search on param paths.
        layer_decay=1.0,
        layer_decay_block=r"(^|/)blocks/(block_(?P<block>\d+)|layers)/",
        layer_decay_embed=r"(^|/)(cls_token|pos_embed|patch_embed[^/]*|linear_input)(/|$)",
        ema_decay=0.0,             # > 0: keep an EMA of the params (eval_params), e.g. 0.999
        accum_steps=1,             # gradient-accumulation micro-steps (done by the trainer)
        # gamma: the official rho; eps: 1e-15 as the official denominator rho * bs * h + 1e-15
        # (Sophia-H: max(gamma * h, eps)); update_every: Hessian refresh interval k (not used by
        # sophia_aispace, which updates h every step); seed: PRNG of the Hutchinson / GNB estimators.
        sophia=dict(gamma=0.01, clip=1.0, b1=0.965, b2=0.99, update_every=10, eps=1e-15, seed=0),
    ))


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What the trainer needs from the optimizer.

    tx: call tx.update(grads, opt_state, params, **kw) with kw naming exactly `needs`:
        'obj_fn': params -> loss (Sophia-H); 'sampled_obj_fn': (params, rng) -> (loss on labels
        sampled from the model, label-token count) (Sophia-G).
    schedule: step -> lr (for logging; tx applies it itself).
    diagnostics: (opt_state, params) -> dict of scalar metrics ({} for AdamW / SGD).
    eval_params(params, opt_state): the parameters to evaluate, sample and export with: the EMA when
        optim.ema_decay > 0, else `params` itself.
    keeps_ema: optim.ema_decay > 0.
    average_model_state(ema, new, opt_state): the model state's EMA (e.g. BatchNorm statistics) after
        the update from `opt_state`, with the decay the parameters' EMA used ({} without an EMA).
    hessian_batch_every: k > 0 when the optimizer's Hessian estimate takes a batch of its own before
        steps k, 2k, ... (Sophia-G: the official loop estimates on a fresh batch that no gradient
        sees); the trainer then draws it from the input and passes it as the step's `hessian_batch`.
    frozen: params -> bool tree (True: optim.freeze holds it still), None without optim.freeze; the
        trainer differentiates the other parameters only.
    """
    tx: optax.GradientTransformationExtraArgs
    schedule: Callable[[Any], jax.Array]
    diagnostics: Callable[[Any, Any], dict]
    needs: tuple[str, ...]
    name: str
    eval_params: Callable[[Any, Any], Any] = lambda params, opt_state: params
    keeps_ema: bool = False
    average_model_state: Callable[[Any, Any, Any], Any] = lambda ema, new, opt_state: ema
    hessian_batch_every: int = 0
    frozen: Callable[[Any], Any] | None = None

    def takes_hessian_batch(self, step: int) -> bool:
        """Whether the update of step `step` (0-based: the state's step before it) refreshes the
        Hessian on a fresh batch."""
        k = self.hessian_batch_every
        return k > 0 and step > 0 and step % k == 0


# ---------------------------------------------------------------- parameter paths and masks

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_paths(tree) -> Any:
    """Tree like `tree` whose leaves are the '/'-joined key paths ('enc/ln/scale')."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "/".join(_key_name(k) for k in p), tree)


def _matcher(patterns) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(c.search(path) for c in compiled)


def _decay_mask(no_decay) -> Callable[[Any], Any]:
    skip = _matcher(no_decay)
    return lambda params: jax.tree.map(lambda path: not skip(path), param_paths(params))


def _frozen_mask(freeze) -> Callable[[Any], Any]:
    """params -> bool tree (True = frozen); raises if a pattern matches no parameter."""
    def mask(params):
        paths = jax.tree.leaves(param_paths(params))
        for pattern in freeze:
            if not any(re.search(pattern, p) for p in paths):
                raise ValueError(f"optim.freeze pattern {pattern!r} matches no parameter; "
                                 f"parameters look like {paths[:5]}")
        return jax.tree.map(_matcher(freeze), param_paths(params))
    return mask


# ---------------------------------------------------------------- validation

def _merged(cfg) -> ml_collections.ConfigDict:
    """Defaults overlaid with cfg; an unknown key (a typo) is an error naming it."""
    out = default_config()
    for key, value in cfg.items():
        if key not in out:
            raise ValueError(f"unknown key optim.{key}; allowed keys: {sorted(out.keys())}")
        if key == "sophia":
            for k, v in value.items():
                if k not in out.sophia:
                    raise ValueError(f"unknown key optim.sophia.{k}; allowed: {sorted(out.sophia.keys())}")
                _set(out.sophia, k, v, f"sophia.{k}")
        elif key in ("step_boundaries", "no_decay", "freeze") and isinstance(value, (list, tuple)):
            out[key] = tuple(value)
        elif key == "lr_scales" and isinstance(value, (list, tuple)):
            out[key] = tuple(tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in value)
        else:
            _set(out, key, value, key)
    return out


def _set(config, key, value, name):
    # ConfigDict is type-safe (a str into a float field raises TypeError); report it by key.
    try:
        config[key] = value
    except TypeError as e:
        raise ValueError(f"optim.{name}={value!r} has the wrong type "
                         f"(default {config[key]!r}): {e}") from None


def _require(ok: bool, key: str, value, allowed: str):
    if not ok:
        raise ValueError(f"optim.{key}={value!r} is invalid; allowed: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(c: ml_collections.ConfigDict, total_steps: int):
    _require(c.name in NAMES, "name", c.name, f"one of {NAMES}")
    _require(c.schedule in SCHEDULES, "schedule", c.schedule, f"one of {SCHEDULES}")
    if not (_is_int(total_steps) and total_steps >= 1):
        raise ValueError(f"total_steps={total_steps!r} must be an int >= 1")
    _require(c.lr > 0, "lr", c.lr, "a number > 0")
    # warmup_steps > total_steps is allowed (a short debug run of a long config just stays in warmup).
    _require(_is_int(c.warmup_steps) and c.warmup_steps >= 0, "warmup_steps", c.warmup_steps, "an int >= 0")
    _require(c.end_lr_factor >= 0, "end_lr_factor", c.end_lr_factor, "a number >= 0")
    _require(_is_int(c.num_cycles) and c.num_cycles >= 1, "num_cycles", c.num_cycles, "an int >= 1")
    b = c.step_boundaries
    _require(isinstance(b, tuple) and all(0 < x <= 1 for x in b) and list(b) == sorted(b),
             "step_boundaries", b, "ascending fractions of total_steps in (0, 1]")
    _require(c.step_factor > 0, "step_factor", c.step_factor, "a number > 0")
    _require(c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    for key in ("b1", "b2"):
        _require(0 <= c[key] < 1, key, c[key], "a number in [0, 1)")
    _require(c.eps > 0, "eps", c.eps, "a number > 0")
    _require(0 <= c.momentum < 1, "momentum", c.momentum, "a number in [0, 1)")
    _require(isinstance(c.nesterov, bool), "nesterov", c.nesterov, "True or False")
    _require(not (c.nesterov and c.momentum == 0), "nesterov", c.nesterov,
             "False when optim.momentum is 0 (Nesterov needs momentum)")
    _require(c.clip_norm >= 0, "clip_norm", c.clip_norm, "a number >= 0 (0 = off)")
    _require(_is_int(c.accum_steps) and c.accum_steps >= 1, "accum_steps", c.accum_steps, "an int >= 1")
    for key in ("no_decay", "freeze"):
        pats = c[key]
        _require(isinstance(pats, tuple) and all(isinstance(p, str) for p in pats), key, pats,
                 "a tuple of regex strings")
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"optim.{key} pattern {p!r} is not a valid regex: {e}") from None
    for pair in c.lr_scales:
        _require(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                 and isinstance(pair[1], (int, float)) and pair[1] > 0, "lr_scales", c.lr_scales,
                 "((regex, factor > 0), ...); use optim.freeze for a factor of 0")
        try:
            re.compile(pair[0])
        except re.error as e:
            raise ValueError(f"optim.lr_scales pattern {pair[0]!r} is not a valid regex: {e}") from None
    _require(0 < c.layer_decay <= 1, "layer_decay", c.layer_decay, "a number in (0, 1] (1 = off)")
    for key in ("layer_decay_block", "layer_decay_embed"):
        _require(isinstance(c[key], str), key, c[key], "a regex string")
        try:
            compiled = re.compile(c[key])
        except re.error as e:
            raise ValueError(f"optim.{key} pattern {c[key]!r} is not a valid regex: {e}") from None
        if key == "layer_decay_block":
            _require("block" in compiled.groupindex, key, c[key],
                     "a regex with a named group (?P<block>\\d+) capturing the block index")
    _require(0 <= c.ema_decay < 1, "ema_decay", c.ema_decay, "a number in [0, 1) (0 = off)")
    s = c.sophia
    _require(s.gamma > 0, "sophia.gamma", s.gamma, "a number > 0")
    _require(s.clip > 0, "sophia.clip", s.clip, "a number > 0")
    for key in ("b1", "b2"):
        _require(0 <= s[key] < 1, f"sophia.{key}", s[key], "a number in [0, 1)")
    _require(_is_int(s.update_every) and s.update_every >= 1, "sophia.update_every",
             s.update_every, "an int >= 1")
    _require(s.eps > 0, "sophia.eps", s.eps, "a number > 0")
    _require(_is_int(s.seed), "sophia.seed", s.seed, "an int")


# ---------------------------------------------------------------- build

def build(cfg: ml_collections.ConfigDict, total_steps: int) -> Optimizer:
    """Optimizer from config.optim; bad values raise ValueError naming the key, before any work."""
    c = _merged(cfg)
    _validate(c, total_steps)
    schedule = make_schedule(c.schedule, c.lr, total_steps, c.warmup_steps, c.end_lr_factor,
                             c.step_boundaries, c.step_factor, c.num_cycles)
    clip = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
    decay = ([optax.add_decayed_weights(c.weight_decay, mask=_decay_mask(c.no_decay))]
             if c.weight_decay > 0 else [])
    frozen = _frozen_mask(c.freeze)

    if c.name in ("adamw", "sgd"):
        if c.name == "adamw":
            core = [optax.scale_by_adam(c.b1, c.b2, c.eps), *decay]
        else:  # coupled L2 before momentum, as torch.optim.SGD
            core = [*decay] + ([optax.trace(c.momentum, c.nesterov)] if c.momentum > 0 else [])
        tx = optax.chain(*clip, *core, optax.scale_by_learning_rate(schedule))
        if c.freeze:
            labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train", frozen(params))
            tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
        return _finish(c, optax.with_extra_args_support(tx), schedule,
                       diagnostics=lambda opt_state, params=None: {}, needs=())

    s = c.sophia
    if c.name == "sophia_h":
        estimator = optax.contrib.hutchinson_estimator_diag_hessian(jax.random.PRNGKey(s.seed))
        core = scale_by_sophia(b1=s.b1, b2=s.b2, eps=s.eps, gamma=s.gamma, clip_threshold=s.clip,
                               update_interval=s.update_every, hessian_diagonal_fn=estimator)
        ratio = sophia_lib.optax_ratio(s.b1, s.gamma, s.eps)
    else:  # the torch-derived Sophias clip as torch.nn.utils.clip_grad_norm_ does
        clip = [sophia_lib.clip_by_global_norm_torch(c.clip_norm)] if c.clip_norm > 0 else []
        if c.name == "sophia_g":
            estimator = gnb_estimator(s.seed, c.clip_norm, frozen if c.freeze else None)
            core = sophia_lib.scale_by_sophia_g(s.b1, s.b2, s.gamma, s.eps, s.clip, s.update_every,
                                                estimator)
            ratio = sophia_lib.official_ratio(s.gamma, s.eps)
        else:
            core = sophia_lib.scale_by_sophia_aispace(s.b1, s.b2, s.gamma, s.eps, s.clip)
            ratio = sophia_lib.official_ratio(s.gamma * sophia_lib.AISPACE_BS, s.eps)
    zero_frozen = [optax.masked(optax.set_to_zero(), frozen)] if c.freeze else []
    tx = optax.chain(*zero_frozen, *clip, core, *decay, optax.scale_by_learning_rate(schedule),
                     *zero_frozen)

    def diagnostics(opt_state, params=None):
        state = sophia_lib.find_sophia_state(opt_state)
        include = None
        if c.freeze and params is not None:
            include = jax.tree.map(lambda f: not f, frozen(params))
        return {"sophia_win_rate": sophia_lib.win_rate(state, ratio, s.clip, include)}

    return _finish(c, tx, schedule, diagnostics=diagnostics, needs=_NEEDS[c.name],
                   hessian_batch_every=s.update_every if c.name == "sophia_g" else 0)


def _finish(c, tx, schedule, diagnostics, needs, hessian_batch_every: int = 0) -> Optimizer:
    """Adds the parameter-group lr factors and the EMA around the optimizer's own chain."""
    if c.lr_scales or c.layer_decay != 1.0:
        decay = (c.layer_decay, c.layer_decay_block, c.layer_decay_embed) if c.layer_decay != 1.0 else None
        tx = optax.chain(tx, _scale_by_group(c.lr_scales, decay))
    common = dict(schedule=schedule, diagnostics=diagnostics, needs=needs, name=c.name,
                  hessian_batch_every=hessian_batch_every, frozen=_frozen_mask(c.freeze) if c.freeze else None)
    if c.ema_decay <= 0:
        return Optimizer(tx=tx, **common)
    frozen = common["frozen"]
    return Optimizer(tx=_with_ema(tx, c.ema_decay, frozen),
                     eval_params=lambda params, opt_state: fill_frozen(_mask(frozen, params), opt_state.ema, params),
                     keeps_ema=True, average_model_state=lambda ema, new, opt_state: _ema_step(
                         ema, new, opt_state.count, c.ema_decay), **common)


def layer_ids(params, block: str, embed: str) -> tuple[Any, int]:
    """(tree of layer ids, num_layers) by MAE's get_layer_id_for_vit on eojax's paths: 0 for `embed`
    matches, i + 1 for block i (`block`'s named group; for a scanned stack, an int array 1..n along its
    leading axis), num_layers = depth + 1 for the rest, depth = the largest block index + 1. Raises if
    `block` matches no parameter."""
    block_re, embed_re = re.compile(block), re.compile(embed)

    def block_id(path, leaf):  # None, or the ids of the block(s) the parameter belongs to
        m = None if embed_re.search(path) else block_re.search(path)
        if m is None:
            return None
        if m.group("block") is not None:
            return int(m.group("block")) + 1
        if not np.ndim(leaf):
            raise ValueError(f"optim.layer_decay_block: {path!r} matches without a block index, so it "
                             f"should be a scanned stack, but it is a scalar")
        return np.arange(1, np.shape(leaf)[0] + 1)

    paths = param_paths(params)
    ids = jax.tree.map(block_id, paths, params)
    found = [np.max(k) for k in jax.tree.leaves(ids)]  # None leaves vanish
    if not found:
        raise ValueError(f"optim.layer_decay_block pattern {block!r} matches no parameter; "
                         f"parameters look like {jax.tree.leaves(paths)[:5]}")
    num_layers = int(max(found)) + 1
    ids = jax.tree.map(lambda k, path: (0 if embed_re.search(path) else num_layers) if k is None else k,
                       ids, paths, is_leaf=lambda k: k is None)
    return ids, num_layers


def _scale_by_group(lr_scales, layer_decay=None) -> optax.GradientTransformation:
    """Multiplies each update by its lr_scales factor and, with layer_decay = (decay, block, embed), by
    decay ** (num_layers - layer id) (a per-block array along a scanned stack's leading axis)."""
    patterns = [(re.compile(p), float(f)) for p, f in lr_scales]

    def factor(path: str) -> float:
        return next((f for p, f in patterns if p.search(path)), 1.0)

    def factors(tree):
        group = jax.tree.map(factor, param_paths(tree))
        if layer_decay is None:
            return group
        decay, block, embed = layer_decay
        ids, num_layers = layer_ids(tree, block, embed)
        return jax.tree.map(lambda f, k: f * float(decay) ** (num_layers - np.asarray(k, np.float64)),
                            group, ids)

    def init(params):
        paths = jax.tree.leaves(param_paths(params))
        for p, _ in patterns:
            if not any(p.search(x) for x in paths):
                raise ValueError(f"optim.lr_scales pattern {p.pattern!r} matches no parameter; "
                                 f"parameters look like {paths[:5]}")
        if layer_decay is not None:
            layer_ids(params, *layer_decay[1:])  # a block pattern matching nothing fails here
        return optax.EmptyState()

    def scale(u, f):
        if np.ndim(f):  # per block along a scanned stack's leading axis
            return u * jnp.asarray(f, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
        return u if f == 1.0 else u * jnp.asarray(f, u.dtype)

    def update(updates, state, params=None):
        return jax.tree.map(scale, updates, factors(updates)), state

    return optax.GradientTransformation(init, update)


class EmaState(NamedTuple):
    inner: Any
    count: jax.Array
    ema: Any


def without_frozen(mask, params):
    """`params` with None in place of the leaves `mask` (a bool tree, or None: nothing) marks."""
    if mask is None:
        return params
    return jax.tree.map(lambda f, p: None if f else p, mask, params)


def fill_frozen(mask, tree, params):
    """`tree`, as `without_frozen(mask, ...)` left it, with the marked leaves taken from `params`."""
    if mask is None:
        return tree
    return jax.tree.map(lambda f, t, p: p if f else t, mask, tree, params)


def _mask(frozen, params):
    return None if frozen is None else frozen(params)


def _with_ema(tx, decay: float, frozen=None) -> optax.GradientTransformationExtraArgs:
    def init(params):
        return EmaState(inner=tx.init(params), count=jnp.zeros((), jnp.int32),
                        ema=jax.tree.map(lambda p: jnp.array(p, copy=True), without_frozen(_mask(frozen, params), params)))

    def update(updates, state, params=None, **extra):
        updates, inner = tx.update(updates, state.inner, params, **extra)
        new = without_frozen(_mask(frozen, params), optax.apply_updates(params, updates))
        ema = _ema_step(state.ema, new, state.count, decay)
        return updates, EmaState(inner=inner, count=state.count + 1, ema=ema)

    return optax.GradientTransformationExtraArgs(init, update)


def _ema_step(ema, new, count, decay: float):
    """One EMA update after `count` earlier ones, the decay warming up as min(decay, (1+n)/(10+n))."""
    n = count.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    # e + (1 - d)(p - e): exactly e when p == e, so a frozen parameter's EMA never drifts by rounding.
    return jax.tree.map(lambda e, p: (e + (1.0 - d) * (p - e)).astype(e.dtype), ema, new)
