"""Shared machinery for importing published PyTorch checkpoints: safe file reading, a key table that
maps torch keys to eojax parameter paths (both ways), mismatch reporting, and placement on devices.

A family module (satmae, prithvi, dofa, croma) writes its key table from the reference's module
layout out of these entries; `convert` and `export` then do the rest.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import CheckpointMismatchError, check_compatible, key_problems, raise_mismatch

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", ".npz") + TORCH_SUFFIXES


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------
def load_state_dict(path, what: str = "checkpoint") -> dict[str, np.ndarray]:
    """A flat {torch key: array} from .safetensors, .npz, or (torch installed) .pth / .pt / .bin; a
    file without a suffix is read as its content says (_sniff).

    A {'model': state_dict, ...} or {'state_dict': ...} wrapper (what training scripts save) is
    unwrapped, nested dicts of state dicts (CROMA's {'s2_encoder': {...}, ...}) are flattened with
    '.', and a DDP 'module.' prefix stripped. Nothing is ever unpickled beyond what
    torch.load(weights_only=True) allows.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    suffix = os.path.splitext(path)[1].lower() or _sniff(path)
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; expected one of {SUFFIXES}")
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file
            obj = load_file(path)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:  # raises on object (pickled) arrays
                obj = {k: z[k] for k in z.files}
        else:
            obj = _torch_load(path)
    except ImportError:
        raise
    except Exception as e:  # every reader has its own exception types; name the file in all cases
        raise ValueError(f"{path} is not a readable {suffix} checkpoint: {type(e).__name__}: {e}") from e
    return _unwrap(obj, path)


def _sniff(path: str) -> str:
    """The format of a file named without a suffix (a published one may be: SatMAE++'s fine-tuned
    fMoW-RGB), from its first bytes: a zip holding data.pkl is torch.save's, another zip an .npz, an
    8-byte length and '{' a safetensors header; '' otherwise (refused as unknown)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return ""
        return ".pth" if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) else ".npz"
    return ".safetensors" if len(head) == 9 and head[8:9] == b"{" else ""


def _torch_load(path: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading a PyTorch checkpoint needs torch, which is not installed. Convert it to "
            ".safetensors where torch is: safetensors.torch.save_file(torch.load(path, "
            "weights_only=True)['model'], 'ckpt.safetensors')") from e
    # Training scripts also pickle their argparse.Namespace (a plain attribute bag, allowed);
    # weights_only refuses every other non-tensor class.
    allow = getattr(torch.serialization, "safe_globals", None)
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        return torch.load(path, map_location="cpu", weights_only=True)


def _flatten(obj: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} holds no state dict (got {type(obj).__name__})")
    obj = _flatten(obj)
    if all(str(k).startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    out, bad = {}, []
    for k, v in obj.items():
        if hasattr(v, "detach"):  # a torch tensor; numpy has no bfloat16, float32 holds it exactly
            v = v.detach().cpu()
            v = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
        if isinstance(v, np.ndarray) and v.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            v = v.astype(np.float32)  # ml_dtypes floats (safetensors bf16): exact in float32
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
            out[str(k)] = v
        else:
            bad.append(f"{k} ({type(v).__name__})")
    if bad:
        raise ValueError(f"{path}: state dict entries that are not numeric arrays: {bad[:10]}")
    return out


def find_prefix(sd: Mapping[str, Any], anchor: str, what: str, prefer: str | None = None) -> str:
    """The prefix before `anchor` (a key every checkpoint of the family has), e.g. 'encoder.' or
    's2_encoder.'; '' when the keys are bare. With several anchors, `prefer` picks one (CROMA's
    file has an s1_ and an s2_encoder); otherwise none or several are refused."""
    hits = sorted(k[: -len(anchor)] for k in sd if k == anchor or k.endswith("." + anchor))
    if len(hits) > 1 and prefer in hits:
        return prefer
    if len(hits) != 1:
        found = f"{len(hits)} keys ending in {anchor!r}: {hits[:4]}" if hits else f"no key {anchor!r}"
        raise CheckpointMismatchError(f"{what}: not this model's layout ({found})")
    return hits[0]


# --------------------------------------------------------------------------------------------------
# The key table
# --------------------------------------------------------------------------------------------------
# One torch key: its torch shape, the eojax params it fills (three for a fused qkv), and the maps
# torch array -> tuple of eojax arrays (to_jax) and eojax arrays -> torch array (to_torch).
Entry = collections.namedtuple("Entry", "key shape paths to_jax to_torch")


def same(key, shape, path, fwd=lambda a: a, inv=lambda a: a) -> Entry:
    return Entry(key, tuple(shape), (path,), lambda a: (fwd(a),), inv)


def ln(tk, jp, n) -> list[Entry]:
    """torch LayerNorm -> eojax layers.LayerNorm (params under 'ln')."""
    return [same(f"{tk}.weight", (n,), jp + ("ln", "scale")), same(f"{tk}.bias", (n,), jp + ("ln", "bias"))]


def linear(tk, jp, n_in, n_out, bias=True) -> list[Entry]:
    """torch Linear (out, in) -> flax Dense (in, out)."""
    out = [same(f"{tk}.weight", (n_out, n_in), jp + ("kernel",), lambda w: w.T, lambda k: k.T)]
    return out + ([same(f"{tk}.bias", (n_out,), jp + ("bias",))] if bias else [])


def conv(tk, jp, cin, cout, k, transposed=False) -> list[Entry]:
    # Conv2d (out, in, kh, kw) -> (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw) -> (kh, kw,
    # out, in), the torch-scatter kernel of ConvTranspose4x2. The same axis permutation in both.
    shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    return [same(f"{tk}.weight", shape, jp + ("kernel",), lambda w: w.transpose(2, 3, 1, 0),
                 lambda a: a.transpose(3, 2, 0, 1)),
            same(f"{tk}.bias", (cout,), jp + ("bias",))]


def patch(tk, jp, d, c, p, bias=True) -> list[Entry]:
    """Conv2d (D, C, p, p) with stride p -> Dense (p*p*C, D) in patchify's (row, col, band) order."""
    out = [same(f"{tk}.weight", (d, c, p, p), jp + ("kernel",),
                lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
                lambda a: a.reshape(p, p, c, d).transpose(3, 2, 0, 1))]
    return out + ([same(f"{tk}.bias", (d,), jp + ("bias",))] if bias else [])


def qkv(wkey, bkey, jp, d, heads) -> list[Entry]:
    """A fused (3D, D) q/k/v projection (timm qkv, torch MultiheadAttention in_proj, CROMA to_qkv)
    -> eojax query/key/value kernels (D, H, D/H); outputs are (3, heads, head_dim) row-major.
    bkey None: no biases."""
    hd = d // heads
    names = ("query", "key", "value")
    out = [Entry(wkey, (3 * d, d), tuple(jp + (n, "kernel") for n in names),
                 lambda w: tuple(part.T.reshape(d, heads, hd) for part in w.reshape(3, d, d)),
                 lambda *ks: np.concatenate([k.reshape(d, d).T for k in ks]))]
    if bkey is not None:
        out.append(Entry(bkey, (3 * d,), tuple(jp + (n, "bias") for n in names),
                         lambda b: tuple(b.reshape(3, heads, hd)),
                         lambda *bs: np.concatenate([b.reshape(-1) for b in bs])))
    return out


def attn_out(tk, jp, d, heads) -> list[Entry]:
    """Attention output Linear (D, D) -> eojax out kernel (H, D/H, D)."""
    hd = d // heads
    return [same(f"{tk}.weight", (d, d), jp + ("kernel",),
                 lambda w: w.T.reshape(heads, hd, d), lambda k: k.reshape(d, d).T),
            same(f"{tk}.bias", (d,), jp + ("bias",))]


def timm_block(tk, jp, d, heads, mlp) -> list[Entry]:
    """timm Block (qkv_bias=True) -> eojax layers.EncoderBlock."""
    att = jp + ("attn",)
    return [*ln(f"{tk}.norm1", jp + ("norm1",), d),
            *qkv(f"{tk}.attn.qkv.weight", f"{tk}.attn.qkv.bias", att, d, heads),
            *attn_out(f"{tk}.attn.proj", att + ("out",), d, heads),
            *ln(f"{tk}.norm2", jp + ("norm2",), d),
            *linear(f"{tk}.mlp.fc1", jp + ("mlp", "fc1"), d, mlp),
            *linear(f"{tk}.mlp.fc2", jp + ("mlp", "fc2"), mlp, d)]


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------
def raise_problems(problems: list[str], what: str):
    raise_mismatch(problems, f"{what} does not fit the model")


def check_entries(sd: Mapping[str, np.ndarray], entries: Iterable[Entry], skip=()) -> list[str]:
    """Missing keys and shape mismatches (key, checkpoint shape, model shape), in table order."""
    problems = []
    for e in entries:
        if e.key not in sd:
            problems.append(f"missing in checkpoint: {e.key} {e.shape}")
        elif sd[e.key].shape != e.shape and e.key not in skip:
            problems.append(f"shape of {e.key}: checkpoint {sd[e.key].shape} vs model {e.shape}")
    return problems


def convert(sd: Mapping[str, np.ndarray], entries: Iterable[Entry], dtype, *, consume: bool = False
            ) -> dict[tuple, np.ndarray]:
    """Flat {eojax path: array} from a checked state dict. `consume`: each entry is popped from `sd` once
    converted, so a multi-GB state dict and its conversion are never both held whole (SD-1.5's UNet)."""
    flat, dtype = {}, np.dtype(dtype)
    for e in entries:
        arrays = e.to_jax(np.asarray(sd.pop(e.key) if consume else sd[e.key]))
        flat.update((p, np.ascontiguousarray(a, dtype=dtype)) for p, a in zip(e.paths, arrays))
    return flat


def to_device(tree: dict, dtype=None) -> dict:
    """A nested dict of numpy arrays -> the same of jax arrays (of `dtype` if given), emptying `tree` leaf by
    leaf as it goes: the host copy of each weight is dropped as soon as the device copy exists, so loading
    never holds both copies of the whole model."""
    out = {}
    for k in list(tree):
        v = tree.pop(k)
        out[k] = to_device(v, dtype) if isinstance(v, dict) else jnp.asarray(v, dtype)
    return out


def flat_params(params: Mapping) -> dict[tuple, np.ndarray]:
    """Unboxed, unwrapped ({'params': ...} or not) params as a flat {path tuple: numpy array}."""
    params = nn.meta.unbox(params)
    params = params["params"] if set(params) == {"params"} else params
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, params))


def export(flat: Mapping[tuple, np.ndarray], entries: list[Entry], what: str = "eojax params"
           ) -> dict[str, np.ndarray]:
    """Flat eojax params -> {torch key: array}; every parameter must be in the table and vice versa."""
    want = {}
    for e in entries:  # expected eojax shapes, from the torch ones (broadcast views: no memory)
        want.update(zip(e.paths, (a.shape for a in e.to_jax(np.broadcast_to(np.float32(0), e.shape)))))
    raise_problems(key_problems({k: v.shape for k, v in flat.items()}, want, "params", "/".join), what)
    return {e.key: np.ascontiguousarray(e.to_torch(*[flat[p] for p in e.paths])) for e in entries}


def stack_blocks(flat: dict, prefix: tuple, depth: int) -> dict:
    """block_i params -> scan's stacked 'layers' (leading depth axis) under `prefix`."""
    n, out = len(prefix), dict(flat)
    rests = {k[n + 1:] for k in flat if k[:n] == prefix and len(k) > n and k[n].startswith("block_")}
    for r in rests:
        out[prefix + ("layers",) + r] = np.stack([out.pop(prefix + (f"block_{i}",) + r)
                                                  for i in range(depth)])
    return out


def unstack_blocks(flat: dict, prefix: tuple, depth: int) -> dict:
    """Inverse of stack_blocks (a leaf of another depth stays, to be reported as not in the model)."""
    n, out = len(prefix), dict(flat)
    for k in [k for k in flat if k[:n + 1] == prefix + ("layers",) and flat[k].shape[:1] == (depth,)]:
        a = out.pop(k)
        out.update({prefix + (f"block_{i}",) + k[n + 1:]: a[i] for i in range(depth)})
    return out


def place(flat: Mapping[tuple, np.ndarray], abstract_params: Any) -> Any:
    """A tree shaped like abstract_params (ShapeDtypeStructs, with shardings if any) filled from
    flat; each device takes its own slice, so every process may hold the whole arrays."""
    def put(path, spec):
        a = np.asarray(flat[tuple(k.key for k in path)], dtype=spec.dtype)
        sharding = getattr(spec, "sharding", None)
        if sharding is None:
            return jnp.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
    return jax.tree_util.tree_map_with_path(put, abstract_params)


def band_sources(encoder: nn.Module, source: list) -> dict[str, str | None]:
    """{encoder band: the data band (input_bands name) filling it, or None (zero-filled)}."""
    provided = list(encoder.input_bands) if encoder.input_bands is not None else list(encoder.bands)
    return {slot: None if j is None else str(provided[j]) for slot, j in zip(encoder.bands, source)}


def log_report(what: str, report: Mapping[str, Any]) -> None:
    """One warning line per kind of deviation (ignored keys grouped by reason)."""
    by_reason: dict[str, list[str]] = {}
    for key, why in report.get("ignored", {}).items():
        by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
        logging.warning("%s: ignored %d keys (%s): %s%s", what, len(keys), why, ", ".join(keys[:6]),
                        ", ..." if len(keys) > 6 else "")
    if report.get("zero_filled_bands"):
        logging.warning("%s: the data lacks bands %s; the encoder zero-fills them", what,
                        report["zero_filled_bands"])
    moved = {k: v for k, v in report.get("band_sources", {}).items() if v is not None and v != k}
    if moved:  # matched by common name and wavelength, not by name
        logging.info("%s: the encoder's bands are filled from the data's %s", what,
                     ", ".join(f"{k} <- {v}" for k, v in moved.items()))
    if report.get("unused_bands"):
        logging.warning("%s: the encoder has no slot for the data's bands %s; they are dropped", what,
                        report["unused_bands"])
    for key, (src, dst) in report.get("resized", {}).items():
        logging.warning("%s: %s resampled from grid %s to %s", what, key, src, dst)


def load_encoder(path, abstract_params: Any, encoder: nn.Module, *, strict: bool = True):
    """(params, report) for any published-checkpoint encoder of eojax.models.encoders, placed like
    abstract_params (the encoder's own subtree), through the converter the encoder class names in
    `converter` ('module:function', called as function(path, abstract_params, encoder, strict=))."""
    import importlib
    converter = getattr(type(encoder), "converter", None)
    if converter is None:
        raise ValueError(f"no published-checkpoint import for {type(encoder).__name__}; eojax MAE "
                         "runs load through config.init_from")
    module, function = converter.split(":")
    return getattr(importlib.import_module(module), function)(path, abstract_params, encoder, strict=strict)


def load_encoder_file(path, abstract_params: Any, encoder, what: str, from_torch, *, strict: bool = True):
    """(params placed like abstract_params, report) from a published .safetensors / .npz / .pth:
    read, convert with `from_torch(state_dict, encoder, strict=)`, check shapes, log, place."""
    sd = load_state_dict(path, what)
    params, report = from_torch(sd, encoder, strict=strict)
    wrapped = set(abstract_params) == {"params"}
    abstract = abstract_params["params"] if wrapped else abstract_params
    check_compatible(params, abstract, f"{what} {path}")
    log_report(f"{what} {path}", report)
    placed = place(traverse_util.flatten_dict(params), abstract)
    return ({"params": placed} if wrapped else placed), report


def load_npz_tree(path: str, abstract):
    """An .npz of '/'-joined parameter paths -> a tree like `abstract`; every key and shape must match."""
    from eojax import optim  # the optimizer's path names; imported late (it imports much)

    if not str(path).endswith(".npz"):
        raise ValueError(f"{path}: expected an .npz of eojax encoder params (seg.task.export_encoder writes one)")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    paths = optim.param_paths(abstract)
    want = dict(zip(jax.tree.leaves(paths), jax.tree.leaves(abstract)))
    problems = key_problems({k: a.shape for k, a in arrays.items()}, {k: s.shape for k, s in want.items()}, "file")
    raise_mismatch(problems, f"{path} does not fit the encoder")
    return jax.tree.map(lambda p, s: jax.device_put(arrays[p].astype(s.dtype), getattr(s, "sharding", None)),
                        paths, abstract)


def load_encoder_weights(source: str, abstract, encoder: nn.Module) -> tuple[Any, dict]:
    """(encoder params placed like `abstract` (the model's `encoder` subtree), the encoder's model
    state from the source: {collection: tree}, e.g. a ResNet's {'batch_stats': ...}, else {}) from
    any of: an eojax run folder (its `encoder` subtree, e.g. a MAE / SatMAE++ pretraining run), an
    .npz of encoder params, or a published checkpoint through the encoder's converter (load_encoder;
    a torchvision ResNet's running statistics come in its report)."""
    from eojax import checkpoint as ckpt_lib

    if ckpt_lib.is_eojax_checkpoint(source):
        params, model_state = ckpt_lib.load_variables(source, None)
        if "encoder" not in params:
            raise CheckpointMismatchError(f"{source}: the run's params have no 'encoder' subtree "
                                          f"(they have {sorted(params)})")
        tree = params["encoder"]
        check_compatible(tree, abstract, f"the encoder of {source}")
        placed = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a).astype(s.dtype), getattr(s, "sharding", None)),
                              tree, abstract)
        return placed, {col: t["encoder"] for col, t in (model_state or {}).items()
                        if isinstance(t, Mapping) and "encoder" in t}
    if not os.path.exists(source):
        raise FileNotFoundError(f"encoder weights {source} do not exist")
    if str(source).endswith(".npz"):
        return load_npz_tree(source, abstract), {}
    params, report = load_encoder(source, abstract, encoder)
    stats = report.get("batch_stats")
    return params, ({} if stats is None else {"batch_stats": stats})


def place_encoder_state(source: str, encoder_state: Mapping, init_model_state: Mapping) -> dict:
    """The model state with `encoder_state` ({collection: tree}, from load_encoder_weights) in place
    of the initial '<collection>/encoder' trees, every key and shape checked; the rest unchanged (the
    very same object when there is nothing to place)."""
    if not encoder_state:
        return init_model_state
    state = dict(init_model_state)
    for col, tree in encoder_state.items():
        have = init_model_state.get(col, {}).get("encoder")
        if have is None:
            raise CheckpointMismatchError(f"{source} has encoder {col!r} but the model keeps none")
        check_compatible(tree, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), have),
                         f"the encoder {col} of {source}")
        placed = jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, s.dtype), getattr(s, "sharding", None)),
                              tree, have)
        state[col] = {**init_model_state[col], "encoder": placed}
    return state
