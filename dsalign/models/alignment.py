"""The alignment model of the paper: region projection (Eq. 1) and the sentence BRNN (Eqs. 2-6).

Both map into one ``embed_dim``-dimensional space (the paper's h); the image-sentence score (Eq. 8) comes from
:func:`dsalign.ops.score.score` on the outputs, so the model itself holds no pairwise logic and can be used
for training, retrieval and word-region alignment alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dsalign.models.config_io import JsonConfig, check_positive_ints
from dsalign.text import Vocabulary

# Eq. 6 ends in a ReLU; with it, many words' vectors are exactly zero and can never align (on Flickr8k 72% of
# the words after training), so "linear" is offered too.
WORD_OUTPUTS = ("relu", "linear")
# "dot": v_i . s_t as in Eq. 8; "cosine": both vectors scaled to unit length first, so every word adds a term in
# [-1, 1] and no word or region wins by its norm (faster and better on Flickr8k, docs/results.md).
SIMILARITIES = ("dot", "cosine")


@dataclass
class AlignmentConfig(JsonConfig):
    """Sizes and switches of :class:`AlignmentModel` (serialised into checkpoints and bundles).

    The paper uses embed_dim (h) 1000-1600, 300-d word vectors and a 300-600 BRNN hidden size; the smaller
    defaults keep CPU training fast and are ample for the shapes data.
    """

    vocab_size: int
    feature_dim: int
    embed_dim: int = 256
    word_dim: int = 300
    hidden_dim: int = 256
    dropout: float = 0.2
    freeze_word_embeddings: bool = False
    word_output: str = "relu"  # s_t = f(W_d(...)): "relu" as Eq. 6, or "linear"
    similarity: str = "dot"  # word-region term of Eq. 8: "dot" (the paper) or "cosine"

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "feature_dim", "embed_dim", "word_dim", "hidden_dim"))
        if self.word_output not in WORD_OUTPUTS:
            raise ValueError(f"model.word_output must be one of {WORD_OUTPUTS}, got {self.word_output!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"model.similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")



def real_words_first(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the positions of the real words in order, then those of the padding: [B, T] long.

    The identity for right-padded masks (as ``pad_captions`` makes); for any other (left-padded, gapped) the
    BRNN reads the words in this order, so padding anywhere is skipped. A check for right padding instead
    would cost a host sync per forward on the GPU.
    """
    return torch.sort((~mask.bool()).to(torch.uint8), dim=1, stable=True).indices


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``lengths[b]`` steps of x [B, T, ...] and leave the padding in place.

    The backward pass of the BRNN then starts at each sentence's own last real word; the permutation is its
    own inverse, so the same call maps the results back.
    """
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class SentenceBRNN(nn.Module):
    """Eqs. 2-6 with f = ReLU (the last one optionally linear, ``word_output``); returns word vectors
    s_t [B, T, embed_dim], zero at padded positions.

    e_t for all t comes from one matmul; the loop over T only runs the two hidden recurrences, stacked into
    one batched matmul per step. Dropout sits on the non-recurrent inputs x_t and (hf_t + hb_t).
    """

    def __init__(self, config: AlignmentConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.word_dim)  # W_w
        self.embedding.weight.requires_grad_(not config.freeze_word_embeddings)
        self.w_e = nn.Linear(config.word_dim, config.hidden_dim)
        self.w_f = nn.Linear(config.hidden_dim, config.hidden_dim)  # weight W_f, bias b_f
        self.w_b = nn.Linear(config.hidden_dim, config.hidden_dim)  # weight W_b, bias b_b
        self.w_d = nn.Linear(config.hidden_dim, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.word_relu = config.word_output == "relu"

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        order = real_words_first(token_mask)  # the recurrences run on the real words moved to the front
        lengths = token_mask.sum(1)
        e = F.relu(self.w_e(self.dropout(self.embedding(tokens.gather(1, order)))))  # [B, T, H]
        e_both = torch.stack([e, reverse_within_length(e, lengths)])  # [2, B, T, H]: forward, backward order
        weight = torch.stack([self.w_f.weight.T, self.w_b.weight.T])  # [2, H, H]
        bias = torch.stack([self.w_f.bias, self.w_b.bias])[:, None, None, :]  # [2, 1, 1, H]
        # e_t + b for every step at once, time-major so each step's slice is contiguous: the loop then runs two
        # ops per step (fewer kernel launches on a GPU, where this small recurrence is launch-bound)
        steps = (e_both + bias).permute(2, 0, 1, 3).contiguous()  # [T, 2, B, H]
        if torch.is_autocast_enabled(steps.device.type):
            # cast once, not by the matmul at every step (the weights still are: their gradient, summed over
            # the steps, must add up in fp32)
            steps = steps.to(torch.get_autocast_dtype(steps.device.type))
        hidden = steps.new_zeros(steps.shape[1:])
        outputs = []
        for step in steps:
            hidden = F.relu(torch.baddbmm(step, hidden, weight))
            outputs.append(hidden)
        h = torch.stack(outputs, dim=2)  # [2, B, T, H]
        both = h[0] + reverse_within_length(h[1], lengths)
        both = torch.zeros_like(both).scatter(1, order[:, :, None].expand_as(both), both)  # back in place
        s = self.w_d(self.dropout(both))
        if self.word_relu:
            s = F.relu(s)
        return s * token_mask[:, :, None].to(s.dtype)


class AlignmentModel(nn.Module):
    """Region projection v = W_m CNN + b_m (Eq. 1) and the sentence BRNN, both into the h-dim space.

    With ``similarity="cosine"`` both encoders return unit vectors, so every consumer of v and s (the score op,
    retrieval, the MRF, the API) computes cosine terms without knowing it.
    """

    def __init__(self, config: AlignmentConfig):
        super().__init__()
        self.config = config
        self.region_proj = nn.Linear(config.feature_dim, config.embed_dim)  # W_m, b_m
        self.region_dropout = nn.Dropout(config.dropout)
        self.brnn = SentenceBRNN(config)
        self.unit_vectors = config.similarity == "cosine"

    def _finish(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.unit_vectors:  # back to x's dtype: CUDA autocast computes the norm in fp32, and fp32 vectors
            x = F.normalize(x, dim=-1).to(x.dtype)  # would take the score op off its bf16 Triton kernel
        return x * mask[:, :, None].to(x.dtype)

    def encode_images(self, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """Region vectors v [B, R, h] (zero at padded regions) from CNN features [B, R, F]."""
        return self._finish(self.region_proj(self.region_dropout(regions.to(self.region_proj.weight.dtype))),
                            region_mask)

    def encode_sentences(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Word vectors s [B, T, h] (zero at padded words) from token ids [B, T]."""
        return self._finish(self.brnn(tokens, token_mask), token_mask)

    def forward(self, regions: torch.Tensor, region_mask: torch.Tensor, tokens: torch.Tensor,
                token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_images(regions, region_mask), self.encode_sentences(tokens, token_mask)


def read_word_vectors(path: str | Path, vocab: Vocabulary) -> tuple[dict[int, list[float]], int]:
    """Vectors for the vocabulary's words from a word2vec/GloVe *text* file: {token id: vector}, dimension.

    A first line of two integers (word2vec's "count dim" header) is skipped; lines of another width are an
    error naming the line, since a mixed file means a wrong file.
    """
    found: dict[int, list[float]] = {}
    dim = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                continue
            if dim == 0:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                raise ValueError(f"{path}:{number}: expected {dim} values, got {len(parts) - 1}")
            index = vocab.stoi.get(parts[0])
            if index is None or index in found:
                continue
            try:
                values = [float(x) for x in parts[1:]]
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
            if not all(math.isfinite(x) for x in values):
                raise ValueError(f"{path}:{number}: non-finite value")
            found[index] = values
    if dim == 0:
        raise ValueError(f"{path}: no word vectors found")
    return found, dim


def init_word_embeddings(model: AlignmentModel, path: str | Path, vocab: Vocabulary) -> dict:
    """Copy the file's vectors into W_w; words missing from the file keep their random init.

    Returns coverage numbers for the log: words found / vocabulary words (specials excluded).
    """
    vectors, dim = read_word_vectors(path, vocab)
    weight = model.brnn.embedding.weight
    if dim != weight.shape[1]:
        raise ValueError(f"{path} holds {dim}-d vectors but model.word_dim is {weight.shape[1]}")
    if len(vocab) != weight.shape[0]:
        raise ValueError(f"vocabulary has {len(vocab)} words but the model has {weight.shape[0]} embeddings")
    with torch.no_grad():
        for index, values in vectors.items():
            weight[index] = torch.tensor(values, dtype=weight.dtype)
    words = len(vocab) - 4
    hits = sum(1 for index in vectors if index >= 4)
    return {"found": hits, "words": words, "coverage": hits / max(words, 1)}
