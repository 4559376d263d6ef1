"""Retrieval corrected for generic sentences and hub images with a bank of training pairs.

A sentence that fits many images ("the ring", "a dog is running") scores high against each of them, so with
plain scores it is ranked first for many image queries, above the sentences written for that image; likewise an
image with many objects matches many sentences and tops many text queries. Bayes' rule ranks sentences for an
image by P(image | sentence), dividing by how well the sentence fits images in general, and images for a
sentence by P(sentence | image) / P(sentence) in the same spirit. Those priors are estimated from a fixed bank
of *training* images and their sentences (never the split being evaluated, so nothing is learned from the test
queries):

    S'[k, l] = S[k, l] - tau_i2t * log sum_b exp(S[b, l] / tau_i2t)     (b: bank images; image->text ranking)
                       - tau_t2i * log sum_m exp(S[k, m] / tau_t2i)     (m: bank sentences; text->image ranking)

an inverted softmax over the bank, as in querybank normalisation (Bogolin et al., CVPR 2022). The first shift
depends on the sentence only and the second on the image only, so each corrects one direction and leaves the
other's rankings unchanged. Temperatures are in score units (small: subtract the best bank score, large: the
mean) and are chosen on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsalign.eval.retrieval import recall_at_k

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DIRECTIONS = ("i2t", "t2i")


@dataclass
class BankScores:
    """Scores of the evaluated pairs and of the bank: sims [n_images, n_sentences], bank_images
    [n_bank_images, n_sentences] (bank images against the evaluated sentences) and bank_sentences
    [n_images, n_bank_sentences] (evaluated images against the bank sentences)."""

    sims: torch.Tensor
    bank_images: torch.Tensor
    bank_sentences: torch.Tensor

    def __post_init__(self) -> None:
        n_images, n_sentences = self.sims.shape
        if self.bank_images.dim() != 2 or self.bank_images.shape[1] != n_sentences or not len(self.bank_images):
            raise ValueError(f"bank image scores {tuple(self.bank_images.shape)} do not cover the {n_sentences} "
                             "sentences")
        if self.bank_sentences.dim() != 2 or self.bank_sentences.shape[0] != n_images or \
                not self.bank_sentences.shape[1]:
            raise ValueError(f"bank sentence scores {tuple(self.bank_sentences.shape)} do not cover the "
                             f"{n_images} images")


def bank_prior(bank: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """tau * log sum exp(bank / tau) along ``dim`` (kept), in float64: the soft maximum subtracted from S."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature * torch.logsumexp(bank.double() / temperature, dim=dim, keepdim=True)


def bank_normalize(scores: BankScores, tau_i2t: float, tau_t2i: float) -> torch.Tensor:
    """S' of the module docstring (float64)."""
    return (scores.sims.double() - bank_prior(scores.bank_images, tau_i2t, dim=0)
            - bank_prior(scores.bank_sentences, tau_t2i, dim=1))


def choose_temperatures(scores: BankScores, captions_per_image: int = 5,
                        temperatures: tuple[float, ...] = TEMPERATURES) -> dict[str, float]:
    """Per direction, the temperature with the best R@1 + R@5 + R@10 on these (validation) scores; ties go to
    the smaller temperature. Returns {"i2t": tau, "t2i": tau}."""
    if not temperatures:
        raise ValueError("no temperatures to choose from")
    sums: dict[str, dict[float, float]] = {d: {} for d in DIRECTIONS}
    for tau in temperatures:  # one matrix scores both directions: each shift leaves the other's ranks alone
        m = recall_at_k(bank_normalize(scores, tau, tau), captions_per_image)
        for d in DIRECTIONS:
            sums[d][float(tau)] = m[f"{d}_r1"] + m[f"{d}_r5"] + m[f"{d}_r10"]
    return {d: max(sums[d], key=lambda tau, d=d: (sums[d][tau], -tau)) for d in DIRECTIONS}


def bank_metrics(scores: BankScores, tau_i2t: float, tau_t2i: float, captions_per_image: int = 5) -> dict:
    """recall_at_k of :func:`bank_normalize`, plus the temperatures and bank sizes used."""
    m = recall_at_k(bank_normalize(scores, tau_i2t, tau_t2i), captions_per_image)
    return {**m, "temperature_i2t": float(tau_i2t), "temperature_t2i": float(tau_t2i),
            "bank_images": float(scores.bank_images.shape[0]),
            "bank_sentences": float(scores.bank_sentences.shape[1])}
