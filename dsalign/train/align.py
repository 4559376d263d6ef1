"""``dsalign train align``: the alignment model trained with DeepSpeed on feature shards.

Each rank embeds its own pairs and the loss uses the all-gather-with-gradient of
:mod:`dsalign.train.distributed`, so N ranks of batch b train exactly like one process of batch N*b. The
engine, resume, logging and checkpoints are the shared loop of :mod:`dsalign.train.loop`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.prepare import VOCAB_NAME
from dsalign.data.shards import shard_paths
from dsalign.models.alignment import AlignmentConfig, AlignmentModel, init_word_embeddings
from dsalign.ops.score import score_matrix
from dsalign.text import Vocabulary
from dsalign.train.config import ConfigError, TrainConfig
from dsalign.train.distributed import alignment_loss
from dsalign.train.loop import RunContext, TrainTask, fit


def pick_captions(tokens: torch.Tensor, token_mask: torch.Tensor, caption_mask: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One real caption per image, uniformly at random: tokens [B, T'], token_mask [B, T'] trimmed to the
    longest chosen caption (the paper trains on image-sentence pairs)."""
    counts = caption_mask.sum(1)
    if (counts == 0).any():
        raise ValueError("an image in the batch has no caption")
    choice = (torch.rand(len(counts), generator=generator) * counts).long().clamp(max=counts - 1)
    rows = torch.arange(len(counts))
    chosen, mask = tokens[rows, choice], token_mask[rows, choice]
    length = max(int(mask.sum(1).max()), 1)
    return chosen[:, :length], mask[:, :length]


class TooFewCaptionsError(ValueError):
    """No image of a split has the fixed number of captions per image that R@K needs."""

    def __init__(self, needed: int, most: int):
        super().__init__(f"no image of the split has {needed} captions (the most any image has: {most})")
        self.needed, self.most = needed, most


@dataclass
class SplitEmbeddings:
    """Region vectors [n_images, R, h] and word vectors [n_images * c, T, h] of a split, padded, with masks, and
    the sentences' token ids [n_images * c, T]; sentence j belongs to image j // c."""

    regions: torch.Tensor
    region_mask: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor
    tokens: torch.Tensor
    skipped_images: int


@torch.no_grad()
def embed_split(model: AlignmentModel, loader: ShardLoader, captions_per_image: int, device: torch.device,
                precision: str = "fp32", max_images: int | None = None) -> SplitEmbeddings:
    """One pass over ``loader``: every image with at least ``captions_per_image`` captions (the others are
    counted in ``skipped_images``, since recall_at_k needs a fixed number per image) and its first
    ``captions_per_image`` captions; stops after ``max_images`` images."""
    was_training = model.training
    model.eval()
    images: list[tuple[torch.Tensor, torch.Tensor]] = []
    words: list[tuple[torch.Tensor, torch.Tensor]] = []
    token_ids: list[tuple[torch.Tensor, torch.Tensor]] = []
    skipped = taken = most = 0
    c = captions_per_image
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for batch in loader:
        counts = batch["caption_mask"].sum(1)
        most = max(most, int(counts.max()))
        enough = counts >= c
        skipped += int((~enough).sum())
        keep = enough if max_images is None else enough & (enough.cumsum(0) <= max_images - taken)
        taken += int(keep.sum())
        if keep.any():
            region_mask = batch["region_mask"][keep].to(device)
            tokens = batch["tokens"][keep][:, :c].flatten(0, 1).to(device)
            token_mask = batch["token_mask"][keep][:, :c].flatten(0, 1).to(device)
            with autocast:
                v = model.encode_images(batch["regions"][keep].to(device), region_mask)
                s = model.encode_sentences(tokens, token_mask)
            images.append((v.float(), region_mask))
            words.append((s.float(), token_mask))
            token_ids.append((tokens.cpu(), token_mask.cpu()))
        if max_images is not None and taken >= max_images:
            break
    model.train(was_training)
    if not images:
        raise TooFewCaptionsError(c, most)
    v, vm = _pad_cat(images)
    s, sm = _pad_cat(words)
    return SplitEmbeddings(v, vm, s, sm, _pad_cat(token_ids)[0], skipped)


def split_scores(embedded: SplitEmbeddings, backend: str | None = None,
                 images: SplitEmbeddings | None = None) -> torch.Tensor:
    """The score matrix [n_images, n_sentences] of ``embedded``'s sentences against its own images, or against
    the images of ``images`` (e.g. a bank of training images)."""
    pictures = images or embedded
    return score_matrix(pictures.regions, pictures.region_mask, embedded.words, embedded.word_mask, backend)


def evaluate_retrieval(model: AlignmentModel, loader: ShardLoader, captions_per_image: int,
                       device: torch.device, backend: str | None = None, precision: str = "fp32") -> dict:
    """R@K / median rank of a full pass over ``loader``: all images against their first
    ``captions_per_image`` captions, scored with ``score_matrix`` (see :func:`embed_split`)."""
    embedded = embed_split(model, loader, captions_per_image, device, precision)
    return retrieval_metrics(embedded, split_scores(embedded, backend).cpu(), captions_per_image)


def retrieval_metrics(embedded: SplitEmbeddings, sims: torch.Tensor, captions_per_image: int) -> dict:
    """recall_at_k of a split's score matrix (with its ``rsum``) as floats, plus ``images`` and
    ``skipped_images``."""
    from dsalign.eval.retrieval import recall_at_k

    result = {k: float(val) for k, val in recall_at_k(sims, captions_per_image=captions_per_image).items()}
    result["images"] = float(embedded.regions.shape[0])
    result["skipped_images"] = float(embedded.skipped_images)
    return result


def _pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenates [n, L, ...] tensors (and their [n, L] masks) padded to the longest L."""
    length = max(x.shape[1] for x, _ in parts)
    trailing = parts[0][0].dim() - 2
    feats = torch.cat([torch.nn.functional.pad(x, (0, 0) * trailing + (0, length - x.shape[1])) for x, _ in parts])
    masks = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for _, m in parts])
    return feats, masks


def train_alignment(config: TrainConfig, resume: bool = False, export_dir: str | Path | None = None,
                    echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) a training run; returns a summary (final step, last val metrics, best rsum).

    Starts the process group if needed and leaves it up (the caller tears it down).
    """
    return fit(config, alignment_task, resume, export_dir, echo)


def alignment_task(ctx: RunContext) -> TrainTask:
    """The alignment model, its training stream, the Eq. 9 loss of a batch and validation R@K."""
    config = ctx.config
    assert isinstance(config, TrainConfig)
    features = config.data.features
    manifest = load_feature_manifest(features)
    vocab = Vocabulary.load(Path(features) / VOCAB_NAME)
    feature_dim = int(manifest["feature_dim"])
    m = config.model
    model_config = AlignmentConfig(vocab_size=len(vocab), feature_dim=feature_dim, embed_dim=m.embed_dim,
                                   word_dim=m.word_dim, hidden_dim=m.hidden_dim, dropout=m.dropout,
                                   freeze_word_embeddings=m.freeze_word_embeddings, word_output=m.word_output,
                                   similarity=m.similarity)
    model = AlignmentModel(model_config)
    if m.word_vectors and not ctx.resuming:
        coverage = init_word_embeddings(model, m.word_vectors, vocab)
        ctx.log.message(f"word vectors {m.word_vectors}: {coverage['found']}/{coverage['words']} vocabulary "
                        f"words ({100 * coverage['coverage']:.1f}%); the rest keep their random init")
    t = config.train
    # float16 as stored: half the bytes through the workers and to the GPU; the model casts to its weights' dtype
    decoder = FeatureSampleDecoder(vocab, config.data.max_len, feature_dim, keep_fp16=True)
    stream = ShardStream(shard_paths(features, config.data.train_split), decoder, collate_features,
                         t.batch_size, mode="train", batches_per_rank=t.batches_per_epoch,
                         shuffle_buffer=config.data.shuffle_buffer,
                         seed=t.seed, rank=ctx.rank, world_size=ctx.world_size)
    device = ctx.device
    # page-locked batches copy to the GPU without blocking the host
    loader = ShardLoader(stream, num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    scale = 1.0 / (t.batch_size * ctx.world_size) if config.loss.reduction == "mean" else 1.0

    loss = config.loss

    def batch_loss(engine: torch.nn.Module, batch: dict, step: int) -> torch.Tensor:
        tokens, token_mask = pick_captions(batch["tokens"], batch["token_mask"], batch["caption_mask"])
        region_mask = batch["region_mask"].to(device, non_blocking=True)
        token_mask = token_mask.to(device, non_blocking=True)
        v, s = engine(batch["regions"].to(device, non_blocking=True), region_mask,
                      tokens.to(device, non_blocking=True), token_mask)
        return alignment_loss(v, region_mask, s, token_mask, loss.margin, loss.hardest_at(step),
                              t.score_backend) * scale

    evaluate = None
    val_split, needed = config.data.val_split, config.data.captions_per_image
    if val_split and t.eval_every > 0:
        val_stream = ShardStream(shard_paths(features, val_split), decoder, collate_features,
                                 config.data.val_batch_size, mode="eval", rank=0, world_size=1)
        # every rank checks (cheap: the manifest and, normally, the first val batch), so all stop together
        require_val_images(manifest, features, val_split)
        check_val_captions(val_stream, val_split, needed)
    if val_split and t.eval_every > 0 and ctx.rank == 0:
        val_loader = ShardLoader(val_stream, num_workers=config.data.num_workers)

        def evaluate(module: torch.nn.Module, step: int) -> dict:
            try:
                return evaluate_retrieval(module, val_loader, needed, device, t.score_backend, ctx.precision)
            except TooFewCaptionsError as exc:
                raise caption_shortage(val_split, needed, exc.most) from exc

    return TrainTask("align", model, vocab, loader, batch_loss,
                     features=feature_info(manifest), evaluate=evaluate, select_key="rsum",
                     describe=describe_retrieval)


def require_val_images(manifest: dict, features: str | Path, split: str) -> None:
    """Validation of a split the feature folder lacks, or one without images, would fail ``eval_every`` steps
    into the run (losing them); the manifest tells before training starts."""
    splits = manifest["splits"]
    if split not in splits:
        raise ConfigError(f"data.val_split {split!r} is not a split of {features} (has: {', '.join(sorted(splits))}); "
                          "set data.val_split to one of them, or null to train without validation")
    if splits[split].get("images") == 0:
        raise ConfigError(f"data.val_split {split!r} of {features} has no images; set data.val_split to another "
                          "split, or null to train without validation")


def check_val_captions(batches: Iterable[dict], split: str, needed: int) -> None:
    """Validation scores the images with at least ``needed`` captions (skipping the others) and fails when there
    is none; read until the first such image (normally in the first batch), so a split without one is refused
    before training instead of ``eval_every`` steps into it."""
    most = 0
    for batch in batches:
        if "caption_mask" in batch:
            most = max(most, int(batch["caption_mask"].sum(1).max()))
            if most >= needed:
                return
    raise caption_shortage(split, needed, most)


def caption_shortage(split: str, needed: int, most: int) -> ConfigError:
    """The one-line error for a validation split without ``needed`` captions per image: the split, the most
    captions found and the key to change."""
    if most == 0:
        return ConfigError(f"data.val_split {split!r} has no usable image; set data.val_split to another "
                           "split, or null to train without validation")
    return ConfigError(f"data.val_split {split!r}: no image has {needed} captions (at most {most}); set "
                       f"data.captions_per_image to {most} or less, or data.val_split to null")


FEATURE_INFO = ("backbone", "feature_dim", "region_source", "top_k", "image_size", "pooling")


def feature_info(manifest: dict) -> dict:
    """What a bundle records about its features: the summary fields and every extraction setting, so
    :func:`dsalign.load` can compute the same features from raw images."""
    return {**{k: manifest.get(k) for k in FEATURE_INFO}, "settings": manifest.get("settings") or {}}


def describe_retrieval(m: dict) -> str:
    return (f"R@1/5/10 i2t {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} t2i {m['t2i_r1']:.1f}/"
            f"{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} rsum {m['rsum']:.1f}")
