"""``dsalign train caption``: the multimodal RNN generator (paper Sec. 3.2) trained with DeepSpeed.

``data.level full`` trains on whole-image vectors and their captions; ``data.level region`` on the
region-snippet pairs that ``dsalign align`` inferred. The loss is the mean cross-entropy per target word (END
included); with N ranks each rank contributes its mean / N. The output bias starts at the log word
frequencies of the training sentences. Validation decodes the val split (beam search) and keeps the best model
by CIDEr (full) or by region description accuracy (region: ``attribute_match`` where boxes carry attributes,
else ``exact_match``; needs ground-truth mention spans in the val split, else there is no validation and the
final model is exported).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from dsalign.data.caption_pipeline import SnippetDecoder, WholeImageDecoder, collate_sentences
from dsalign.data.feature_pipeline import load_feature_manifest
from dsalign.data.manifest import MANIFEST_NAME, load_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.prepare import VOCAB_NAME
from dsalign.data.shards import iter_tar_samples, shard_paths
from dsalign.eval.generation import (
    DecodeSettings,
    evaluate_full_captions,
    evaluate_region_descriptions,
    region_targets,
)
from dsalign.hashing import file_sha256
from dsalign.models.generator import CaptionGenerator, GeneratorConfig, teacher_forced_loss
from dsalign.text import Vocabulary
from dsalign.train.align import feature_info, require_val_images
from dsalign.train.config import CaptionTrainConfig, ConfigError
from dsalign.train.loop import RunContext, TrainTask, fit


def train_caption(config: CaptionTrainConfig, resume: bool = False, export_dir: str | Path | None = None,
                  echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) a generator training run; returns a summary (final step, last val metrics, best value).

    Starts the process group if needed and leaves it up (the caller tears it down).
    """
    return fit(config, caption_task, resume, export_dir, echo)


def word_counts(vocab: Vocabulary, sentences: int, snippet_folder: str | Path | None = None,
                split: str = "train") -> torch.Tensor:
    """Training counts per vocabulary id for the output-bias init: the vocabulary's own counts (full captions)
    or a pass over the snippet shards' words (region level); END once per sentence."""
    counts = torch.zeros(len(vocab), dtype=torch.float64)
    if snippet_folder is None:
        for word, count in vocab.counts.items():
            if word in vocab:
                counts[vocab.stoi[word]] = count
    else:
        tally: Counter = Counter()
        for url in shard_paths(snippet_folder, split):
            for _, members in iter_tar_samples(url):
                tally.update(vocab.encode(json.loads(members["json"]).get("tokens", [])))
        for index, count in tally.items():
            counts[index] = count
    counts[Vocabulary.end_id] = sentences
    return counts


def caption_task(ctx: RunContext) -> TrainTask:
    """The generator, its training stream, the teacher-forced loss of a batch and validation by decoding."""
    config = ctx.config
    assert isinstance(config, CaptionTrainConfig)
    d, t = config.data, config.train
    manifest = load_feature_manifest(d.features)
    vocab = Vocabulary.load(Path(d.features) / VOCAB_NAME)
    feature_dim = int(manifest["feature_dim"])
    m = config.model
    model = CaptionGenerator(GeneratorConfig(vocab_size=len(vocab), feature_dim=feature_dim, cell=m.cell,
                                             word_dim=m.word_dim, hidden_dim=m.hidden_dim, dropout=m.dropout))
    if d.level == "full":
        decoder = WholeImageDecoder(vocab, d.max_len, feature_dim)
        urls = shard_paths(d.features, d.train_split)
        sentences = int(manifest["splits"][d.train_split].get("captions", 0))
    else:
        assert d.snippets is not None
        snippets = load_snippet_manifest(d.snippets, d.features, feature_dim, vocab, ctx.log.message)
        decoder = SnippetDecoder(vocab, d.max_len, feature_dim)
        urls = shard_paths(d.snippets, d.train_split)
        sentences = int(snippets["splits"][d.train_split].get("snippets", 0))
    if not ctx.resuming:
        model.init_output_bias(word_counts(vocab, sentences, d.snippets if d.level == "region" else None,
                                           d.train_split))
    stream = ShardStream(urls, decoder, collate_sentences, t.batch_size, mode="train",
                         batches_per_rank=t.batches_per_epoch, shuffle_buffer=d.shuffle_buffer, seed=t.seed,
                         rank=ctx.rank, world_size=ctx.world_size)
    device, world_size = ctx.device, ctx.world_size
    loader = ShardLoader(stream, num_workers=d.num_workers, pin_memory=device.type == "cuda")

    def batch_loss(engine: torch.nn.Module, batch: dict, step: int) -> torch.Tensor:
        features, tokens, token_mask = (batch[k].to(device, non_blocking=True)
                                        for k in ("features", "tokens", "token_mask"))
        total, n = teacher_forced_loss(engine, features, tokens, token_mask)
        return total / max(n, 1) / world_size

    settings = DecodeSettings(config.decode.beam_size, config.decode.max_len, config.decode.length_penalty)
    evaluate, select_key = None, ""
    if d.val_split and t.eval_every > 0:  # on every rank, so that all stop together
        require_val_images(manifest, d.features, d.val_split)
    validates = bool(d.val_split) and t.eval_every > 0 and ctx.rank == 0
    probe = region_targets(d.features, d.val_split, vocab, limit=50)[0] if validates and d.level == "region" else []
    if validates and d.level == "region" and not probe:
        ctx.log.message(f"caption: val split {d.val_split!r} has no ground-truth mention spans: no validation, "
                        "the final model is exported")
    elif validates:
        # region level: correctness in any wording where the boxes carry attributes (shapes), else word for word
        select_key = "CIDEr" if d.level == "full" else \
            "attribute_match" if all(target.attributes for target in probe) else "exact_match"

        def evaluate(module: torch.nn.Module, step: int) -> dict:
            run = evaluate_full_captions if d.level == "full" else evaluate_region_descriptions
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.precision == "bf16"):
                result = run(module, vocab, d.features, d.val_split, settings, limit=d.val_images,
                             batch_size=d.val_batch_size)
            return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}

    return TrainTask("caption", model, vocab, loader, batch_loss,
                     features=feature_info(manifest), info={"level": d.level},
                     evaluate=evaluate, select_key=select_key, describe=describe_caption_metrics)


def load_snippet_manifest(snippets: str, features: str, feature_dim: int, vocab: Vocabulary,
                          note: Callable[[str], None]) -> dict:
    """``data.snippets``'s manifest, refused up front unless it is a snippet folder made from features this run
    can use: region vectors of another size would be skipped one by one, and words that ``vocab`` lacks would
    silently train as <unk>."""
    manifest = load_manifest(snippets) if (Path(snippets) / MANIFEST_NAME).is_file() else {}
    if manifest.get("kind") != "snippets":
        raise ConfigError(f"data.snippets {snippets} is not a snippet folder: no {MANIFEST_NAME} from `dsalign align`")
    if manifest.get("feature_dim") != feature_dim:
        raise ConfigError(f"data.snippets {snippets} holds {manifest.get('feature_dim')}-d region vectors, "
                          f"data.features {features} {feature_dim}-d: make the snippets from data.features "
                          "with `dsalign align`")
    if manifest.get("vocab_sha256") == file_sha256(Path(features) / VOCAB_NAME):
        return manifest  # made from a copy of this very vocabulary, wherever its feature folder is now
    source = (manifest.get("settings") or {}).get("features")
    unknown = _unknown_words(Path(source), vocab) if source else None
    if unknown is None and manifest.get("vocab_sha256"):  # recorded, and not this vocabulary's
        raise ConfigError(f"data.snippets {snippets} was made from features with another vocabulary than "
                          f"data.features {features} (vocab.json SHA-256 differs; its folder {source} is gone): "
                          "make the snippets from data.features with `dsalign align`")
    if unknown is None:
        note(f"caption: cannot check the vocabulary of data.snippets {snippets}: the feature folder it records "
             f"({source}) has no vocab.json any more")
    elif unknown:
        raise ConfigError(f"data.snippets {snippets} was made from the features in {source}, whose vocabulary has "
                          f"{len(unknown)} words that data.features {features} lacks (e.g. {unknown[0]!r}; they "
                          "would train as <unk>): make the snippets from data.features with `dsalign align`")
    return manifest


def _unknown_words(source: Path, vocab: Vocabulary) -> list[str] | None:
    """The words of ``source``'s vocabulary that ``vocab`` lacks (snippet words are stored as text and encoded
    with ``vocab``, so only missing words matter, not ids); None when ``source`` has no vocabulary any more
    (folders move: the snippets record the path they were made from)."""
    path = source / VOCAB_NAME
    if not path.is_file():
        return None
    return [word for word in Vocabulary.load(path).itos if word not in vocab.stoi]


def describe_caption_metrics(m: dict) -> str:
    keys = [k for k in ("attribute_match", "exact_match", "BLEU-1", "BLEU-4", "CIDEr") if k in m]
    return ", ".join(f"{k} {100 * m[k]:.1f}" for k in keys)
