"""Portable inference bundles (the alignment model, a caption generator): safetensors weights + JSON config +
vocab.json.

Nothing in a bundle is pickled, so loading one never runs code. ``config.json`` records the SHA-256 of the
other two files; a tampered, truncated or mismatched bundle fails with a :class:`BundleError` that says which
file is wrong. Bundles are written into a temporary folder and renamed into place, so a reader never sees a
half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsalign.data.feature_pipeline import load_feature_manifest
from dsalign.hashing import file_sha256
from dsalign.models.alignment import AlignmentConfig, AlignmentModel
from dsalign.models.generator import CaptionGenerator, GeneratorConfig
from dsalign.text import Vocabulary

ALIGNMENT_FORMAT = "dsalign-alignment-bundle/1"
CAPTION_FORMAT = "dsalign-caption-bundle/1"
_KINDS: dict[str, tuple[type, type]] = {  # format -> (config class, model class)
    ALIGNMENT_FORMAT: (AlignmentConfig, AlignmentModel),
    CAPTION_FORMAT: (GeneratorConfig, CaptionGenerator),
}
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
log = logging.getLogger(__name__)


class BundleError(ValueError):
    """A bundle that cannot be trusted or used."""


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode, its vocabulary, and what produced its features (``info`` holds
    the training step and metrics; a caption bundle also its ``level``, full or region)."""

    model: torch.nn.Module
    vocab: Vocabulary
    config: AlignmentConfig | GeneratorConfig
    features: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    format: str = ALIGNMENT_FORMAT
    sha256: dict = field(default_factory=dict)  # of the weights and vocabulary files: the bundle's identity
    path: Path | None = None  # the folder it was loaded from (where a retrieval bank may sit beside it)

    @property
    def weights_sha256(self) -> str:
        """The weights' SHA-256: what outputs made with this model (snippets, a retrieval bank) record."""
        return self.sha256.get(WEIGHTS, "")


def export_bundle(model: AlignmentModel, vocab: Vocabulary, out_dir: str | Path, features: dict | None = None,
                  info: dict | None = None) -> Path:
    """Write a bundle to ``out_dir`` (replacing one that is there).

    ``features`` describes the CNN/region source the model expects (from the feature manifest), ``info``
    anything worth keeping (step, val recall).
    """
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    vocab.save(tmp / VOCAB)
    config = {
        "format": CAPTION_FORMAT if isinstance(model, CaptionGenerator) else ALIGNMENT_FORMAT,
        "model": model.config.to_dict(),
        "features": features or {},
        "info": info or {},
        "sha256": {WEIGHTS: file_sha256(tmp / WEIGHTS), VOCAB: file_sha256(tmp / VOCAB)},
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    old = out.with_name(f".old-{out.name}")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_alignment_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """The alignment bundle at ``path`` or inside the folder of bundles ``path`` (BundleError otherwise)."""
    return find_bundle(path, ALIGNMENT_FORMAT, device=device)


def load_caption_bundle(path: str | Path, device: str | torch.device = "cpu", level: str | None = None) -> Bundle:
    """The caption bundle at ``path`` or, of ``level`` (full or region), inside the folder of bundles ``path``."""
    return find_bundle(path, CAPTION_FORMAT, level, device)


def load_bundles(path: str | Path, device: str | torch.device = "cpu") -> list[Bundle]:
    """The bundle at ``path``, or every bundle in the sub-folders of ``path`` (a model folder)."""
    root = Path(path)
    if (root / CONFIG).is_file():
        return [load_bundle(root, device)]
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle or folder of bundles")
    found = [load_bundle(sub, device) for sub in sorted(root.iterdir()) if (sub / CONFIG).is_file()]
    if not found:
        raise BundleError(f"{root}: not a dsalign bundle and holds none (no {CONFIG} in it or its sub-folders)")
    return found


def bundles_by_role(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Bundle]:
    """The bundles at or inside ``path`` keyed by role (``alignment``, ``full``, ``region``); a folder with two
    bundles of one role is refused, since nothing says which one was meant."""
    roles: dict[str, Bundle] = {}
    for bundle in load_bundles(path, device):
        role = "alignment" if bundle.format == ALIGNMENT_FORMAT else bundle.info.get("level", "full")
        if role in roles:
            raise BundleError(f"{path}: holds more than one {role} bundle; point at one of them or a folder "
                              "with one of each kind")
        roles[role] = bundle
    return roles


def find_bundle(path: str | Path, kind: str, level: str | None = None,
                device: str | torch.device = "cpu") -> Bundle:
    """The one bundle of format ``kind`` (and caption ``level``) at or inside ``path``."""
    matches = [b for b in load_bundles(path, device)
               if b.format == kind and (level is None or b.info.get("level", "full") == level)]
    if len(matches) != 1:
        what = f"{kind}{f' (level {level})' if level else ''}"
        raise BundleError(f"{path}: {'no' if not matches else 'more than one'} {what} bundle")
    return matches[0]


def load_bundle(path: str | Path, device: str | torch.device = "cpu", expect: str | None = None) -> Bundle:
    """Load and validate a bundle of any kind (or only ``expect``); BundleError names the file and the problem."""
    root = Path(path)
    if not (root / CONFIG).is_file():
        raise BundleError(f"{root}: not a dsalign bundle (no {CONFIG})")
    try:
        config = json.loads((root / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{root / CONFIG}: unreadable: {exc}") from exc
    kind = config.get("format") if isinstance(config, dict) else None
    if kind not in _KINDS or (expect is not None and kind != expect):
        raise BundleError(f"{root / CONFIG}: not a {expect or ' or '.join(_KINDS)} bundle (format {kind!r})")
    config_cls, model_cls = _KINDS[kind]
    hashes = config.get("sha256")
    if not isinstance(hashes, dict):
        raise BundleError(f"{root / CONFIG}: no 'sha256' table")
    for name in (WEIGHTS, VOCAB):
        file = root / name
        if not file.is_file():
            raise BundleError(f"{root}: missing {name}")
        if file_sha256(file) != hashes.get(name):
            raise BundleError(f"{file}: contents do not match the SHA-256 in {CONFIG} (truncated or altered)")
    try:
        model_config = config_cls.from_dict(config.get("model") or {})
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{root / CONFIG}: bad model config: {exc}") from exc
    try:
        vocab = Vocabulary.load(root / VOCAB)
    except ValueError as exc:
        raise BundleError(f"{root / VOCAB}: {exc}") from exc
    if len(vocab) != model_config.vocab_size:
        raise BundleError(f"{root}: vocab.json has {len(vocab)} words but the model expects "
                          f"{model_config.vocab_size}")
    try:
        state = load_file(str(root / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{root / WEIGHTS}: unreadable: {exc}") from exc
    model = model_cls(model_config)
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise BundleError(f"{root / WEIGHTS}: tensors do not match the model (missing {missing}, extra {extra})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise BundleError(f"{root / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise BundleError(f"{root / WEIGHTS}: {name} holds non-finite values")
    model.load_state_dict(state)
    model.to(device).eval()
    return Bundle(model, vocab, model_config, config.get("features") or {}, config.get("info") or {}, kind, hashes,
                  root)


def _geometry(settings: dict) -> str:
    return " (box geometry)" if settings.get("box_geometry") else ""


def check_feature_folder(bundles: Iterable[Bundle], folder: str | Path) -> None:
    """Refuse a feature folder of another width than a bundle was trained on (torch would fail deep inside
    with a matrix shape error) and warn, once per difference and in one line, when its other extractor
    settings differ from a bundle's record: such features still fit the model, but its scores mean less."""
    manifest = load_feature_manifest(folder)
    made, dim = manifest.get("settings") or {}, manifest.get("feature_dim")
    differences: list[str] = []
    for bundle in bundles:
        trained, expected = bundle.features.get("settings") or {}, bundle.config.feature_dim
        if dim is not None and dim != expected:
            raise BundleError(f"features in {folder} are {dim}-d{_geometry(made)}; the bundle was trained on "
                              f"{expected}-d features{_geometry(trained)}")
        changed = sorted(k for k in made.keys() | trained.keys()
                         if k != "feature_dim" and made.get(k) != trained.get(k))
        line = ", ".join(f"{k} {made.get(k)} (bundle: {trained.get(k)})" for k in changed) if trained else ""
        if line and line not in differences:
            differences.append(line)
    for line in differences:
        log.warning("warning: features in %s were made with other settings than the bundle's: %s", folder, line)
