"""A retrieval bank saved beside an alignment bundle, so that the Python API ranks with bank-normalised scores.

``dsalign eval --bank-images N --save-bank`` measures bank-normalised retrieval (:mod:`dsalign.eval.bank_norm`)
and keeps what the correction needs at inference: the region vectors of the N bank images, the token ids of
their captions and the two temperatures chosen on val. ``bank.safetensors`` holds the tensors (region vectors
in fp16), ``bank.json`` the temperatures, the sizes and the SHA-256 of the bundle weights the vectors came
from and of ``bank.safetensors``: a bank left beside retrained weights, or altered, is refused on load, never
used silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsalign.bundle import Bundle, BundleError
from dsalign.eval.bank_norm import bank_prior
from dsalign.hashing import file_sha256
from dsalign.models.alignment import AlignmentModel
from dsalign.ops.score import score_matrix

BANK_TENSORS = "bank.safetensors"
BANK_META = "bank.json"
BANK_FORMAT = "dsalign-retrieval-bank/1"


@dataclass
class RetrievalBank:
    """Bank images' region vectors [N, R, h] and their captions' token ids [M, T], with masks, and the
    temperatures of the two directions (see :func:`dsalign.eval.bank_norm.bank_normalize`)."""

    regions: torch.Tensor
    region_mask: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    tau_i2t: float
    tau_t2i: float
    _words: torch.Tensor | None = field(default=None, repr=False)
    _regions_like_words: torch.Tensor | None = field(default=None, repr=False)

    def sentence_prior(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """[n_sentences]: how well each sentence fits the bank images (subtracted when ranking sentences)."""
        regions = self._regions_like_words
        if regions is None or (regions.device, regions.dtype) != (words.device, words.dtype):
            # kept: the bank (20 MB at 1,000 images) is not copied to the GPU and widened again at every call
            regions = self._regions_like_words = self.regions.to(words)
        scores = score_matrix(regions, self.region_mask.to(words.device), words, word_mask)
        return bank_prior(scores.cpu(), self.tau_i2t, dim=0)[0].float()

    @torch.no_grad()
    def image_prior(self, model: AlignmentModel, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """[n_images]: how well each image fits the bank captions (subtracted when ranking images)."""
        if self._words is None:  # the captions are kept as tokens: their vectors are computed once, here
            device = regions.device
            self._words = model.encode_sentences(self.tokens.to(device), self.token_mask.to(device))
        scores = score_matrix(regions, region_mask, self._words.to(regions), self.token_mask.to(regions.device))
        return bank_prior(scores.cpu(), self.tau_t2i, dim=1)[:, 0].float()


def save_bank(bundle: Bundle, regions: torch.Tensor, region_mask: torch.Tensor, tokens: torch.Tensor,
              token_mask: torch.Tensor, temperatures: dict[str, float]) -> Path:
    """Write ``bank.safetensors`` and ``bank.json`` into the (loaded-from-disk) alignment bundle's folder."""
    if bundle.path is None:
        raise BundleError("this bundle was not loaded from a folder; there is nowhere to save its bank")
    tensors = {"regions": regions.detach().to("cpu", torch.float16).contiguous(),
               "region_mask": region_mask.cpu().bool().contiguous(),
               "tokens": tokens.cpu().to(torch.int32).contiguous(),
               "token_mask": token_mask.cpu().bool().contiguous()}
    save_file(tensors, str(bundle.path / BANK_TENSORS))
    meta = {"format": BANK_FORMAT, "temperature_i2t": float(temperatures["i2t"]),
            "temperature_t2i": float(temperatures["t2i"]), "images": int(regions.shape[0]),
            "sentences": int(tokens.shape[0]), "weights_sha256": bundle.weights_sha256,
            "sha256": file_sha256(bundle.path / BANK_TENSORS)}
    (bundle.path / BANK_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return bundle.path / BANK_META


def load_bank(bundle: Bundle) -> RetrievalBank | None:
    """The bank saved beside ``bundle``, None if there is none; BundleError if it cannot be trusted."""
    if bundle.path is None or not (bundle.path / BANK_META).is_file():
        return None
    meta_file, tensor_file = bundle.path / BANK_META, bundle.path / BANK_TENSORS
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_file}: unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        raise BundleError(f"{meta_file}: not a {BANK_FORMAT} file")
    if meta.get("weights_sha256") != bundle.weights_sha256:
        raise BundleError(f"{meta_file}: made with other weights than this bundle's; make it again with "
                          "`dsalign eval --bank-images N --save-bank` or delete it")
    if not tensor_file.is_file() or file_sha256(tensor_file) != meta.get("sha256"):
        raise BundleError(f"{tensor_file}: missing, or its contents do not match the SHA-256 in {BANK_META}")
    try:
        t = load_file(str(tensor_file))
        return RetrievalBank(t["regions"].float(), t["region_mask"], t["tokens"].long(), t["token_mask"],
                             float(meta["temperature_i2t"]), float(meta["temperature_t2i"]))
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{tensor_file}: unusable bank: {exc}") from exc
