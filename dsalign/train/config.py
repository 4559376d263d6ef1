"""Training configs (alignment, caption generator): JSON files of sections, validated strictly.

Unknown keys, wrong types and impossible values raise one :class:`ConfigError` that names the key
(``train.batch_size must be an integer >= 1, got -3``), before anything expensive starts. Relative paths are
relative to the working directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dsalign.models.alignment import SIMILARITIES, WORD_OUTPUTS
from dsalign.models.generator import CELLS
from dsalign.models.losses import REDUCTIONS
from dsalign.ops.score import BACKENDS


class ConfigError(ValueError):
    """A config problem; the message names the offending key."""


def _spec(minimum: float | None = None, maximum: float | None = None, choices: tuple | None = None,
          above: float | None = None) -> dict:
    return {"min": minimum, "max": maximum, "choices": choices, "above": above}


@dataclass
class DataConfig:
    """Where the feature shards are and how they are read."""

    features: str = field(default="", metadata=_spec())
    train_split: str = "train"
    val_split: str | None = "val"
    num_workers: int = field(default=0, metadata=_spec(0))
    shuffle_buffer: int = field(default=1000, metadata=_spec(1))
    max_len: int | None = field(default=None, metadata=_spec(1))
    captions_per_image: int = field(default=5, metadata=_spec(1))
    val_batch_size: int = field(default=100, metadata=_spec(1))


@dataclass
class ModelConfig:
    """Model sizes (see :class:`dsalign.models.alignment.AlignmentConfig`) and the word-vector file."""

    embed_dim: int = field(default=256, metadata=_spec(1))
    word_dim: int = field(default=300, metadata=_spec(1))
    hidden_dim: int = field(default=256, metadata=_spec(1))
    dropout: float = field(default=0.2, metadata=_spec(0.0, 0.99))
    freeze_word_embeddings: bool = False
    word_vectors: str | None = None
    word_output: str = field(default="relu", metadata=_spec(choices=WORD_OUTPUTS))
    similarity: str = field(default="dot", metadata=_spec(choices=SIMILARITIES))


@dataclass
class LossConfig:
    """Eq. 9: margin (paper: 1), sum over negatives or the hardest one (VSE++), sum or mean over pairs.

    hardest_negative_after: with hardest_negative, the number of first steps that still sum over all negatives
    (a warm-up: the hardest-negative loss from random weights can collapse every word vector to zero).
    """

    margin: float = field(default=1.0, metadata=_spec(0.0))
    hardest_negative: bool = False
    hardest_negative_after: int = field(default=0, metadata=_spec(0))
    reduction: str = field(default="sum", metadata=_spec(choices=REDUCTIONS))

    def hardest_at(self, step: int) -> bool:
        """Whether the loss after ``step`` optimizer steps takes the hardest negative only."""
        return self.hardest_negative and step >= self.hardest_negative_after


@dataclass
class OptimConfig:
    """A torch optimizer handed to DeepSpeed (a config optimizer would build fused ops for minutes on CPU).

    grad_clip_norm is the global 2-norm clip (0 = off; the loop's at ZeRO 0, DeepSpeed's at ZeRO 1/2); the paper
    clipped elementwise at 5. momentum is used by sgd and rmsprop.

    The learning rate is a function of the step alone (so ``--resume`` continues it exactly): a linear warm-up
    over ``warmup_steps``, then ``schedule`` constant; step (times ``decay_factor`` every ``decay_every``
    steps); or cosine (a half cosine from ``lr`` down to ``lr * decay_factor`` at ``train.max_steps``).
    """

    name: str = field(default="adam", metadata=_spec(choices=("adam", "adamw", "sgd", "rmsprop")))
    lr: float = field(default=2e-4, metadata=_spec(above=0.0))
    weight_decay: float = field(default=0.0, metadata=_spec(0.0))
    momentum: float = field(default=0.9, metadata=_spec(0.0, 1.0))
    grad_clip_norm: float = field(default=5.0, metadata=_spec(0.0))
    schedule: str = field(default="constant", metadata=_spec(choices=("constant", "step", "cosine")))
    warmup_steps: int = field(default=0, metadata=_spec(0))
    decay_every: int = field(default=1000, metadata=_spec(1))
    decay_factor: float = field(default=0.1, metadata=_spec(0.0, 1.0))

    def lr_at(self, step: int, max_steps: int) -> float:
        """The learning rate of the optimizer step that follows ``step`` steps already taken."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "step":
            return self.lr * self.decay_factor ** (step // self.decay_every)
        if self.schedule == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps))
            return self.lr * (self.decay_factor + (1 - self.decay_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.lr


@dataclass
class TrainLoopConfig:
    """Steps, batches and the run folder. batch_size is per rank; the global batch is batch_size x ranks."""

    out_dir: str = field(default="runs/align", metadata=_spec())
    batch_size: int = field(default=100, metadata=_spec(1))
    batches_per_epoch: int = field(default=100, metadata=_spec(1))
    max_steps: int = field(default=1000, metadata=_spec(1))
    seed: int = 0
    log_every: int = field(default=10, metadata=_spec(1))
    eval_every: int = field(default=200, metadata=_spec(0))
    checkpoint_every: int = field(default=200, metadata=_spec(0))
    keep_checkpoints: int = field(default=3, metadata=_spec(1))
    score_backend: str | None = field(default=None, metadata=_spec(choices=BACKENDS))
    threads: int | None = field(default=None, metadata=_spec(1))
    device: str = field(default="auto", metadata=_spec())


@dataclass
class DistributedConfig:
    """DeepSpeed engine settings. precision auto = bf16 autocast on CUDA, fp32 on CPU.

    deepspeed_config: an optional DeepSpeed JSON (e.g. launch/ds_zero2_cpu.json) whose batch sizes and
    gradient clipping are overwritten from this config, so the two can never disagree.
    """

    zero_stage: int = field(default=0, metadata=_spec(0, 2))
    precision: str = field(default="auto", metadata=_spec(choices=("auto", "fp32", "bf16")))
    deepspeed_config: str | None = None
    timeout_s: float = field(default=600.0, metadata=_spec(above=0.0))
    shm_comm: bool = False


@dataclass
class RunConfig:
    """The sections every training run has; each model adds its own data/model sections."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """``dsalign train align``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class CaptionDataConfig:
    """Training data of the generator. level full: whole-image vectors (region 0 of the feature shards) and
    every caption; level region: the region-snippet shards of ``dsalign align`` (``snippets``). Validation
    always reads the feature shards' ``val_split`` (full: caption metrics against the image's captions;
    region: against the ground-truth mention phrases of each box, where the data has them). At the region level
    ``train_split`` names the split of the snippet folder."""

    features: str = field(default="", metadata=_spec())
    level: str = field(default="full", metadata=_spec(choices=("full", "region")))
    snippets: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    val_images: int | None = field(default=None, metadata=_spec(1))
    num_workers: int = field(default=0, metadata=_spec(0))
    shuffle_buffer: int = field(default=1000, metadata=_spec(1))
    max_len: int | None = field(default=None, metadata=_spec(1))
    val_batch_size: int = field(default=100, metadata=_spec(1))


@dataclass
class GeneratorModelConfig:
    """See :class:`dsalign.models.generator.GeneratorConfig`: cell rnn is the paper's ReLU RNN."""

    cell: str = field(default="lstm", metadata=_spec(choices=CELLS))
    word_dim: int = field(default=256, metadata=_spec(1))
    hidden_dim: int = field(default=512, metadata=_spec(1))
    dropout: float = field(default=0.5, metadata=_spec(0.0, 0.99))


@dataclass
class DecodeConfig:
    """How validation captions are decoded (beam_size 1 = greedy)."""

    beam_size: int = field(default=3, metadata=_spec(1))
    max_len: int = field(default=20, metadata=_spec(1))
    length_penalty: float = field(default=0.0, metadata=_spec(0.0))


@dataclass
class CaptionTrainConfig(RunConfig):
    """``dsalign train caption``. train.batch_size counts samples: images at the full level (each with all its
    captions, about 5 sentences), region-snippet pairs at the region level."""

    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(out_dir="runs/caption"))
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def _type_name(kind: object) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _check_value(key: str, value: object, annotation: object, spec: dict) -> object:
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    kind = next(a for a in args if a is not type(None)) if optional else annotation
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)  # type: ignore[arg-type]
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(kind)}{' or null' if optional else ''}, got {value!r}")
    if spec.get("choices") is not None and value not in spec["choices"]:
        raise ConfigError(f"{key} must be one of {list(spec['choices'])}, got {value!r}")
    low, high, above = spec.get("min"), spec.get("max"), spec.get("above")
    if (low is not None and value < low) or (high is not None and value > high) or \
            (above is not None and value <= above):
        bounds = f"> {above}" if above is not None else f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key} must be {bounds}, got {value!r}")
    return value


def _build(cls: type, data: object, prefix: str, base: object | None = None) -> object:
    """``cls`` from the JSON object ``data``; keys it lacks keep ``base``'s values (the enclosing config's
    default for this section, e.g. the caption trainer's own ``train.out_dir``), else the class defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]}{where} "
                          f"(known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            factory = fields[name].default_factory
            values[name] = _build(hints[name], value, key, None if factory is dataclasses.MISSING else factory())
        else:
            values[name] = _check_value(key, value, hints[name], dict(fields[name].metadata))
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def parse_config(data: object, kind: type[RunConfig] = TrainConfig) -> RunConfig:
    """Validate a decoded JSON document into a ``kind`` (:class:`TrainConfig` or :class:`CaptionTrainConfig`)."""
    config = _build(kind, data, "")
    assert isinstance(config, kind)
    if not config.data.features:  # type: ignore[attr-defined]
        raise ConfigError("data.features is required: a folder written by `dsalign features`")
    if isinstance(config, CaptionTrainConfig) and config.data.level == "region" and not config.data.snippets:
        raise ConfigError("data.snippets is required when data.level is region: a folder written by "
                          "`dsalign align`")
    if not config.train.out_dir:
        raise ConfigError("train.out_dir must not be empty")
    return config


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``section.key=value`` in place; the value is JSON when it parses as JSON, else a string."""
    key, sep, raw = assignment.partition("=")
    parts = key.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]} must be a JSON object")
    section[parts[1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                kind: type[RunConfig] = TrainConfig) -> RunConfig:
    """Read, override and validate a config file; every problem is one ConfigError."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a JSON object")
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data, kind)
