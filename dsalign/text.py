"""Tokenizer and vocabulary as in the paper: lowercase, drop non-alphanumerics, words seen >= 5 times in train."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase; every run of characters that are not letters or digits separates words.

    "t-shirt" -> ["t", "shirt"], "don't" -> ["don", "t"]: this reproduces the tokens of the Karpathy-split
    JSON files (all 40,000 Flickr8k sentences), on which the published vocabularies and numbers are based.
    """
    return _NON_ALNUM.sub(" ", text.lower()).split()


class Vocabulary:
    """Word <-> id mapping with the four specials at ids 0..3 (PAD=0, UNK=1, START=2, END=3)."""

    def __init__(self, words: Sequence[str], counts: dict[str, int] | None = None, min_count: int = 5):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.counts: dict[str, int] = dict(counts or {})
        self.min_count = min_count

    pad_id = 0
    unk_id = 1
    start_id = 2
    end_id = 3

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Build from tokenised *training* captions."""
        counter: Counter[str] = Counter()
        for tokens in token_lists:
            counter.update(tokens)
        return cls.from_counts(counter, min_count)

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_count: int = 5) -> Vocabulary:
        """Keep words seen >= ``min_count`` times, ordered by descending count, then alphabetically."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept, counts={w: counts[w] for w in kept}, min_count=min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, tokens: Sequence[str], add_start: bool = False, add_end: bool = False) -> list[int]:
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return ([self.start_id] if add_start else []) + ids + ([self.end_id] if add_end else [])

    def decode(self, ids: Iterable[int], strip_specials: bool = True) -> list[str]:
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id and strip_specials:
                break
            if strip_specials and i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return words

    def to_dict(self) -> dict:
        return {"min_count": self.min_count, "itos": self.itos, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: object) -> Vocabulary:
        """ValueError when malformed; a repeated word too, since dropping it would shift every later id."""
        itos = data.get("itos") if isinstance(data, dict) else None
        if (not isinstance(itos, list) or list(itos[: len(SPECIALS)]) != list(SPECIALS)
                or not all(isinstance(w, str) for w in itos) or len(set(itos)) != len(itos)):
            raise ValueError("malformed vocabulary: 'itos' must be a list of distinct words starting with the "
                             "special tokens")
        counts, min_count = data.get("counts") or {}, data.get("min_count", 5)
        if not isinstance(counts, dict) or not isinstance(min_count, int):
            raise ValueError("malformed vocabulary: 'counts' must be an object and 'min_count' an integer")
        return cls(itos[len(SPECIALS):], counts=counts, min_count=min_count)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=0, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: also not UTF-8
            raise ValueError(f"cannot read vocabulary {path}: {exc}") from exc
        return cls.from_dict(data)
