"""GPT-2 (Radford et al. 2019) in flax.linen, with an explicit KV cache for generation.

Pre-LN blocks, learned position embeddings, input and output embeddings tied, tanh-GELU, causal
attention, dropout on embeddings / attention probabilities / residual branches: the layout of Hugging
Face's GPT2LMHeadModel, so its checkpoints import exactly (eojax.weights.gpt2). Parameter names follow
that layout (wte, wpe, h_{i}/ln_1, attn/c_attn, attn/c_proj, ln_2, mlp/c_fc, mlp/c_proj, ln_f); the
fused query/key/value projection keeps its (embed, 3, heads, kv) kernel, as the checkpoint stores it.

Entry points on the same parameters:
  GPT2(...)(tokens, train, positions, attention_mask) -> logits   training / scoring, any padding
  GPT2(...).apply(params, tokens, cache, method=GPT2.decode)      prefill and decode steps with a cache
  GPT2(...).apply(params, tokens, method=GPT2.hidden_states)      final hidden states (a text encoder)

The cache is an explicit pytree (see `init_cache`): per layer a key and a value buffer (B, heads,
max_length slots, head_dim), the (B, S) validity of each slot and the next slot to write. Every row writes the same slot at
each step (prompts are left-padded), so the write is one dynamic_update_slice that XLA does in place
inside a lax loop, and the pytree crosses jit / while_loop boundaries like any other array tree.

Positions count the real tokens before a token, never the padding, so a padded row gives the same
logits as the unpadded one; positions of padding tokens are clipped to 0 and never matter.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers
from eojax.models.layers import BLE, HeadDense, partitioned

Dtype = Any

# Sizes of the published models; 'mu' is the test size. mlp width (n_inner) is 4 * n_embd unless given.
VARIANTS = {
    "mu": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
}


def gpt2_config(variant: str, **overrides) -> dict:
    """Keyword arguments for GPT2: the variant's sizes + overrides (n_layer, n_head, n_embd, ...)."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown GPT-2 variant {variant!r}; known: {sorted(VARIANTS)}")
    unknown = set(overrides) - set(GPT2.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise KeyError(f"unknown GPT-2 settings {sorted(unknown)}")
    return {**VARIANTS[variant], **overrides}


class LayerNorm(nn.Module):
    """`layers.layer_norm` (float32 statistics, its lean backward) with GPT-2's eps and Hugging Face's
    parameter layout: scale / bias directly under ln_1, ln_2, ln_f (layers.LayerNorm nests them)."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
        y = layers.layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                              self.epsilon)
        return y.astype(self.dtype)


class CausalSelfAttention(nn.Module):
    """Attention of T new tokens over S keys: the T tokens themselves (no cache, S = T) or a cache's
    slots with the new keys written at `index`. `mask` (B, T, S) says which keys each token sees."""

    n_head: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, train: bool, kv=None, index=None, packed=None):
        """packed: None, or the (B, T) grid's flat index of each of x's N tokens (x is then (1, N, d),
        padding left out; see GPT2.decode's packed_length): q, k and v go to the grid for attention and
        the attention output comes back to the N tokens."""
        d = x.shape[-1]
        if d % self.n_head:
            raise ValueError(f"n_embd {d} is not divisible by n_head {self.n_head}")
        head_dim = d // self.n_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = HeadDense((3, self.n_head, head_dim), 1, ("embed", None, "heads", "kv"), (None, "heads", "kv"),
                        name="c_attn", **kw)(x)
        if packed is not None:
            grid = mask.shape[:2]
            qkv = jnp.zeros((grid[0] * grid[1], *qkv.shape[2:]), qkv.dtype).at[packed].set(qkv[0], mode="drop")
            qkv = qkv.reshape(*grid, *qkv.shape[1:])
        # (B, H, T, Dh): heads before length, the layout of the cache, so that a decode step reads
        # the cached keys and values as they lie instead of transposing them every step.
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, 0, index, 0))
            kv = {"k": k, "v": v}
        q = nn.with_logical_constraint(q, ("batch", "heads", "length", "kv"))
        # Batched matmuls rather than einsum: XLA:CPU ran the einsum form of a decode step's
        # (1 x Dh) @ (Dh x S) about 4x slower.
        scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        # A finite minimum, not -inf: a left-padding query sees no key at all and must not give NaN.
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = layers.softmax(scores)
        probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
        o = jnp.matmul(probs.astype(self.dtype), v.astype(self.dtype)).transpose(0, 2, 1, 3)  # (B, T, H, Dh)
        if packed is not None:
            o = o.reshape(-1, *o.shape[2:]).at[packed].get(mode="fill", fill_value=0)[None]
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "kv"))
        out = HeadDense((d,), 2, ("heads", "kv", "embed"), ("embed",), name="c_proj", **kw)(o)
        return out, kv


class Block(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)), with GPT-2's tanh-approximated GELU."""

    n_head: int
    n_inner: int
    n_layer: int  # only for the residual-projection init scale 0.02 / sqrt(2 n_layer)
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, train: bool, kv=None, index=None, packed=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout)
        h = LayerNorm(self.layer_norm_epsilon, name="ln_1", **kw)(x)
        h, kv = CausalSelfAttention(self.n_head, self.dropout, name="attn", **kw)(h, mask, train, kv, index, packed)
        x = nn.with_logical_constraint(x + drop(h, deterministic=not train), BLE)
        h = LayerNorm(self.layer_norm_epsilon, name="ln_2", **kw)(x)
        h = _Mlp(self.n_inner, self.n_layer, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x + drop(h, deterministic=not train), BLE)
        return x, kv


class _Mlp(nn.Module):
    n_inner: int
    n_layer: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        normal = nn.initializers.normal
        h = layers.Dense(self.n_inner, dtype=self.dtype, param_dtype=self.param_dtype, name="c_fc",
                         kernel_init=partitioned(normal(0.02), ("embed", "mlp")),
                         bias_init=partitioned(nn.initializers.zeros, ("mlp",)))(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.gelu(h, approximate=True)  # GPT-2's "gelu_new"
        return layers.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="c_proj",
                            kernel_init=partitioned(normal(0.02 / math.sqrt(2 * self.n_layer)),
                                                    ("mlp", "embed")),
                            bias_init=partitioned(nn.initializers.zeros, ("embed",)))(h)


class GPT2(nn.Module):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    dropout: float = 0.1  # embeddings, attention probabilities and residual branches (GPT-2's 3 x 0.1)
    layer_norm_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normal = nn.initializers.normal
        self.wte = nn.Embed(self.vocab_size, self.n_embd, embedding_init=partitioned(normal(0.02), ("vocab", "embed")),
                            **kw)
        self.wpe = nn.Embed(self.n_positions, self.n_embd, embedding_init=partitioned(normal(0.01), (None, "embed")),
                            **kw)
        self.h = [Block(self.n_head, self.n_inner or 4 * self.n_embd, self.n_layer, self.dropout,
                        self.layer_norm_epsilon, **kw) for _ in range(self.n_layer)]
        self.ln_f = LayerNorm(self.layer_norm_epsilon, **kw)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, tokens, train: bool = False, positions=None, attention_mask=None):
        """tokens (B, L) int -> logits (B, L, vocab) float32. attention_mask (B, L), 1 = real token,
        pads on either side; positions default to the count of real tokens before each token."""
        b, length = tokens.shape
        valid = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = _positions(valid)
        causal = jnp.tril(jnp.ones((length, length), bool))
        x, _ = self._trunk(tokens, positions, causal[None] & valid[:, None, :], train)
        return self.logits(x)

    def hidden_states(self, tokens, attention_mask=None):
        """tokens (B, L) -> the final layer-normed hidden states (B, L, n_embd), before the LM head,
        inference only (no dropout): per-token features, e.g. a frozen text encoder's output."""
        b, length = tokens.shape
        valid = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
        causal = jnp.tril(jnp.ones((length, length), bool))
        x, _ = self._trunk(tokens, _positions(valid), causal[None] & valid[:, None, :], False)
        return x

    def decode(self, tokens, cache, token_mask=None, positions=None, vocab_subset=None, last_only=False,
               packed_length: int | None = None):
        """T new tokens (B, T) through the cache: a prompt (prefill) or one generated token per row.

        token_mask (B, T): False for padding (left padding of prompts, rows that already stopped).
        vocab_subset (K,) int: logits for these tokens only (B, T, K) — a constrained decoder that can
        only ever emit K tokens need not pay for the whole vocabulary's output matmul.
        last_only: logits of the last token only (B, 1, ...): all a left-padded prefill needs.
        packed_length (static int >= the real tokens, with last_only): the layers outside attention
        (the projections and the MLP, nearly all the FLOPs) run on the real tokens only, packed into
        this many slots, instead of on the whole padded (B, T) grid; attention still sees the grid.
        Prompts of uneven length then cost what their tokens cost, not B x the longest.
        Returns (logits float32, the updated cache). Inference only (no dropout).
        """
        b, t = tokens.shape
        slots, index = cache["mask"].shape[1], cache["index"]
        token_mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
        if positions is None:
            seen = cache["mask"].sum(axis=1, dtype=jnp.int32)[:, None]
            positions = _positions(token_mask, offset=seen)
        slot_valid = jax.lax.dynamic_update_slice(cache["mask"], token_mask, (0, index))
        causal = jnp.arange(slots)[None, :] <= index + jnp.arange(t)[:, None]  # (T, S)
        mask = causal[None] & slot_valid[:, None, :]
        if packed_length is None:
            x, layers_kv = self._trunk(tokens, positions, mask, False, cache["layers"], index)
            if last_only:
                x = x[:, -1:]
        else:
            if not last_only:
                raise ValueError("packed_length needs last_only (packed tokens are not laid out per row)")
            # Real tokens in row-major order; with left padding a row's last token ends its run.
            packed = jnp.nonzero(token_mask.reshape(-1), size=packed_length, fill_value=b * t)[0]
            take = lambda a: a.reshape(-1).at[packed].get(mode="fill", fill_value=0)[None]
            x, layers_kv = self._trunk(take(tokens), take(positions), mask, False, cache["layers"], index, packed)
            last = jnp.cumsum(token_mask.sum(axis=1, dtype=jnp.int32)) - 1
            x = x[0, last][:, None]
        new_cache = {"layers": layers_kv, "mask": slot_valid, "index": index + t}
        return self.logits(x, vocab_subset), new_cache

    def init_cache(self, batch: int, max_length: int, dtype: Dtype | None = None) -> dict:
        """An empty cache of `max_length` slots (padded prompt + new tokens). Needs no parameters."""
        head_dim = self.n_embd // self.n_head
        shape = (batch, self.n_head, max_length, head_dim)
        dtype = dtype or self.dtype
        return {"layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.n_layer)],
                "mask": jnp.zeros((batch, max_length), bool), "index": jnp.zeros((), jnp.int32)}

    def logits(self, x, vocab_subset=None):
        """Final hidden states -> logits through the tied input embedding, in float32."""
        table = self.wte.embedding
        if vocab_subset is not None:
            table = jnp.take(table, vocab_subset, axis=0)
        x, table = nn.dtypes.promote_dtype(x, table, dtype=self.dtype)
        out = jnp.einsum("bld,vd->blv", x, table, preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

    def _trunk(self, tokens, positions, mask, train, layers_kv=None, index=None, packed=None):
        x = self.wte(tokens) + self.wpe(positions)
        x = nn.with_logical_constraint(self.drop(x.astype(self.dtype), deterministic=not train), BLE)
        new_kv = []
        for i, block in enumerate(self.h):
            x, kv = block(x, mask, train, None if layers_kv is None else layers_kv[i], index, packed)
            new_kv.append(kv)
        return self.ln_f(x), new_kv


def _positions(valid, offset=0):
    """Position of each token = real tokens before it (+ offset); padding gets 0."""
    return jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1 + offset, 0)


def num_params(cfg: dict, embeddings: bool = True) -> int:
    """Parameter count from the sizes (tied output matrix counted once, with the embeddings)."""
    d, m, n = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"], cfg["n_layer"]
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    emb = cfg.get("vocab_size", 50257) * d + cfg.get("n_positions", 1024) * d
    return n * block + 2 * d + (emb if embeddings else 0)


def flops_per_sequence(cfg: dict, length: int, training: bool = True) -> float:
    """Matmul FLOPs of one sequence of `length` tokens: the blocks (layers.transformer_flops, with the
    full L x L attention square as computed) plus the vocab projection; training = 3 x forward."""
    d, m = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]
    fwd = layers.transformer_flops(length, d, cfg["n_layer"], m) + 2.0 * length * d * cfg.get("vocab_size", 50257)
    return 3.0 * fwd if training else fwd
