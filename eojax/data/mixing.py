"""Mixup / CutMix and random erasing on the device, inside the jitted step (like `device.py`).

`mix` is timm's `Mixup` in 'batch' mode (timm/data/mixup.py, as MAE / SatMAE++ fine-tune with it) and
`random_erase` timm's `RandomErasing(mode='pixel', count=1)` (timm/data/random_erasing.py). Both take
channels-last images (B, H, W, C) of any channel count and keep every shape static, so the Python
branches of the references become `jnp.where` selections on values drawn from a jax PRNG key. The
random streams are jax's, so a draw is never the reference's; the distributions are the same.
In MAE's fine-tuning, random erasing is part of each sample's transform and mixing follows on the
batch: call `random_erase` first, then `mix`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def smooth_labels(labels_onehot, smoothing: float):
    """timm's target smoothing: off = smoothing / K, on = 1 - smoothing + off."""
    k = labels_onehot.shape[-1]
    off = smoothing / k
    on = 1.0 - smoothing + off
    y = labels_onehot.astype(jnp.float32)
    return y * on + (1.0 - y) * off


def cutmix_box(rng, lam, height: int, width: int):
    """timm's rand_bbox: cut ratio sqrt(1 - lam), sides int(size * ratio), centre uniform over the
    pixels, box [centre - side // 2, centre + side // 2) clipped to the image. Returns int32
    (top, bottom, left, right), bottom / right exclusive, and the corrected lambda
    1 - box area / image area."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)  # int() of a non-negative number
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    area = (bottom - top) * (right - left)
    return (top, bottom, left, right), 1.0 - area.astype(jnp.float32) / float(height * width)


def _box_mask(box, height: int, width: int):
    """(H, W) bool, True inside [top, bottom) x [left, right); box entries may carry batch dims."""
    top, bottom, left, right = (jnp.asarray(b)[..., None, None] for b in box)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mix(rng, images, labels_onehot, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
        prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.0):
    """Mixup or CutMix of a whole batch with the batch reversed (timm Mixup, mode='batch').

    images (B, H, W, C), labels_onehot (B, K) -> (images, targets (B, K) float32, aux). With
    probability `prob` the batch is mixed: CutMix with probability `switch_prob` when both alphas are
    > 0 (else whichever is > 0), lambda ~ Beta(alpha, alpha) of the chosen one. Mixup: lam * x +
    (1 - lam) * x[::-1]. CutMix: the box of cutmix_box (area about (1 - lam) of the image) is pasted
    from x[::-1] and lam becomes 1 - box area / image area. Targets: lam * y + (1 - lam) * y[::-1]
    of the smoothed labels (smooth_labels; smoothing applies unmixed too, as in timm). aux: 'lam'
    (the effective lambda, 1 when not mixed), 'mixed', 'cutmix' (bool scalars) and 'box' (top,
    bottom, left, right) of the CutMix box (drawn even when unused).
    """
    if images.ndim != 4 or labels_onehot.ndim != 2 or images.shape[0] != labels_onehot.shape[0]:
        raise ValueError(f"mix: expected images (B, H, W, C) and labels (B, K), got {images.shape}, "
                         f"{labels_onehot.shape}")
    if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError(f"mix: mixup_alpha {mixup_alpha} / cutmix_alpha {cutmix_alpha}: both >= 0 "
                         f"and at least one > 0")
    if not (0 <= prob <= 1 and 0 <= switch_prob <= 1 and 0 <= label_smoothing < 1):
        raise ValueError(f"mix: prob {prob}, switch_prob {switch_prob} must be in [0, 1] and "
                         f"label_smoothing {label_smoothing} in [0, 1)")
    _, height, width, _ = images.shape
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
    mixed = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
    lam_cut = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1)
    box, lam_box = cutmix_box(k_box, lam_cut, height, width)

    flipped = images[::-1]
    lam_x = lam_mixup.astype(images.dtype)
    blended = images * lam_x + flipped * (1 - lam_x)
    pasted = jnp.where(_box_mask(box, height, width)[None, :, :, None], flipped, images)
    out = jnp.where(mixed, jnp.where(cutmix, pasted, blended), images)
    lam = jnp.where(mixed, jnp.where(cutmix, lam_box, lam_mixup), 1.0).astype(jnp.float32)

    y = smooth_labels(labels_onehot, label_smoothing)
    targets = y * lam + y[::-1] * (1.0 - lam)
    return out, targets, dict(lam=lam, mixed=mixed, cutmix=cutmix, box=box)


def random_erase(rng, images, prob: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, attempts: int = 10):
    """Per sample, with probability `prob`, one box of the image is replaced by standard-normal noise
    drawn per pixel and channel (timm RandomErasing, mode='pixel', count=1; for normalised images).

    A box has area uniform in [min_area, max_area] of the image and aspect ratio log-uniform in
    [min_aspect, max_aspect (default 1 / min_aspect)]; h = round(sqrt(area * aspect)), w =
    round(sqrt(area / aspect)), and it fits when h < H and w < W; its top-left corner is uniform
    over the positions that keep it inside. timm draws up to `attempts` boxes one after another and
    takes the first that fits (none: no erasing); here all `attempts` candidates are drawn at once
    (static shapes) and the first fitting one is taken, which gives the same distribution.

    images (B, H, W, C) -> (images, aux): aux 'erased' (B,) bool and 'box' (B, 4) int32 (top, bottom,
    left, right), bottom / right exclusive, empty where nothing was erased.
    """
    if images.ndim != 4:
        raise ValueError(f"random_erase: expected images (B, H, W, C), got {images.shape}")
    if not (0 <= prob <= 1 and 0 < min_area <= max_area and min_aspect > 0 and attempts >= 1):
        raise ValueError(f"random_erase: prob {prob} in [0, 1], 0 < min_area {min_area} <= max_area "
                         f"{max_area}, min_aspect {min_aspect} > 0, attempts {attempts} >= 1")
    b, height, width, _ = images.shape
    max_aspect = max_aspect or 1.0 / min_aspect
    k_do, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(rng, 6)
    shape = (b, attempts)
    area = jax.random.uniform(k_area, shape, minval=min_area, maxval=max_area) * (height * width)
    aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=math.log(min_aspect),
                                        maxval=math.log(max_aspect)))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # round half to even, as Python's round
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits, axis=1)  # the first fitting candidate (0 when none fits)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
    h, w = pick(h), pick(w)
    # randint(0, H - h) inclusive, as random.randint
    top = jax.random.randint(k_top, (b,), 0, jnp.maximum(height - h + 1, 1))
    left = jax.random.randint(k_left, (b,), 0, jnp.maximum(width - w + 1, 1))
    erased = (jax.random.uniform(k_do, (b,)) < prob) & fits.any(axis=1)
    bottom, right = jnp.where(erased, top + h, top), jnp.where(erased, left + w, left)
    box = jnp.stack([top, bottom, left, right], axis=1).astype(jnp.int32)
    inside = _box_mask((top, bottom, left, right), height, width)  # (B, H, W)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32).astype(images.dtype)
    return jnp.where(inside[..., None], noise, images), dict(erased=erased, box=box)
