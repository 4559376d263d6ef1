"""Batched beam search (greedy = beam size 1) for :class:`~dsalign.models.generator.CaptionGenerator`.

All images of a batch and all their beams advance together, one ``step`` call per time step. Every sentence
ends with END and has at most ``max_len`` words (at step ``max_len`` only END is allowed), so the search space
is finite and, with ``length_penalty=0`` and a beam at least as large as the number of live prefixes, the
result is the exact most probable sentence. A finished beam stays in the beam with its final score and competes
with the live ones until the end. PAD, START and UNK are never generated.

``length_penalty`` alpha ranks hypotheses by log p / ((5 + n) / 6) ** alpha (GNMT's normalisation, n = words
including END); 0 ranks by log p, which favours short sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsalign.models.generator import CaptionGenerator
from dsalign.text import Vocabulary

NEVER_GENERATED = (Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id)


@dataclass
class Hypothesis:
    """One decoded sentence: word ids (without END) and its log-probability (END included)."""

    tokens: list[int]
    log_prob: float


def _length_norm(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    lengths = lengths.to(torch.float32)
    return ((5.0 + lengths) / 6.0) ** alpha if alpha else torch.ones_like(lengths)


@torch.no_grad()
def beam_search(model: CaptionGenerator, features: torch.Tensor, beam_size: int = 7, max_len: int = 20,
                length_penalty: float = 0.0) -> list[Hypothesis]:
    """The best sentence for each of the vectors ``features`` [B, F] (images or regions)."""
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
    if features.shape[0] == 0:
        return []
    was_training = model.training
    model.eval()
    b, k, device = features.shape[0], beam_size, features.device
    context = model.image_context(features).repeat_interleave(k, 0)
    state = model.initial_state(b * k, device, context.dtype)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam per image at the start; the others are copies that must not be picked
    lengths = torch.zeros(b, k, dtype=torch.long, device=device)
    done = torch.zeros(b, k, dtype=torch.bool, device=device)
    words = torch.full((b * k,), Vocabulary.start_id, dtype=torch.long, device=device)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (source beam, word) [B, k]
    for t in range(max_len + 1):
        logits, state = model.step(words, state, context if t == 0 else None)
        log_p = torch.log_softmax(logits.float(), -1)
        log_p[:, NEVER_GENERATED] = float("-inf")
        if t == max_len:
            log_p[:, : Vocabulary.end_id] = float("-inf")
            log_p[:, Vocabulary.end_id + 1:] = float("-inf")
        log_p = log_p.view(b, k, -1)
        # A finished beam has one continuation, PAD, that keeps its score and length.
        log_p[done] = float("-inf")
        log_p[..., Vocabulary.pad_id] = torch.where(done, 0.0, float("-inf"))
        vocab = log_p.shape[-1]
        candidates = scores[..., None] + log_p
        new_lengths = lengths + (~done).long()
        ranked = candidates / _length_norm(new_lengths, length_penalty)[..., None]
        top = ranked.view(b, -1).topk(k, dim=1).indices
        source, word = top // vocab, top % vocab
        scores = candidates.view(b, -1).gather(1, top)
        lengths = new_lengths.gather(1, source)
        done = done.gather(1, source) | (word == Vocabulary.end_id)
        history.append((source, word))
        flat = (source + torch.arange(b, device=device)[:, None] * k).view(-1)
        state = tuple(s[flat] for s in state)
        words = word.view(-1)
        if bool(done.all()):
            break
    model.train(was_training)
    return _backtrack(history, scores, lengths, length_penalty)


def _backtrack(history: list[tuple[torch.Tensor, torch.Tensor]], scores: torch.Tensor, lengths: torch.Tensor,
               alpha: float) -> list[Hypothesis]:
    """Follow the source pointers back from each image's best final beam (on the host: one copy of the history
    instead of a device sync per word read)."""
    best = (scores / _length_norm(lengths, alpha)).argmax(1).tolist()
    sources = torch.stack([source for source, _ in history]).tolist()  # [step][image][beam]
    chosen = torch.stack([word for _, word in history]).tolist()
    final = scores.tolist()
    results = []
    for image, top in enumerate(best):
        beam, words = top, []
        for step in reversed(range(len(history))):
            words.append(chosen[step][image][beam])
            beam = sources[step][image][beam]
        tokens = [w for w in reversed(words) if w not in (Vocabulary.pad_id, Vocabulary.end_id)]
        results.append(Hypothesis(tokens, float(final[image][top])))
    return results


def greedy_decode(model: CaptionGenerator, features: torch.Tensor, max_len: int = 20) -> list[Hypothesis]:
    """Beam search with one beam: the most probable word at every step."""
    return beam_search(model, features, 1, max_len)
