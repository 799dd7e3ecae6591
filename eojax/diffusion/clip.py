"""CLIP's text encoder (transformers' CLIPTextModel, Stable Diffusion's text_encoder/) in flax, its
weights from and to transformers' state-dict layout, and the CLIP BPE tokenizer of a tokenizer/ folder.

The network: token + learned position embeddings, `num_hidden_layers` pre-LN blocks (x + attn(ln1(x))
with a causal mask; x + fc2(act(fc1(ln2(x))))), a final LayerNorm. SD-1.5 uses OpenAI's CLIP ViT-L/14
text tower (quick-GELU); SD-2's OpenCLIP tower has the same layout with exact GELU.

transformers key (D width, H heads, M mlp; prefix 'text_model.' in transformers 4 files, none in 5's)
                                                  eojax path
  embeddings.token_embedding.weight (V, D)        token_embedding/embedding
  embeddings.position_embedding.weight (P, D)     position_embedding/embedding
  encoder.layers.i.layer_norm1|2.weight / .bias   layers_i/layer_norm1|2/ln/scale / bias
  encoder.layers.i.self_attn.q|k|v_proj (D, D)    layers_i/self_attn/query|key|value/kernel (D, H, D/H)
  encoder.layers.i.self_attn.out_proj (D, D)      layers_i/self_attn/out/kernel (H, D/H, D)
  encoder.layers.i.mlp.fc1 (M, D), fc2 (D, M)     layers_i/mlp/fc1|fc2/kernel, transposed
  final_layer_norm.weight / .bias                 final_layer_norm/ln/scale / bias
The `embeddings.position_ids` buffer older files carry is ignored (and logged).

Padding: Stable Diffusion's pipeline passes no attention mask (padding tokens are attended to and their
outputs are part of the conditioning), so `attention_mask=None` is the parity setting; a mask (B, L),
1 = real token, also hides padding keys, as transformers does when given one.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from eojax.models import layers
from eojax.models.layers import partitioned
from eojax.weights import common

Dtype = Any

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD-1.x)
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # OpenCLIP (SD-2.x)
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# CLIPTextConfig's defaults, for the keys a config.json may leave out.
_CONFIG_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5)
SIZES = tuple(_CONFIG_DEFAULTS)
CONFIG, WEIGHTS = "config.json", "model.safetensors"
EXPORT_PREFIX = "text_model."  # transformers 4's spelling; transformers 5 strips it when loading
_ANCHOR = "embeddings.token_embedding.weight"
_BUFFER = "embeddings.position_ids"


class _Mlp(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.intermediate_size, name="fc1",
                  kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                  bias_init=partitioned(nn.initializers.zeros, ("mlp",)))(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = ACTIVATIONS[self.hidden_act](h)
        return dense(d, name="fc2", kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                     bias_init=partitioned(nn.initializers.zeros, ("embed",)))(h)


class _Layer(nn.Module):
    """x + self_attn(layer_norm1(x), masked by `bias`); x + mlp(layer_norm2(x))."""

    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.LayerNorm(epsilon=self.layer_norm_eps, name="layer_norm1", **kw)(x)
        # layers.Attention: q/k/v/out with biases, scale head_dim**-0.5, float32 logits and softmax.
        h = layers.Attention(self.num_attention_heads, implementation=self.attention_impl, name="self_attn", **kw)(
            h, bias)
        x = nn.with_logical_constraint(x + h, layers.BLE)
        h = layers.LayerNorm(epsilon=self.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = _Mlp(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x + h, layers.BLE)


class CLIPTextEncoder(nn.Module):
    """transformers' CLIPTextModel: ids (B, L) -> last_hidden_state (B, L, hidden_size), float32.

    `clip_skip` (a call argument, as diffusers' pipelines take it): the final LayerNorm is applied to
    the output of layer num_hidden_layers - clip_skip and the layers after it are not run; 0 is
    last_hidden_state, 1 the penultimate layer that some SD fine-tunes are conditioned on.
    `hidden_states` gives every layer's raw output (transformers' output_hidden_states)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_impl: str | None = None  # layers.ATTENTION_IMPLEMENTATIONS ('cudnn': flash attention, bf16)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported (known: {sorted(ACTIVATIONS)})")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normal = nn.initializers.normal
        self.token_embedding = nn.Embed(self.vocab_size, self.hidden_size,
                                        embedding_init=partitioned(normal(0.02), ("vocab", "embed")), **kw)
        self.position_embedding = nn.Embed(self.max_position_embeddings, self.hidden_size,
                                           embedding_init=partitioned(normal(0.01), (None, "embed")), **kw)
        self.layers = [_Layer(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                              self.attention_impl, **kw) for _ in range(self.num_hidden_layers)]
        self.final_layer_norm = layers.LayerNorm(epsilon=self.layer_norm_eps, **kw)

    def __call__(self, ids, attention_mask=None, clip_skip: int = 0):
        if not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip {clip_skip} is not in [0, {self.num_hidden_layers})")
        x = self._run(ids, attention_mask, self.num_hidden_layers - clip_skip)[-1]
        return self.final_layer_norm(x).astype(jnp.float32)

    def hidden_states(self, ids, attention_mask=None) -> tuple:
        """(embeddings, output of layer 1, ..., output of the last layer), each (B, L, D) float32,
        before the final LayerNorm (transformers' hidden_states)."""
        return tuple(h.astype(jnp.float32) for h in self._run(ids, attention_mask, self.num_hidden_layers))

    def _run(self, ids, attention_mask, depth: int) -> list:
        b, length = ids.shape
        if length > self.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed CLIP's max_position_embeddings {self.max_position_embeddings}")
        x = self.token_embedding(ids) + self.position_embedding(jnp.arange(length))[None]
        x = nn.with_logical_constraint(x.astype(self.dtype), layers.BLE)
        bias = _attention_bias(length, attention_mask, self.dtype)
        out = [x]
        for layer in self.layers[:depth]:
            out.append(layer(out[-1], bias))
        return out


def _attention_bias(length: int, attention_mask, dtype):
    """Additive logits bias (1 or B, 1, L, L): 0 where a query may see a key (earlier or same position,
    and a real token when a mask is given), else the compute dtype's most negative finite number, as
    transformers' eager attention; a query that sees nothing (left padding) then attends uniformly,
    never NaN."""
    visible = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(visible, 0.0, float(jnp.finfo(dtype).min)).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------
def clip_kwargs_from_config(config: Mapping) -> dict:
    """CLIPTextEncoder keyword arguments (the sizes, hidden_act, layer_norm_eps) from a transformers
    CLIPTextConfig dict (text_encoder/config.json; a CLIPConfig's text_config is taken from it)."""
    config = config.get("text_config", config) if isinstance(config.get("text_config"), Mapping) else config
    kwargs = {k: config.get(k, default) for k, default in _CONFIG_DEFAULTS.items()}
    if kwargs["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {kwargs['hidden_act']!r} is not supported (known: {sorted(ACTIVATIONS)})")
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise ValueError(f"CLIP hidden_size {kwargs['hidden_size']} is not divisible by num_attention_heads "
                         f"{kwargs['num_attention_heads']}")
    kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
    return kwargs


def _entries(kwargs: Mapping, prefix: str) -> list[common.Entry]:
    d, h, m = kwargs["hidden_size"], kwargs["num_attention_heads"], kwargs["intermediate_size"]
    hd = d // h
    out = [common.same(f"{prefix}embeddings.token_embedding.weight", (kwargs["vocab_size"], d),
                       ("token_embedding", "embedding")),
           common.same(f"{prefix}embeddings.position_embedding.weight", (kwargs["max_position_embeddings"], d),
                       ("position_embedding", "embedding"))]
    for i in range(kwargs["num_hidden_layers"]):
        tk, jp = f"{prefix}encoder.layers.{i}.", (f"layers_{i}",)
        att = jp + ("self_attn",)
        out += common.ln(tk + "layer_norm1", jp + ("layer_norm1",), d)
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            # torch Linear (out, in) -> (in, heads, head_dim); the out axis is (head, head_dim) row-major.
            out += [common.same(f"{tk}self_attn.{proj}.weight", (d, d), att + (name, "kernel"),
                                lambda w: w.T.reshape(d, h, hd), lambda k: k.reshape(d, d).T),
                    common.same(f"{tk}self_attn.{proj}.bias", (d,), att + (name, "bias"),
                                lambda b: b.reshape(h, hd), lambda b: b.reshape(d))]
        out += common.attn_out(tk + "self_attn.out_proj", att + ("out",), d, h)
        out += common.ln(tk + "layer_norm2", jp + ("layer_norm2",), d)
        out += common.linear(tk + "mlp.fc1", jp + ("mlp", "fc1"), d, m)
        out += common.linear(tk + "mlp.fc2", jp + ("mlp", "fc2"), m, d)
    return out + common.ln(f"{prefix}final_layer_norm", ("final_layer_norm",), d)


def params_from_transformers(state_dict: Mapping[str, Any], kwargs: Mapping, *, param_dtype=np.float32,
                             what: str = "CLIP text encoder checkpoint") -> dict:
    """transformers CLIPTextModel state dict ('text_model.'-prefixed or bare keys) -> CLIPTextEncoder
    params (numpy, `param_dtype`). Every missing, unexpected or misshapen key is named in one
    CheckpointMismatchError; a position_ids buffer is ignored with a log line."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    prefix = common.find_prefix(sd, _ANCHOR, what, prefer=EXPORT_PREFIX)
    entries = _entries(kwargs, prefix)
    problems = common.check_entries(sd, entries)
    known, ignored = {e.key for e in entries}, {}
    for k in sorted(set(sd) - known):
        if k == prefix + _BUFFER:
            ignored[k] = "a buffer of positions 0..P-1, not a weight"
        else:
            problems.append(f"not in this model: {k} {sd[k].shape}")
    if problems:
        common.raise_problems(problems, what)
    common.log_report(what, {"ignored": ignored})
    return traverse_util.unflatten_dict(common.convert(sd, entries, param_dtype))


def params_to_transformers(params: Mapping, kwargs: Mapping, prefix: str = EXPORT_PREFIX) -> dict[str, np.ndarray]:
    """CLIPTextEncoder params (boxed or not, under 'params' or not) -> transformers' state dict, keys
    with `prefix` ('text_model.' is read by transformers 4 and 5; '' is what transformers 5 writes)."""
    return common.export(common.flat_params(params), _entries(kwargs, prefix), "CLIP text encoder params")


def load_pretrained(folder, **overrides) -> tuple[CLIPTextEncoder, dict]:
    """(CLIPTextEncoder, its params) from a transformers folder (SD's text_encoder/: config.json +
    model.safetensors, or another file common.load_state_dict reads). Overrides: dtype, param_dtype,
    attention_impl (the sizes come from config.json)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{path}: no readable CLIP text encoder config ({type(e).__name__}: {e})") from e
    kwargs = clip_kwargs_from_config(config)
    if set(SIZES) & set(overrides):
        raise ValueError(f"cannot override the checkpoint's {sorted(set(SIZES) & set(overrides))}")
    weights = next((os.path.join(folder, n) for n in (WEIGHTS, "pytorch_model.bin")
                    if os.path.isfile(os.path.join(folder, n))), os.path.join(folder, WEIGHTS))
    sd = common.load_state_dict(weights, "CLIP text encoder weights")
    model = CLIPTextEncoder(**kwargs, **overrides)
    return model, params_from_transformers(sd, kwargs, param_dtype=model.param_dtype, what=weights)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
CLIP_CONTEXT = 77  # CLIP's text context; the padded length when a tokenizer names none


def load_tokenizer(folder):
    """transformers' CLIP tokenizer from a local folder (SD's tokenizer/: tokenizer.json, or vocab.json
    + merges.txt), never the network. transformers is imported here: the model never needs it."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CLIP tokenizer folder {folder} does not exist")
    has = lambda *names: all(os.path.isfile(os.path.join(folder, n)) for n in names)  # noqa: E731
    if not (has("tokenizer.json") or has("vocab.json", "merges.txt")):
        raise FileNotFoundError(f"CLIP tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt")
    import transformers
    # transformers 5: CLIPTokenizer is the fast (tokenizers) one and CLIPTokenizerFast its alias;
    # transformers 4: the fast class reads tokenizer.json or converts vocab.json + merges.txt.
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # json, tokenizers and transformers errors alike; name the folder
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"CLIP tokenizer folder {folder} is not readable: {type(e).__name__}: {detail}") from e


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int | None = None,
             return_attention_mask: bool = False):
    """Token ids (B, max_length) int32 as StableDiffusionPipeline makes them: <|startoftext|> text
    <|endoftext|>, truncated to and padded up to max_length (default the tokenizer's model_max_length,
    77). With return_attention_mask: (ids, mask (B, max_length) int32, 1 = real token)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if max_length is None:
        max_length = tokenizer.model_max_length
        if not 0 < max_length <= 100_000:  # transformers' "unset" is ~1e30
            max_length = CLIP_CONTEXT
    enc = tokenizer(texts, padding="max_length", max_length=int(max_length), truncation=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    if return_attention_mask:
        return ids, np.asarray(enc["attention_mask"], np.int32)
    return ids
