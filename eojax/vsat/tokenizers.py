"""Tokenizers for GReaT rows, and the finite-state machines that constrain their generation.

Two tokenizers share one small interface (encode / decode / vocab_size / pad_id / bos_id / eos_id /
number-token sets), so the task, the FSM and the infiller never ask which one they have:

- `NumericTokenizer` (training from scratch): every column name is one token, the separators " is "
  and ", " are one token each, numbers are spelt digit by digit ('-' and '.' are tokens too), plus
  pad / bos / eos; integer columns with a width are zero-padded to it (fixed place value).
  Digits rather than one token per value (aispace's GPT-2 BPE gives most 4-5 digit values their own
  1-2 tokens): 7421 and 7425 share three of four tokens, so nearby values share structure and the
  vocabulary stays ~30 tokens whatever the value range.
- `BPETokenizer` (pretrained GPT-2): transformers' GPT-2 byte-level BPE from local files (part A's
  eojax.weights.gpt2.load_tokenizer). Its number tokens are found from the vocabulary: tokens that
  decode to digits, with a leading space (a number's first piece: " is 7421" is ' is', ' 74', '21')
  or without (a continuation).

`build_fsm(tokenizer, targets, ...)` -> (allowed (S, V) bool, next_state (S, V) int32) for the
generator: it forces the separator and each target column name in the fixed order, allows only
number tokens for the values (exactly the column's width for a numeric tokenizer with widths, else
1 to `max_number_tokens`), then eos.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from eojax.vsat.great import IS, SEP

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
DIGITS = tuple("0123456789")


class NumericTokenizer:
    """Column names and separators as single tokens, numbers as digit tokens.

    `widths` {column: digits}: that column's non-negative integers are spelt with exactly that many
    digits, zero-padded ("B3 is 7421" -> B3, " is ", 0, 7, 4, 2, 1 at width 5), so every digit keeps
    its place value (the first digit is always the ten-thousands) and a value is a fixed number of
    tokens; decode strips the padding again, so text -> ids -> text is exact.
    """

    kind = "numeric"

    def __init__(self, columns: Sequence[str], widths: Mapping[str, int] | None = None):
        columns = list(columns)
        if len(set(columns)) != len(columns) or not columns:
            raise ValueError(f"columns must be unique and non-empty; got {columns}")
        for c in columns:
            if not c or any(ch in c for ch in ",") or IS in c or re.fullmatch(r"[0-9.\-]+", c):
                raise ValueError(f"column name {c!r} cannot be a token (empty, holds a separator, or a number)")
        self.columns = columns
        self.vocab = [PAD, BOS, EOS, *DIGITS, "-", ".", IS, SEP, *columns]
        self._ids = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        # Longest alternatives first, so 'B10' is not read as 'B1' + '0'.
        literals = sorted([IS, SEP, *columns], key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, literals)) + r"|[0-9.\-]")
        self.widths = dict(widths or {})
        unknown = set(self.widths) - set(columns)
        if unknown:
            raise ValueError(f"widths for unknown columns {sorted(unknown)}")
        names = "|".join(map(re.escape, sorted(self.widths, key=len, reverse=True)))
        # "<col> is <digits>" at a feature boundary, for the columns with a width.
        self._value = re.compile(rf"(^|{re.escape(SEP)})({names}){re.escape(IS)}(\d+)(?={re.escape(SEP)}|$)") \
            if self.widths else None

    def _pad(self, m) -> str:
        head, col, digits = m.groups()
        w = self.widths[col]
        if len(digits.lstrip("0") or "0") > w:
            raise ValueError(f"column {col}: {digits} has more than {w} digits")
        return f"{head}{col}{IS}{int(digits):0{w}d}"

    def _unpad(self, m) -> str:
        head, col, digits = m.groups()
        return f"{head}{col}{IS}{int(digits)}"

    def number_length(self, column: str, max_tokens: int) -> tuple[int, int]:
        """(fewest, most) tokens a value of `column` takes."""
        w = self.widths.get(column)
        return (w, w) if w else (1, max_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if self._value is not None:
            text = self._value.sub(self._pad, text)
        ids, pos = [], 0
        for m in self._pattern.finditer(text):
            if m.start() != pos:
                raise ValueError(f"cannot tokenize {text[pos:m.start()]!r} at position {pos} of {text!r}; "
                                 f"known columns: {self.columns}")
            ids.append(self._ids[m.group()])
            pos = m.end()
        if pos != len(text):
            raise ValueError(f"cannot tokenize {text[pos:]!r} at position {pos} of {text!r}")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Ids -> text; pad / bos / eos are dropped, decoding stops at the first eos."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.vocab[i])
        text = "".join(out)
        return self._value.sub(self._unpad, text) if self._value is not None else text

    def number_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens that may start a number, tokens that may continue one): digits both times."""
        digits = np.array([self._ids[d] for d in DIGITS])
        return digits, digits


class BPETokenizer:
    """GPT-2 byte-level BPE (a transformers tokenizer object, loaded from local files)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.bos_id = self.eos_id  # GPT-2 uses <|endoftext|> for both
        self.pad_id = self.eos_id  # padding is masked out of the loss, its id does not matter
        self.vocab_size = len(hf_tokenizer)
        self._number_tokens = None

    @classmethod
    def from_directory(cls, directory: str) -> "BPETokenizer":
        from eojax.weights.gpt2 import load_tokenizer  # part A: transformers' tokenizer, local files only
        return cls(load_tokenizer(directory))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Ids -> text: a leading bos dropped, cut at the first eos (bos and eos are one token here)."""
        ids = np.asarray(ids).tolist()
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.hf.decode(ids)

    def number_length(self, column: str, max_tokens: int) -> tuple[int, int]:
        return 1, max_tokens

    def number_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        if self._number_tokens is None:
            start, cont = [], []
            for i in range(self.vocab_size):
                s = self.hf.decode([i])
                if re.fullmatch(r" [0-9]+", s):
                    start.append(i)
                elif re.fullmatch(r"[0-9]+", s):
                    cont.append(i)
            self._number_tokens = (np.array(start), np.array(cont))
        return self._number_tokens


def field_prefix(tok, column: str, sep: bool) -> str:
    """The text before a value: [", "] "<column> is", with the space that ends " is " where it is part
    of the separator token (numeric) and without it where BPE glues it to the number (" 7421")."""
    return (SEP if sep else "") + column + (IS if tok.kind == "numeric" else IS.rstrip())


def build_fsm(tok, targets: Sequence[str], *, after_prompt: bool = True, max_number_tokens: int = 6,
              vocab_size: int | None = None):
    """FSM tables for generating `targets` (in this order) after a prompt.

    The generated text is  [", "] t1 " is " <number> ", " t2 " is " <number> ... <eos>  (the first
    separator only `after_prompt`, i.e. when known columns precede). Literal pieces are forced (one
    allowed token per state); a number is a start token then continuation tokens, as many as
    `tok.number_length(column, max_number_tokens)` allows (fewest, most); once it has the fewest,
    the next literal's first token may follow, or eos after the last target. The final state allows
    only eos and stays there.

    Returns (allowed (S, V) bool, next_state (S, V) int32, start_state int); next_state of a
    disallowed token is the final state (never taken). V = `vocab_size` (a model's embedding table
    may be larger than its tokenizer's vocabulary, e.g. padded), default the tokenizer's.
    """
    if not targets:
        raise ValueError("build_fsm needs at least one target column")
    if max_number_tokens < 1:
        raise ValueError(f"max_number_tokens={max_number_tokens} must be >= 1")
    start_ids, cont_ids = tok.number_tokens()
    if len(start_ids) == 0:
        raise ValueError("the tokenizer has no number tokens")
    literals = [tok.encode(field_prefix(tok, col, sep=j > 0 or after_prompt)) for j, col in enumerate(targets)]
    lengths = [tok.number_length(col, max_number_tokens) for col in targets]
    # States: per target j its literal states ("lit", k) then number states ("num", k) where k
    # number tokens are already out (k = 0 .. most); a final "done".
    order = [(j, part, k) for j, lit in enumerate(literals)
             for part, n in (("lit", len(lit)), ("num", lengths[j][1] + 1)) for k in range(n)] + [("done",)]
    index = {k: i for i, k in enumerate(order)}
    done = index[("done",)]
    v = tok.vocab_size if vocab_size is None else vocab_size
    if v < tok.vocab_size:
        raise ValueError(f"vocab_size {v} is smaller than the tokenizer's {tok.vocab_size}")
    allowed = np.zeros((len(order), v), bool)
    next_state = np.full((len(order), v), done, np.int32)

    def allow(state, ids, to):
        allowed[state, ids] = True
        next_state[state, ids] = to

    for j, lit in enumerate(literals):
        for k, t in enumerate(lit):
            allow(index[(j, "lit", k)], t, index[(j, "lit", k + 1)] if k + 1 < len(lit) else index[(j, "num", 0)])
        fewest, most = lengths[j]
        allow(index[(j, "num", 0)], start_ids, index[(j, "num", 1)])
        for k in range(1, most + 1):
            st = index[(j, "num", k)]
            if k < most:
                allow(st, cont_ids, index[(j, "num", k + 1)])
            if k < fewest:
                continue
            if j + 1 < len(literals):  # the next column's separator, forced onwards from there
                nxt = literals[j + 1]
                allow(st, nxt[0], index[(j + 1, "lit", 1)] if len(nxt) > 1 else index[(j + 1, "num", 0)])
            else:
                allow(st, tok.eos_id, done)
    allow(done, tok.eos_id, done)
    return allowed, next_state, index[(0, "lit", 0)]
