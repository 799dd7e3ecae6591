"""The prompt writer of the satellite-image diffusion project: a causal LM (GPT-2) fine-tuned with LoRA on
a remote-sensing text corpus, scored by held-out perplexity, that writes one text-to-image prompt per
land-use class for the downstream protocol (configs/prompt_writer.py; docs/diffusion.md).

Data: `config.input.corpus`, a .txt (one caption or sentence per line), an RSICD / COCO captions .json or
a metadata.jsonl (eojax.diffusion.captions' layouts; the images need not exist). Each caption is one row
<|endoftext|> caption <|endoftext|>, tokenised with the BPE of the GPT-2 folder and right-padded to
`input.max_len`; the loss is next-token cross-entropy over the real tokens (the closing eos included, so
the LM learns where a prompt ends). The held-out split is chosen by a hash of each image's file name
(captions of one image stay together: RSICD has five near-identical ones per image) or of the line's
text for a .txt, so it does not depend on the file's order and a repeated line never straddles the split.

Model: the Hugging Face GPT-2 folder `config.model.init_from` (config.json, model.safetensors, tokenizer
files); its sizes come through the DataSpec, its weights are loaded over the fresh init as the 'gpt2'
params subtree (Task.pretrained_parts), and config.lora (r 16, alpha 32, dropout 0.05 on c_attn) trains
only the adapters. Eval: loss = mean token NLL over the held-out split, perplexity = exp(loss).

`eojax infer prompt_writer --prompt=CLASS ...` (`write_prompts`): per class, the LM continues
`generate.template` ('A satellite image of {class}') by sampling (generate.temperature, top_k) and the
results go to <output>/prompts.json as {class: prompt}.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import zlib

import grain
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from eojax import errors
from eojax.checkpoint import CheckpointMismatchError, key_problems
from eojax.data import pipeline
from eojax.diffusion import captions as captions_lib
from eojax.models import gpt2 as gpt2_lib
from eojax.tasks.base import DataSpec, Input, Task, elements
from eojax.weights import gpt2 as gpt2_weights

# The GPT-2 sizes the DataSpec carries from the folder's config.json (the core builds its model from them).
_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon")
_INPUT_KEYS = {"corpus", "max_len", "eval_fraction"}


# ------------------------------------------------------------------------------------------ corpus
def read_corpus(path: str) -> list[tuple[str, str]]:
    """(split key, text) per caption of a .txt (one per line; blank lines skipped), an RSICD / COCO .json
    or a metadata.jsonl. The key decides the held-out split: the image's file name (its captions stay
    together), or the text itself for a .txt."""
    if not path:
        raise errors.ConfigError("config.input.corpus is empty: give a .txt (one caption per line), an "
                                 "RSICD / COCO captions .json or a metadata.jsonl")
    if not os.path.isfile(path):
        raise errors.DataError(f"config.input.corpus={path} does not exist")
    if path.endswith((".json", ".jsonl")):
        try:
            records = captions_lib.read_captions(path, check_files=False)
        except json.JSONDecodeError as e:
            raise errors.DataError(f"{path} is not valid JSON: {e}") from None
        out = []
        for r in records:
            # RSICD repeats an image's captions to fill five: keep each distinct one once.
            for text in dict.fromkeys(" ".join(c.split()) for c in r.captions):
                if text:
                    out.append((os.path.basename(r.path), text))
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [" ".join(line.split()) for line in f]
        except UnicodeDecodeError as e:
            raise errors.DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        out = [(text, text) for text in lines if text]
    if not out:
        raise errors.DataError(f"{path} holds no caption")
    return out


def split_corpus(items: list[tuple[str, str]], eval_fraction: float, source: str = "corpus"):
    """(train texts, held-out texts): an item is held out when the md5 of its key falls below
    eval_fraction (stable when lines are added, removed or reordered)."""
    def held(key: str) -> bool:
        return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction
    train = [t for k, t in items if not held(k)]
    heldout = [t for k, t in items if held(k)]
    if not train or (eval_fraction > 0 and not heldout):
        raise errors.DataError(f"{source}: input.eval_fraction={eval_fraction} leaves {len(train)} training and "
                               f"{len(heldout)} held-out captions of {len(items)}")
    return train, heldout


def encode_texts(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens (N, max_len) int32, lengths (N,) int32, rows truncated): each text as eos + BPE + eos
    (GPT-2's <|endoftext|> opens and closes a document), right-padded with eos, cut at max_len."""
    eos = int(tokenizer.eos_token_id)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    tokens = np.full((len(ids), max_len), eos, np.int32)
    lengths = np.zeros(len(ids), np.int32)
    cut = 0
    for i, row in enumerate(ids):
        row = [eos, *row, eos]
        cut += len(row) > max_len
        row = row[:max_len]
        tokens[i, :len(row)], lengths[i] = row, len(row)
    return tokens, lengths, cut


class TokenRows(grain.MapDataset):
    """Element i: row i % N of pre-tokenised (tokens, lengths)."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray):
        super().__init__()
        self._tokens, self._lengths = tokens, lengths

    def __len__(self) -> int:
        return len(self._tokens)

    def __str__(self) -> str:
        return f"TokenRows({self._tokens.shape})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        i = int(index) % len(self._tokens)
        return {"tokens": self._tokens[i], "lengths": self._lengths[i]}


# ------------------------------------------------------------------------------------------ GPT-2 folder
def tokenizer_dir(config) -> str:
    return config.model.get("tokenizer_dir") or config.model.init_from


def check_gpt2_folder(config) -> None:
    """config.model.init_from (and tokenizer_dir) name a local GPT-2 folder: one-line errors otherwise."""
    folder = config.model.init_from
    if not folder:
        raise errors.ConfigError("config.model.init_from is empty: the prompt writer fine-tunes a local Hugging "
                                 "Face GPT-2 folder (config.json, model.safetensors, tokenizer files), e.g. "
                                 "--config=configs/prompt_writer.py:gpt2=DIR")
    for what, path in (("model.init_from", folder), ("model.tokenizer_dir", tokenizer_dir(config))):
        if not os.path.isdir(path):
            raise errors.DataError(f"config.{what}={path}: no such GPT-2 folder (a local Hugging Face GPT-2: "
                                   "config.json, model.safetensors, tokenizer.json or vocab.json + merges.txt)")
    for name in (gpt2_weights.CONFIG, gpt2_weights.WEIGHTS):
        if not os.path.isfile(os.path.join(folder, name)):
            raise errors.DataError(f"config.model.init_from={folder} has no {name}: not a Hugging Face GPT-2 folder")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(directory: str):
    try:
        return gpt2_weights.load_tokenizer(directory)
    except FileNotFoundError as e:
        raise errors.DataError(f"config.model.init_from / tokenizer_dir: {e}") from None


# ------------------------------------------------------------------------------------------ input
class PromptWriterInput(Input):
    """The tokenised corpus, split into train and held-out rows."""

    @functools.cached_property
    def tokenizer(self):
        return _load_tokenizer(tokenizer_dir(self.config))

    @functools.cached_property
    def rows(self) -> dict:
        c = self.config.input
        train, heldout = split_corpus(read_corpus(c.corpus), float(c.eval_fraction), c.corpus)
        out = {"train": encode_texts(self.tokenizer, train, int(c.max_len)),
               "heldout": encode_texts(self.tokenizer, heldout, int(c.max_len))}
        cut = out["train"][2] + out["heldout"][2]
        if cut:
            logging.warning("%s: %d caption(s) longer than input.max_len=%d tokens are cut", c.corpus, cut, c.max_len)
        return out

    def build_spec(self) -> DataSpec:
        """Rows of max_len tokens with their lengths; the info holds the GPT-2's sizes (from the folder's
        config.json, read before the corpus) and the tokenizer's facts."""
        gpt2 = gpt2_weights.load_config(self.config.model.init_from)
        vocab, eos = len(self.tokenizer), int(self.tokenizer.eos_token_id)
        if vocab > gpt2["vocab_size"]:
            raise errors.DataError(f"the tokenizer of {tokenizer_dir(self.config)} has {vocab} tokens, more than "
                                   f"the GPT-2's vocab_size {gpt2['vocab_size']}")
        max_len = int(self.config.input.max_len)
        if not 2 < max_len <= gpt2["n_positions"] + 1:
            raise errors.ConfigError(f"config.input.max_len={max_len} must be in 3..{gpt2['n_positions'] + 1} "
                                     f"(the GPT-2 reads max_len - 1 tokens, n_positions {gpt2['n_positions']})")
        rows = self.rows
        arrays = elements(tokens=((max_len,), np.int32), lengths=((), np.int32), weight=((), np.float32))
        return DataSpec(arrays, {"gpt2": {k: gpt2[k] for k in _SIZES}, "tokenizer_vocab": vocab, "eos_id": eos,
                                 "train_rows": len(rows["train"][0]), "heldout_rows": len(rows["heldout"][0]),
                                 "truncated_rows": rows["train"][2] + rows["heldout"][2]})

    def train(self, process_index, process_count):
        tokens, lengths, _ = self.rows["train"]
        return pipeline.make_iterator(TokenRows(tokens, lengths), batch_size=self.config.batch_size // process_count,
                                      process_index=process_index, process_count=process_count, shuffle=True,
                                      seed=self.config.seed)

    def eval(self, process_index, process_count):
        tokens, lengths, _ = self.rows["heldout"]
        if not len(tokens):
            return None
        return pipeline.make_iter_dataset(TokenRows(tokens, lengths),
                                          batch_size=self.config.batch_size // process_count,
                                          process_index=process_index, process_count=process_count,
                                          shuffle=False, num_epochs=1, drop_remainder=False)

    def fingerprint(self):
        path = self.config.input.corpus
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return {"corpus": os.path.abspath(path), "sha256": digest, "gpt2": os.path.abspath(self.config.model.init_from),
                "train_rows": len(self.rows["train"][0]), "heldout_rows": len(self.rows["heldout"][0])}


# ------------------------------------------------------------------------------------------ core
class CausalLM(nn.Module):
    """The GPT-2 as the submodule 'gpt2': its params are the 'gpt2' subtree that pretrained_parts loads,
    and LoRA's dropout interceptor sees the same 'gpt2/...' paths as the adapters."""

    gpt2: gpt2_lib.GPT2

    def __call__(self, tokens, train: bool = False):
        return self.gpt2(tokens, train=train)


class PromptWriterTask(Task):
    name = "prompt_writer"
    input_class = PromptWriterInput
    plugins = {"infer": "eojax.diffusion.prompt_writer:write_prompts"}

    @classmethod
    def check_config(cls, config):
        unknown = set(config.input.keys()) - _INPUT_KEYS
        if unknown:
            raise errors.ConfigError(f"unknown config.input keys {sorted(unknown)}; known: {sorted(_INPUT_KEYS)}")
        if not 0 <= float(config.input.eval_fraction) < 1:
            raise errors.ConfigError(f"config.input.eval_fraction={config.input.eval_fraction} must be in [0, 1)")
        check_gpt2_folder(config)
        if config.input.corpus and not os.path.isfile(config.input.corpus):
            raise errors.DataError(f"config.input.corpus={config.input.corpus} does not exist")

    def model_kwargs(self) -> dict:
        m = self.config.model
        return dict(self.spec.info["gpt2"], dropout=float(m.dropout), dtype=jnp.dtype(m.dtype),
                    param_dtype=jnp.dtype(m.param_dtype))

    @functools.cached_property
    def gpt2(self) -> gpt2_lib.GPT2:
        """The bare GPT-2 (generation applies it to params['gpt2'])."""
        return gpt2_lib.GPT2(**self.model_kwargs())

    @functools.cached_property
    def model(self) -> CausalLM:
        return CausalLM(self.gpt2)

    @property
    def max_len(self) -> int:
        return self.spec.elements["tokens"][0][0]

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["tokens"][:, :-1], train=False)

    def pretrained_parts(self):
        return {"gpt2": self.config.model.init_from}

    def load_pretrained_part(self, subtree, source, init_params):
        """The folder's GPT-2 in place of the random init, with the init's dtypes and shardings."""
        if subtree != "gpt2":
            raise ValueError(f"the prompt_writer task loads no pretrained '{subtree}'")
        loaded = gpt2_weights.load_params(source)
        shapes = lambda tree: {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}  # noqa: E731
        problems = key_problems(shapes(loaded), shapes(init_params), source="GPT-2 checkpoint")
        if problems:
            raise CheckpointMismatchError(f"model.init_from={source}: its GPT-2 differs from the run's model "
                                          f"(a run trained from another folder?): {'; '.join(problems[:5])}")
        return jax.tree.map(lambda v, a: jax.device_put(jnp.asarray(v, a.dtype), a.sharding), loaded, init_params)

    # -- loss --------------------------------------------------------------------------------------
    def logits(self, params, tokens, rng=None, train: bool = False):
        """(B, L-1, V) float32 next-token logits of tokens[:, :-1]."""
        return self.model.apply({"params": params}, tokens[:, :-1], train=train,
                                rngs={"dropout": rng} if train else {})

    @staticmethod
    def label_mask(batch) -> jax.Array:
        """(B, L-1): label j (token j+1) is a real token of a real row."""
        steps = batch["tokens"].shape[1] - 1
        real = jnp.arange(steps)[None, :] < (batch["lengths"] - 1)[:, None]
        return (real & (batch["weight"] > 0)[:, None]).astype(jnp.float32)

    def _token_nll(self, params, batch, rng, train):
        logits = self.logits(params, batch["tokens"], rng, train)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
        return nll, logits, self.label_mask(batch)

    def loss_fn(self, params, state, batch, rng, train):
        nll, logits, mask = self._token_nll(params, batch, rng, train)
        n = jnp.maximum(mask.sum(), 1.0)
        correct = (jnp.argmax(logits, -1) == batch["tokens"][:, 1:]) * mask
        return (nll * mask).sum() / n, {"token_accuracy": correct.sum() / n}, state

    def eval_fn(self, params, state, batch, rng):
        nll, logits, mask = self._token_nll(params, batch, rng, False)
        correct = (jnp.argmax(logits, -1) == batch["tokens"][:, 1:]) * mask
        return {"loss_sum": (nll * mask).sum(), "token_accuracy_sum": correct.sum(), "count": mask.sum()}

    def finalize_eval(self, sums):
        """Per-token means over the held-out split; perplexity = exp(mean token NLL)."""
        out = super().finalize_eval(sums)
        if "loss" in out:
            out["perplexity"] = float(np.exp(out["loss"]))
        return out

    def train_flops_per_example(self) -> float:
        return gpt2_lib.flops_per_sequence(self.model_kwargs(), self.max_len - 1, training=True)


# ------------------------------------------------------------------------------------------ generation
def class_names(config, options) -> list[str]:
    """--prompt values, then the lines of --input (a .txt of class names), else config.generate.classes."""
    names = [p.strip() for p in options.get("prompt") or []]
    path = options.get("input") or ""
    if path:
        if not os.path.isfile(path):
            raise errors.DataError(f"--input={path} does not exist (a .txt of class names, one per line)")
        with open(path, encoding="utf-8") as f:
            names += [line.strip() for line in f]
    if not path and not names:
        names = list(config.generate.classes)
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise errors.ConfigError("no class names: give --prompt=CLASS (repeatable), --input=<file with one class "
                                 "per line> or config.generate.classes")
    return names


def write_prompts(run, variables, workdir, options) -> dict:
    """`eojax infer prompt_writer`: one prompt per class, the LM's continuation of generate.template,
    written to <output>/prompts.json as {class: prompt} (what `eojax downstream` takes as CLASS:PROMPT).
    A class's prompt depends only on (model, class, seed, settings): its key is folded from the seed and
    the class name, so adding a class never changes another's."""
    from eojax.vsat import generate as gen  # generic batched GPT-2 decoding with a KV cache

    cfg, task = run.config.generate, run.task
    if "{class}" not in cfg.template:
        raise errors.ConfigError(f"config.generate.template={cfg.template!r} has no {{class}} placeholder")
    if cfg.temperature < 0 or cfg.top_k < 0 or cfg.max_new_tokens < 1:
        raise errors.ConfigError("config.generate needs temperature >= 0, top_k >= 0 and max_new_tokens >= 1 "
                                 f"(got {cfg.temperature}, {cfg.top_k}, {cfg.max_new_tokens})")
    names = class_names(run.config, options)
    tok = _load_tokenizer(tokenizer_dir(run.config))
    eos = int(task.spec.info["eos_id"])
    params = variables[0]["gpt2"]
    seed = int(options.get("seed", 0))
    heads = {name: [eos, *tok(cfg.template.replace("{class}", name), add_special_tokens=False)["input_ids"]]
             for name in names}
    # One prompt width (the longest, rounded up to 8) and one budget for every class: one compiled
    # generator, whatever the classes' lengths.
    width = -(-max(len(ids) for ids in heads.values()) // 8) * 8
    new_tokens = min(int(cfg.max_new_tokens), task.gpt2.n_positions - width)
    if new_tokens < 1:
        raise errors.ConfigError(f"the prompts take up to {width} tokens, all of the GPT-2's n_positions "
                                 f"{task.gpt2.n_positions}: shorten config.generate.template or the class names")
    # The generator itself, not gen.generate: its packed prefill would compile once per length bucket.
    fn = gen.make_generate(task.gpt2, max_new_tokens=new_tokens, temperature=float(cfg.temperature),
                           top_k=int(cfg.top_k), pad_id=eos)
    vocab = task.gpt2.vocab_size
    free = (jnp.ones((1, vocab), bool), jnp.zeros((1, vocab), jnp.int32), jnp.zeros((1,), jnp.int32))  # no constraint
    prompts = {}
    for name, ids in heads.items():
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        tokens, lengths = gen.left_pad([ids], pad_id=eos, length=width)
        out = fn(params, jnp.asarray(tokens), jnp.asarray(lengths), key, jnp.asarray([eos], jnp.int32), *free, None)
        new = [int(t) for t in np.asarray(out.tokens[0, :int(out.lengths[0])]) if int(t) != eos]
        # Decoded together with the template so the BPE joins the seam as it was generated; control
        # characters and broken UTF-8 (a byte-level BPE can stop mid-character) are dropped.
        text = tok.decode(ids[1:] + new)
        prompts[name] = " ".join("".join(ch for ch in text if ch.isprintable() and ch != "\ufffd").split())
    os.makedirs(options["output"], exist_ok=True)
    path = os.path.join(options["output"], "prompts.json")
    with open(path + ".partial", "w") as f:
        json.dump(prompts, f, indent=2, ensure_ascii=False)
    os.replace(path + ".partial", path)
    return {"file": path, "prompts": prompts, "template": cfg.template, "temperature": float(cfg.temperature),
            "top_k": int(cfg.top_k), "seed": seed,
            # the same pairs as `eojax downstream` flags, ready to paste
            "downstream_flags": [f"--prompt={name}:{text}" for name, text in prompts.items()]}
