"""A real CLIP BPE tokenizer over the shapes vocabulary.

The vocabulary follows CLIP's layout: the 256 byte-level unicode characters (``bytes_to_unicode``),
the same with the end-of-word suffix ``</w>``, one token per BPE merge, then ``<|startoftext|>`` and
``<|endoftext|>``. So any text tokenizes (unknown words fall back to characters), while the merges
make every scene word a single token, except :data:`SPLIT_WORDS`, which are deliberately two tokens
("triangle" -> "tri" "angle</w>", "purple" -> "pur" "ple</w>") so that multi-token words get
exercised. ``model_max_length`` is 32 and the pad token is ``<|endoftext|>``, as in Stable Diffusion.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

from . import VOCABULARY

__all__ = ["SPLIT_WORDS", "MODEL_MAX_LENGTH", "bytes_to_unicode", "build_bpe", "write_vocab_files", "build_tokenizer"]

SPLIT_WORDS: dict[str, tuple[str, ...]] = {"triangle": ("tri", "angle"), "purple": ("pur", "ple")}
"""Words that tokenize into more than one token, and their pieces."""

MODEL_MAX_LENGTH = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# A few extra words the project's demos and tests use, beyond the caption vocabulary.
_EXTRA_WORDS: tuple[str, ...] = ("with", "in", "the", "shape", "shapes", "colour", "color", "red", "pink", "brown", "cat", "dog")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE (lowest-rank pair first), as CLIP does it."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        best = min(r for r, _ in pairs)
        a, b = next((word[i], word[i + 1]) for r, i in pairs if r == best)
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def _symbols(word: str) -> list[str]:
    chars = list(word)
    return chars[:-1] + [chars[-1] + "</w>"]


def build_bpe(
    words: Iterable[str], split: Mapping[str, tuple[str, ...]] | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (vocab tokens in id order, merges) so that each word is one token, or the pieces
    ``split`` gives it (default :data:`SPLIT_WORDS`). Split words are processed first so later
    merges never break them."""
    split = SPLIT_WORDS if split is None else split
    words = sorted(set(w.lower() for w in words) | set(split))
    order = [w for w in words if w in split] + [w for w in words if w not in split]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def target(w: str) -> list[str]:
        pieces = split.get(w, (w,))
        return list(pieces[:-1]) + [pieces[-1] + "</w>"]

    for w in order:
        goal = target(w)
        # boundaries (character offsets) that must stay token boundaries
        cuts, off = set(), 0
        for p in goal[:-1]:
            off += len(p)
            cuts.add(off)
        while True:
            toks = _bpe(_symbols(w), ranks)
            if toks == goal:
                break
            pos, merged = 0, False
            for a, b in zip(toks, toks[1:]):
                pos += len(a.replace("</w>", ""))
                if pos not in cuts:
                    ranks[(a, b)] = len(merges)
                    merges.append((a, b))
                    merged = True
                    break
            if not merged:
                raise RuntimeError(f"cannot build BPE merges for {w!r}: got {toks}")
    b2u = bytes_to_unicode()
    vocab = list(b2u.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    vocab += [BOS, EOS]
    return vocab, merges


def write_vocab_files(
    directory: str, words: Iterable[str] | None = None, split: Mapping[str, tuple[str, ...]] | None = None
) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory``; return their paths.

    Defaults: the shapes vocabulary and :data:`SPLIT_WORDS`.
    """
    if words is None:
        words = set(VOCABULARY) | set(_EXTRA_WORDS) | {p for ps in SPLIT_WORDS.values() for p in ps}
    vocab, merges = build_bpe(words, split)
    os.makedirs(directory, exist_ok=True)
    vpath, mpath = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vpath + ".tmp", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, indent=0)
    with open(mpath + ".tmp", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    os.replace(vpath + ".tmp", vpath)
    os.replace(mpath + ".tmp", mpath)
    return vpath, mpath


def build_tokenizer(directory: str):
    """Write the vocab files into ``directory`` and return a ``transformers.CLIPTokenizer`` on them."""
    from transformers import CLIPTokenizer

    vpath, mpath = write_vocab_files(directory)
    return CLIPTokenizer(
        vpath,
        mpath,
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
