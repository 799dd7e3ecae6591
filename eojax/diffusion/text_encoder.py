"""Caption conditioning: a word tokenizer built from the captions and a small transformer encoder,
or GPT-2's BPE tokenizer for the frozen GPT-2 encoder (eojax.diffusion.model.DiffusionModel).

The encoder is trained with the diffusion model (token + learned position embeddings, pre-LN
transformer blocks from eojax.models.layers, a final LayerNorm). Token 0 is padding and the empty
caption is all padding: that is the 'unconditional' input of classifier-free guidance, so the model
learns it from caption dropout like any other caption.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models import layers

Dtype = Any
PAD, UNK = 0, 1
_WORD = re.compile(r"[a-z0-9]+")


def words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


class WordTokenizer:
    """Lower-case alphanumeric words; ids by descending frequency (ties alphabetical) after PAD, UNK."""

    pad_id = PAD

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_captions(cls, captions: Iterable[str], max_size: int = 0) -> "WordTokenizer":
        counts: dict[str, int] = {}
        for c in captions:
            for w in words(c):
                counts[w] = counts.get(w, 0) + 1
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size:
            ranked = ranked[:max_size - 2]
        return cls(["<pad>", "<unk>", *ranked])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, caption: str, max_len: int) -> np.ndarray:
        """(max_len,) int32 ids, truncated / padded with PAD."""
        ids = [self.ids.get(w, UNK) for w in words(caption)][:max_len]
        return np.asarray(ids + [PAD] * (max_len - len(ids)), np.int32)

    def encode_batch(self, captions: Sequence[str], max_len: int) -> np.ndarray:
        return np.stack([self.encode(c, max_len) for c in captions]) if captions else \
            np.zeros((0, max_len), np.int32)

    def to_json(self) -> str:
        return json.dumps(self.vocab)

    def unknown_words(self, caption: str) -> list[str]:
        return [w for w in words(caption) if w not in self.ids]


class BPECaptionTokenizer:
    """GPT-2's byte-level BPE (a transformers tokenizer from local files) with fixed-length padding.

    GPT-2 has no padding token, so padding is GPT2_PAD = -1: the encoder masks it out of attention and
    zeroes its features, and the empty caption (all padding) is classifier-free guidance's input."""

    pad_id = -1

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, caption: str, max_len: int) -> np.ndarray:
        ids = list(self.tokenizer.encode(caption, add_special_tokens=False))[:max_len]
        return np.asarray(ids + [self.pad_id] * (max_len - len(ids)), np.int32)

    def encode_batch(self, captions: Sequence[str], max_len: int) -> np.ndarray:
        return np.stack([self.encode(c, max_len) for c in captions]) if captions else \
            np.zeros((0, max_len), np.int32)

    def unknown_words(self, caption: str) -> list[str]:
        return []  # byte-level BPE spells every word


class TextEncoder(nn.Module):
    """tokens (B, L) int -> (B, L, width) contextual embeddings."""

    vocab_size: int
    max_len: int = 16
    width: int = 64
    depth: int = 2
    heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        if tokens.shape[-1] > self.max_len:
            raise ValueError(f"{tokens.shape[-1]} tokens exceed the text encoder's max_len {self.max_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(self.vocab_size, self.width, name="token_embed", param_dtype=self.param_dtype,
                     embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")))(tokens)
        pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(0.01), ("length", "embed")),
                         (self.max_len, self.width), self.param_dtype)
        x = (x + pos[None, :tokens.shape[-1]]).astype(self.dtype)
        x = layers.Encoder(depth=self.depth, heads=self.heads, mlp_dim=4 * self.width, name="encoder", **kw)(x)
        return layers.LayerNorm(name="norm", **kw)(x)
