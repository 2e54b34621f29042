"""Words, tokens and the token mappers of Prompt-to-Prompt.

Everything here works on token *positions* in the padded text sequence a pipeline feeds to
cross-attention, for any tokenizer length (77 for Stable Diffusion, 32 for the embedded shapes
model, 256/512 for T5) and any special-token layout: CLIP puts a start-of-text token at position 0
and an end token after the words; T5 (sentencepiece, "▁" word starts) has no start token, so its
first word is at position 0. The layout is read from the tokenizer itself (:func:`special_tokens`).

Differences from the official implementation, on purpose:

* words are matched ignoring case and surrounding punctuation ("Cat," matches "cat"), and a word
  may span several tokens;
* the word-swap mapper keeps every token after a swapped word aligned even when the swapped words
  have different token counts (the official mapper shifts all later tokens);
* the refinement alignment maps only equal tokens, and the tail (end-of-text and padding) of the
  edited prompt is aligned with the tail of the source prompt.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import PromptMismatchError, TruncatedWordError, WordNotFoundError

__all__ = [
    "PromptTokens",
    "WordSpan",
    "tokenize_prompt",
    "normalize_word",
    "replacement_mapper",
    "refinement_alignment",
    "special_tokens",
]

_STRIP = string.punctuation + "“”‘’«»…"


def normalize_word(word: str) -> str:
    """Lower-case a word and strip the punctuation around it ("Cat," -> "cat")."""
    return word.strip().strip(_STRIP).lower()


@dataclass(frozen=True)
class WordSpan:
    """One whitespace-separated word of a prompt and the token positions it occupies."""

    text: str
    key: str
    positions: tuple[int, ...]
    lead: tuple[int, ...] = ()
    trail: tuple[int, ...] = ()

    def parts(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(punctuation before, the word's own tokens, punctuation after)."""
        return self.lead, self.positions, self.trail


@dataclass(frozen=True)
class PromptTokens:
    """A prompt split into words with their token positions.

    ``ids`` are the token ids without padding (start, words, end); ``length`` is the padded length
    the text encoder sees; ``end`` is the first position after the last word (the end-of-text token).
    """

    prompt: str
    words: tuple[WordSpan, ...]
    ids: tuple[int, ...]
    length: int

    @property
    def end(self) -> int:
        return min(len(self.ids) - 1, self.length - 1)

    def word_list(self) -> list[str]:
        return [w.key for w in self.words if w.key]

    def positions_of(self, word: str) -> list[int]:
        """Token positions of ``word`` (one or several words separated by spaces) in the prompt.

        Every occurrence counts. Raises :class:`WordNotFoundError` listing the prompt's words.
        """
        keys = [normalize_word(part) for part in word.split()]
        keys = [k for k in keys if k]
        if not keys:
            raise WordNotFoundError(f"empty word {word!r}; give one of the prompt's words: {self.word_list()}")
        found: list[int] = []
        n = len(keys)
        for start in range(len(self.words) - n + 1):
            window = self.words[start : start + n]
            if [w.key for w in window] == keys:
                for w in window:
                    found.extend(w.positions)
        kept = sorted(set(p for p in found if p < self.length))
        if not kept and (found or any(w.key in keys for w in self.words)):
            raise TruncatedWordError(
                f"word {word!r} of {self.prompt!r} is past the {self.length}-token limit of the text encoder; shorten the prompt"
            )
        if not kept:
            raise WordNotFoundError(
                f"word {word!r} is not in the prompt {self.prompt!r}; its words are {self.word_list()}"
            )
        return kept


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


_warned_truncation: set[str] = set()


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts before a text, ids it puts after), read by encoding a probe word
    with and without special tokens: ``([bos], [eos])`` for CLIP, ``([], [eos])`` for T5."""
    probe = _encode_plain(tokenizer, "a")
    full = list(tokenizer("a")["input_ids"])
    for i in range(len(full) - len(probe) + 1):
        if probe and full[i : i + len(probe)] == probe:
            return full[:i], full[i + len(probe) :]
    # A tokenizer whose probe encoding changes with special tokens: assume CLIP's layout.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return [bos], [eos]


def tokenize_prompt(tokenizer: Any, prompt: str, length: int | None = None) -> PromptTokens:
    """Split ``prompt`` into words and find each word's token positions.

    Args:
        tokenizer: a Hugging Face tokenizer (CLIP-style with start/end tokens, or T5-style with an
            end token only; see :func:`special_tokens`).
        prompt: the prompt text.
        length: the padded sequence length; defaults to ``tokenizer.model_max_length``.

    Words past the token limit are kept with the positions that survive truncation (none, for
    words wholly past it); the pipeline itself warns about the truncation, as diffusers does.
    """
    length = int(length or tokenizer.model_max_length)
    lead_ids, trail_ids = special_tokens(tokenizer)
    limit = length - len(trail_ids)  # first position the words cannot reach
    words: list[WordSpan] = []
    ids: list[int] = []
    pos = len(lead_ids)
    for raw in prompt.split():
        core = raw.strip(_STRIP) or raw
        lead, trail = raw[: raw.index(core)], raw[raw.index(core) + len(core) :]
        before = _encode_plain(tokenizer, lead) if lead else []
        toks = _encode_plain(tokenizer, core)
        after = _encode_plain(tokenizer, trail) if trail else []
        start = pos + len(before)
        # The word's positions are those of its letters, not of the punctuation around it.
        def kept(first: int, count: int) -> tuple[int, ...]:
            return tuple(p for p in range(first, first + count) if p < limit)

        words.append(
            WordSpan(raw, normalize_word(raw), kept(start, len(toks)), kept(pos, len(before)),
                     kept(start + len(toks), len(after)))
        )
        ids.extend(before + toks + after)
        pos += len(before) + len(toks) + len(after)
    whole = _encode_plain(tokenizer, prompt)
    if whole != ids:
        # A tokenizer whose pieces cross whitespace: fall back to character offsets.
        words, ids = _spans_from_offsets(tokenizer, prompt, len(lead_ids), limit)
    full = [*lead_ids, *ids[: max(0, length - len(lead_ids) - len(trail_ids))], *trail_ids]
    return PromptTokens(prompt=prompt, words=tuple(words), ids=tuple(full), length=length)


def _spans_from_offsets(tokenizer: Any, prompt: str, first: int, limit: int) -> tuple[list[WordSpan], list[int]]:
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    words: list[WordSpan] = []
    cursor = 0
    def overlapping(lo: int, hi: int) -> tuple[int, ...]:
        return tuple(first + i for i, (a, b) in enumerate(offsets) if a < hi and b > lo and first + i < limit)

    for raw in prompt.split():
        start = prompt.index(raw, cursor)
        end = start + len(raw)
        cursor = end
        core = raw.strip(_STRIP) or raw
        core_start = start + raw.index(core)
        core_end = core_start + len(core)
        # The word's positions are those of its letters; punctuation tokens go to lead/trail.
        positions = overlapping(core_start, core_end)
        lead = tuple(p for p in overlapping(start, core_start) if p not in positions)
        trail = tuple(p for p in overlapping(core_end, end) if p not in positions)
        words.append(WordSpan(raw, normalize_word(raw), positions, lead, trail))
    return words, ids


def replacement_mapper(source: PromptTokens, target: PromptTokens) -> torch.Tensor:
    """The word-swap mapper ``M`` of shape (L_src, L_tgt).

    ``(A_src @ M)[:, j]`` is the source attention that target token ``j`` inherits. Unchanged words
    map one to one; a swapped word with a different token count spreads each source token evenly
    over the target word's tokens (so the word's total attention is kept); every token after a
    swap stays aligned (start, end and padding tokens included).
    """
    _check_same_word_count(source, target)
    m = torch.zeros(source.length, target.length)
    m[0, 0] = 1.0
    for sw, tw in zip(source.words, target.words):
        for s, t in zip(sw.parts(), tw.parts()):
            if not s or not t:
                continue
            if len(s) == len(t):
                for a, b in zip(s, t):
                    m[a, b] = 1.0
            else:
                for a in s:
                    for b in t:
                        m[a, b] = 1.0 / len(t)
    src_tail, tgt_tail = source.end, target.end
    n = min(source.length - src_tail, target.length - tgt_tail)
    for k in range(n):
        m[src_tail + k, tgt_tail + k] = 1.0
    # Source tail tokens left over (target has more word tokens) go to the target's last token, so
    # every source row keeps a total weight of one.
    for a in range(src_tail + n, source.length):
        m[a, target.length - 1] = 1.0
    return m


def replacement_alignment(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The target tokens a word swap leaves unchanged, and their source positions.

    Returns ``(index, keep)``, both of length L_tgt, as :func:`refinement_alignment`: ``keep[j]`` is
    1.0 for the start token, the tokens of every word (and punctuation) spelled with the same
    tokens in both prompts, and the end and padding tokens, each at source position ``index[j]``;
    0.0 for the tokens of a swapped word (``index[j]`` then 0).
    """
    _check_same_word_count(source, target)
    index = torch.zeros(target.length, dtype=torch.long)
    keep = torch.zeros(target.length)
    keep[0] = 1.0
    for sw, tw in zip(source.words, target.words):
        for s, t in zip(sw.parts(), tw.parts()):
            pairs = [(a, b) for a, b in zip(s, t) if a < source.length and b < target.length]
            if len(s) == len(t) and all(source.ids[a] == target.ids[b] for a, b in pairs):
                for a, b in pairs:
                    index[b], keep[b] = a, 1.0
    src_tail, tgt_tail = source.end, target.end
    for k in range(min(source.length - src_tail, target.length - tgt_tail)):
        index[tgt_tail + k], keep[tgt_tail + k] = src_tail + k, 1.0
    return index, keep


def _check_same_word_count(source: PromptTokens, target: PromptTokens) -> None:
    if len(source.words) != len(target.words):
        raise PromptMismatchError(
            "Replace needs prompts with the same number of words: "
            f"{source.prompt!r} has {len(source.words)}, {target.prompt!r} has {len(target.words)}. "
            "Use attnctrl.Refine for prompts that add or remove words."
        )


def refinement_alignment(source: PromptTokens, target: PromptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Align the target's tokens to the source's (global alignment on token ids).

    Returns ``(index, keep)``, both of length L_tgt: ``index[j]`` is the source position of
    target token ``j`` and ``keep[j]`` is 1.0 where the token has an equal counterpart, 0.0 for new
    tokens (which keep their own attention). Scores: match +1, mismatch -1, gap 0.
    """
    x, y = list(source.ids), list(target.ids)
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    index = torch.zeros(target.length, dtype=torch.long)
    keep = torch.zeros(target.length)
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            index[j - 1] = i - 1
            keep[j - 1] = 1.0
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:  # a mismatch on the diagonal: the target token is new
            i, j = i - 1, j - 1
    for k in range(target.length - m):
        index[m + k] = min(n + k, source.length - 1)
        keep[m + k] = 1.0
    return index, keep


def check_same_length(prompts: Sequence[PromptTokens]) -> None:
    lengths = {p.length for p in prompts}
    if len(lengths) != 1:
        raise PromptMismatchError(f"prompts were tokenized to different lengths {sorted(lengths)}")
