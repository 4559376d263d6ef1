"""``dsalign train align``: the alignment model trained with DeepSpeed on feature shards.

One code path for one process, ``torchrun`` and the ``deepspeed`` launcher: the engine runs ZeRO 0-2 (fp32 on
CPU with gloo; bf16 autocast with fp32 master weights on CUDA), each rank embeds its own pairs and the loss
uses the all-gather-with-gradient of :mod:`dsalign.train.distributed`, so N ranks of batch b train exactly
like one process of batch N*b.

Determinism and resume: the RNG is reseeded at every step from (seed, step, rank) (caption choice and
dropout), the data position is (epoch, batch-in-epoch) = divmod(step, batches_per_epoch), and the training
stream is a pure function of (seed, epoch, rank, worker). Resuming sets the epoch, skips the consumed
batches and reloads weights and optimizer state, so an interrupted run ends where an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dsalign.bundle import export_bundle
from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features, load_feature_manifest
from dsalign.data.pipeline import ShardLoader, ShardStream
from dsalign.data.shards import shard_paths
from dsalign.models.alignment import AlignmentConfig, AlignmentModel, init_word_embeddings
from dsalign.ops.score import score_matrix
from dsalign.text import Vocabulary
from dsalign.train import checkpoint as ckpt
from dsalign.train.config import ConfigError, TrainConfig
from dsalign.train.distributed import alignment_loss

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
BEST_DIR = "best"


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one rank, independent of everything that ran before."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_distributed(config: TrainConfig, device: torch.device) -> tuple[int, int]:
    """Start the process group (a world of one without a launcher) the way DeepSpeed expects it."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=config.distributed.timeout_s)
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        if not dist.is_initialized():
            # A world of one needs no rendezvous: an in-process store cannot lose a race for a TCP port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if not config.distributed.shm_comm:
        # DeepSpeed compiles a shared-memory all-reduce for CPU on first use (~60 s); gloo alone is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _device(config: TrainConfig) -> torch.device:
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
    return device


def _precision(config: TrainConfig, device: torch.device) -> str:
    precision = config.distributed.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("distributed.precision bf16 needs a CUDA device (CPU training runs in fp32)")
    return precision


def deepspeed_config(config: TrainConfig, world_size: int, precision: str) -> dict:
    """The DeepSpeed config: the optional JSON file, with batch sizes, clipping and precision from ours."""
    ds: dict = {}
    if config.distributed.deepspeed_config:
        path = Path(config.distributed.deepspeed_config)
        try:
            ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"distributed.deepspeed_config: cannot read {path}: {exc}") from exc
        if not isinstance(ds, dict):
            raise ConfigError(f"distributed.deepspeed_config: {path} is not a JSON object")
        for key in ("fp16", "bf16"):
            if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
                raise ConfigError(f"distributed.deepspeed_config: {path} enables '{key}'; use "
                                  "distributed.precision=bf16 (autocast, fp32 master weights) instead")
        if "optimizer" in ds or "scheduler" in ds:
            raise ConfigError(f"distributed.deepspeed_config: {path} sets an optimizer/scheduler; the trainer "
                              "passes a torch optimizer (set optim.* instead)")
    zero = dict(ds.get("zero_optimization") or {})
    zero.setdefault("stage", config.distributed.zero_stage)
    ds.update({
        "train_micro_batch_size_per_gpu": config.train.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.train.batch_size * world_size,
        "gradient_clipping": config.optim.grad_clip_norm,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        # ZeRO 1/2 refuse optimizers DeepSpeed did not write unless told; torch's are elementwise and safe.
        "zero_allow_untested_optimizer": True,
    })
    # Autocast keeps fp32 master weights in the module, so checkpoints (and resume) stay exact.
    ds["torch_autocast"] = {"enabled": precision == "bf16", "dtype": "bfloat16"}
    return ds


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def _base_optimizer(engine: object) -> torch.optim.Optimizer:
    """The torch optimizer whose state is this rank's (ZeRO 1/2 wrap it around the rank's partition)."""
    optimizer = engine.optimizer  # type: ignore[attr-defined]
    return getattr(optimizer, "optimizer", optimizer)


class _Logger:
    """Console + TensorBoard + ``metrics.jsonl`` on rank 0; silent elsewhere."""

    def __init__(self, out_dir: Path, active: bool, echo: Callable[[str], None]):
        self.active, self.echo = active, echo
        self.writer = None
        self.jsonl = None
        if active:
            self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                echo("tensorboard is not installed: logging to the console and metrics.jsonl only")

    def message(self, text: str) -> None:
        if self.active:
            self.echo(text)

    def scalars(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def evaluate_retrieval(model: AlignmentModel, loader: ShardLoader, captions_per_image: int,
                       device: torch.device, backend: str | None = None, precision: str = "fp32") -> dict:
    """R@K / median rank of a full pass over ``loader``: all images against their first
    ``captions_per_image`` captions, scored with ``score_matrix``. Images with fewer captions are left out
    (counted in ``skipped_images``), since recall_at_k needs a fixed number per image."""
    from dsalign.eval.retrieval import recall_at_k

    was_training = model.training
    model.eval()
    images: list[tuple[torch.Tensor, torch.Tensor]] = []
    sentences: list[tuple[torch.Tensor, torch.Tensor]] = []
    skipped = 0
    c = captions_per_image
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for batch in loader:
        keep = batch["caption_mask"].sum(1) >= c
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        region_mask = batch["region_mask"][keep].to(device)
        tokens = batch["tokens"][keep][:, :c].flatten(0, 1).to(device)
        token_mask = batch["token_mask"][keep][:, :c].flatten(0, 1).to(device)
        with autocast:
            v = model.encode_images(batch["regions"][keep].to(device), region_mask)
            s = model.encode_sentences(tokens, token_mask)
        images.append((v.float(), region_mask))
        sentences.append((s.float(), token_mask))
    if not images:
        raise ValueError("the validation split has no image with enough captions")
    v, vm = _pad_cat(images)
    s, sm = _pad_cat(sentences)
    sims = score_matrix(v, vm, s, sm, backend)
    metrics = recall_at_k(sims.cpu(), captions_per_image=c)
    model.train(was_training)
    result = {k: float(val) for k, val in metrics.items()}
    result["rsum"] = sum(result[k] for k in RECALL_KEYS)
    result["images"] = float(v.shape[0])
    result["skipped_images"] = float(skipped)
    return result


def _pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(x.shape[1] for x, _ in parts)
    feats = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1])) for x, _ in parts])
    masks = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for _, m in parts])
    return feats, masks


def train_alignment(config: TrainConfig, resume: bool = False, export_dir: str | Path | None = None,
                    echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) a training run; returns a summary (final step, last val metrics, best rsum).

    Starts the process group if needed and leaves it up (the caller tears it down).
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = _device(config)
    precision = _precision(config, device)
    rank, world_size = _init_distributed(config, device)
    out_dir = Path(config.train.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    latest = ckpt.find_latest(ckpt_root) if ckpt_root.exists() else None
    if latest is not None and not resume:
        raise ConfigError(f"train.out_dir {out_dir} already holds checkpoints: pass --resume to continue, "
                          "or choose another train.out_dir")
    log = _Logger(out_dir, rank == 0, echo)
    try:
        return _run(config, latest, export_dir, device, precision, rank, world_size, log)
    finally:
        log.close()


def _run(config: TrainConfig, latest: Path | None, export_dir: str | Path | None, device: torch.device,
         precision: str, rank: int, world_size: int, log: _Logger) -> dict:
    import deepspeed

    features = config.data.features
    manifest = load_feature_manifest(features)
    vocab = Vocabulary.load(Path(features) / "vocab.json")
    feature_dim = int(manifest["feature_dim"])
    m = config.model
    model_config = AlignmentConfig(vocab_size=len(vocab), feature_dim=feature_dim, embed_dim=m.embed_dim,
                                   word_dim=m.word_dim, hidden_dim=m.hidden_dim, dropout=m.dropout,
                                   freeze_word_embeddings=m.freeze_word_embeddings)
    torch.manual_seed(config.train.seed)
    model = AlignmentModel(model_config)
    if m.word_vectors and latest is None:
        coverage = init_word_embeddings(model, m.word_vectors, vocab)
        log.message(f"word vectors {m.word_vectors}: {coverage['found']}/{coverage['words']} vocabulary words "
                    f"({100 * coverage['coverage']:.1f}%); the rest keep their random init")

    ds_config = deepspeed_config(config, world_size, precision)
    zero_stage = int(ds_config["zero_optimization"]["stage"])
    meta: dict = {}
    if latest is not None:
        meta = ckpt.read_meta(latest)
        if meta["world_size"] != world_size or meta.get("zero_stage") != zero_stage:
            raise ckpt.CheckpointError(
                f"checkpoint {latest} was written by {meta['world_size']} rank(s) with ZeRO stage "
                f"{meta.get('zero_stage')}; this run has {world_size} rank(s) and stage {zero_stage}")
        # Weights go in before the engine exists, so ZeRO's fp32 partitions are built from them.
        model.load_state_dict(ckpt.load_file(latest, ckpt.MODEL_FILE))
    engine, *_ = deepspeed.initialize(model=model.to(device), optimizer=_optimizer(config, model),
                                      config=ds_config)
    if latest is not None:
        _base_optimizer(engine).load_state_dict(ckpt.load_file(latest, ckpt.rank_file(rank))["optimizer"])
    start_step = int(meta.get("step", 0))
    best_rsum = float(meta["best_rsum"]) if meta.get("best_rsum") is not None else float("-inf")
    if rank == 0:
        (Path(config.train.out_dir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    log.message(f"align: {world_size} rank(s) on {device}, ZeRO {zero_stage}, {precision}, global batch "
                f"{config.train.batch_size * world_size}, "
                + (f"resumed at step {start_step} from {latest}" if latest else "starting at step 0"))

    t = config.train
    decoder = FeatureSampleDecoder(vocab, config.data.max_len, feature_dim)
    stream = ShardStream(shard_paths(features, config.data.train_split), decoder, collate_features,
                         t.batch_size, mode="train", batches_per_rank=t.batches_per_epoch,
                         num_workers=config.data.num_workers, shuffle_buffer=config.data.shuffle_buffer,
                         seed=t.seed, rank=rank, world_size=world_size)
    loader = ShardLoader(stream, num_workers=config.data.num_workers)
    val_loader = None
    if config.data.val_split and t.eval_every > 0 and rank == 0:
        val_stream = ShardStream(shard_paths(features, config.data.val_split), decoder, collate_features,
                                 config.data.val_batch_size, mode="eval", rank=0, world_size=1)
        val_loader = ShardLoader(val_stream, num_workers=config.data.num_workers)
    feature_info = {k: manifest.get(k) for k in ("backbone", "feature_dim", "region_source", "top_k",
                                                 "image_size", "pooling")}

    def evaluate(step: int) -> dict:
        nonlocal best_rsum
        metrics: dict = {}
        if val_loader is not None:
            metrics = evaluate_retrieval(engine.module, val_loader, config.data.captions_per_image, device,
                                         t.score_backend, precision)
            log.scalars(step, "val", metrics)
            log.message(f"step {step} val: R@1/5/10 i2t {metrics['i2t_r1']:.1f}/{metrics['i2t_r5']:.1f}/"
                        f"{metrics['i2t_r10']:.1f} t2i {metrics['t2i_r1']:.1f}/{metrics['t2i_r5']:.1f}/"
                        f"{metrics['t2i_r10']:.1f} rsum {metrics['rsum']:.1f}; {val_loader.report()}")
            if metrics["rsum"] > best_rsum:
                best_rsum = metrics["rsum"]
                export_bundle(engine.module, vocab, Path(t.out_dir) / BEST_DIR, feature_info,
                              {"step": step, "val": metrics})
        dist.barrier()
        return metrics

    def save(step: int) -> None:
        state = {"optimizer": _base_optimizer(engine).state_dict()}
        model_state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None
        ckpt.save_checkpoint(Path(t.out_dir) / "checkpoints", step, rank, world_size, state, model_state,
                             {"zero_stage": zero_stage, "seed": t.seed,
                              "best_rsum": best_rsum if best_rsum > float("-inf") else None},
                             t.keep_checkpoints, dist.barrier)

    global_batch = t.batch_size * world_size
    scale = 1.0 / global_batch if config.loss.reduction == "mean" else 1.0
    step = start_step
    last_metrics: dict = {}
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    engine.train()
    while step < t.max_steps:
        epoch, done_in_epoch = divmod(step, t.batches_per_epoch)
        stream.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(done_in_epoch):
            next(batches)
        for batch in batches:
            torch.manual_seed(step_seed(t.seed, step, rank))
            tokens, token_mask = pick_captions(batch["tokens"], batch["token_mask"], batch["caption_mask"])
            v, s = engine(batch["regions"].to(device), batch["region_mask"].to(device), tokens.to(device),
                          token_mask.to(device))
            local = alignment_loss(v, batch["region_mask"].to(device), s, token_mask.to(device),
                                   config.loss.margin, config.loss.hardest_negative, t.score_backend) * scale
            # DeepSpeed averages gradients over ranks; the local losses sum to the global loss.
            engine.backward(local * world_size)
            engine.step()
            step += 1
            total = local.detach().reshape(1).float()
            if world_size > 1:
                dist.all_reduce(total)
            if not torch.isfinite(total).all():
                raise RuntimeError(f"step {step}: the loss is not finite ({float(total)}); lower optim.lr")
            window_steps += 1
            window_loss += float(total)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                rate = window_steps * global_batch / max(elapsed, 1e-9)
                values = {"loss": window_loss / window_steps, "samples_per_s": rate, "epoch": float(epoch)}
                log.scalars(step, "train", values)
                log.message(f"step {step} epoch {epoch} loss {values['loss']:.4f} {rate:.1f} samples/s")
                window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
            if t.eval_every and step % t.eval_every == 0:
                last_metrics = evaluate(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                save(step)
            if step >= t.max_steps:
                break
    if t.eval_every and step % t.eval_every and step > start_step:
        last_metrics = evaluate(step)
    if not (t.checkpoint_every and step % t.checkpoint_every == 0) and step > start_step:
        save(step)
    log.message(f"align: done at step {step}; training data {loader.report()}")
    if export_dir is not None and rank == 0:
        source = Path(t.out_dir) / BEST_DIR
        if source.is_dir():
            from dsalign.bundle import load_alignment_bundle

            best = load_alignment_bundle(source)
            export_bundle(best.model, best.vocab, export_dir, best.features, best.info)
        else:
            export_bundle(engine.module, vocab, export_dir, feature_info, {"step": step})
        log.message(f"align: bundle exported to {export_dir}")
    dist.barrier()
    return {"step": step, "val": last_metrics, "best_rsum": best_rsum, "rank": rank, "world_size": world_size}
