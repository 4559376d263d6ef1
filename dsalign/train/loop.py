"""The training loop every model shares: DeepSpeed engine, resume, logging, validation, checkpoints, export.

One code path for one process, ``torchrun`` and the ``deepspeed`` launcher: the engine runs ZeRO 0-2 (fp32 on
CPU with gloo; bf16 autocast with fp32 master weights on CUDA). A model plugs in as a :class:`TrainTask`: its
module, its training loader, the loss of one batch, a validation pass and how to export a bundle.

Determinism and resume: the RNG is reseeded at every step from (seed, step, rank), the data position is
(epoch, batch-in-epoch) = divmod(step, batches_per_epoch), and the training stream is a pure function of
(seed, epoch, rank, worker). Resuming sets the epoch, skips the consumed batches and reloads weights and
optimizer state, so an interrupted run ends where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dsalign.bundle import export_bundle, load_bundle
from dsalign.data.pipeline import ShardLoader
from dsalign.text import Vocabulary
from dsalign.train import checkpoint as ckpt
from dsalign.train.config import ConfigError, RunConfig
from dsalign.train.runtime import (
    RunLogger,
    base_optimizer,
    build_optimizer,
    clip_gradients,
    deepspeed_config,
    init_distributed,
    resolve_device,
    resolve_precision,
    set_learning_rate,
    step_seed,
)

BEST_DIR = "best"
CONFIG_FILE = "config.json"  # the run's validated config, rewritten by every (re)start


@dataclass
class RunContext:
    """Where and how this process trains, handed to a task factory."""

    config: RunConfig
    device: torch.device
    precision: str
    rank: int
    world_size: int
    log: RunLogger
    resuming: bool  # a checkpoint will overwrite the fresh weights (skip one-off initialisations)


@dataclass
class TrainTask:
    """What a model contributes to :func:`fit`.

    ``batch_loss(module, batch, step)`` returns this rank's loss such that the sum over ranks is the global loss
    (DeepSpeed averages gradients, so the loop backpropagates it times the world size); ``step`` is the number
    of optimizer steps already taken, for losses that change over training. ``evaluate(module, step)``
    runs on rank 0 only and returns metrics that include ``select_key`` (higher is better; the best model so far
    is exported as a bundle to ``<out_dir>/best``, with ``features`` and ``info`` recorded in it).
    """

    name: str
    model: torch.nn.Module
    vocab: Vocabulary
    loader: ShardLoader  # of a training stream
    batch_loss: Callable[[torch.nn.Module, dict, int], torch.Tensor]
    features: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    evaluate: Callable[[torch.nn.Module, int], dict] | None = None
    select_key: str = ""
    describe: Callable[[dict], str] = lambda metrics: ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def fit(config: RunConfig, make_task: Callable[[RunContext], TrainTask], resume: bool = False,
        export_dir: str | Path | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) a training run; returns a summary (final step, last val metrics, best value).

    Starts the process group if needed and leaves it up (the caller tears it down).
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config)
    precision = resolve_precision(config, device)
    rank, world_size = init_distributed(config, device)
    ds_config = deepspeed_config(config, world_size, precision)  # a bad DeepSpeed JSON stops here, before any work
    out_dir = Path(config.train.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    latest = ckpt.find_latest(ckpt_root) if ckpt_root.exists() else None
    if latest is not None and not resume:
        raise ConfigError(f"train.out_dir {out_dir} already holds checkpoints: pass --resume to continue, "
                          "or choose another train.out_dir")
    log = RunLogger(out_dir, rank == 0, echo)
    try:
        torch.manual_seed(config.train.seed)
        task = make_task(RunContext(config, device, precision, rank, world_size, log, latest is not None))
        return _run(config, task, ds_config, latest, export_dir, device, precision, rank, world_size, log)
    finally:
        log.close()


def _run(config: RunConfig, task: TrainTask, ds_config: dict, latest: Path | None,
         export_dir: str | Path | None, device: torch.device, precision: str, rank: int, world_size: int,
         log: RunLogger) -> dict:
    import deepspeed

    model = task.model
    zero_stage = int(ds_config["zero_optimization"]["stage"])
    meta: dict = {}
    if latest is not None:
        meta = ckpt.read_meta(latest)
        _check_resumable(meta, latest, task.name, world_size, zero_stage)
        # Weights go in before the engine exists, so ZeRO's fp32 partitions are built from them.
        model.load_state_dict(_checkpoint_weights(model, latest, config))
    engine, *_ = deepspeed.initialize(model=model.to(device), optimizer=build_optimizer(config, model),
                                      config=ds_config)
    if latest is not None:
        base_optimizer(engine).load_state_dict(ckpt.load_file(latest, ckpt.rank_file(rank))["optimizer"])
    start_step = int(meta.get("step", 0))
    best = float(meta["best"]) if meta.get("best") is not None else float("-inf")
    t = config.train
    out_dir = Path(t.out_dir)
    if rank == 0:
        (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    log.message(f"{task.name}: {world_size} rank(s) on {device}, ZeRO {zero_stage}, {precision}, global batch "
                f"{t.batch_size * world_size}, "
                + (f"resumed at step {start_step} from {latest}" if latest else "starting at step 0"))
    if device.type == "cuda" and task.loader.num_workers == 0:
        log.message(f"{task.name}: data.num_workers is 0, so the GPU waits while each batch is read between steps; "
                    "set data.num_workers to 2-8 (per rank) to read ahead in background processes")

    def evaluate(step: int) -> dict:
        nonlocal best
        metrics: dict = {}
        if task.evaluate is not None and rank == 0:
            metrics = task.evaluate(engine.module, step)
            log.scalars(step, "val", metrics)
            log.message(f"step {step} val: {task.describe(metrics)}")
            if metrics[task.select_key] > best:
                best = metrics[task.select_key]
                export_bundle(engine.module, task.vocab, out_dir / BEST_DIR, task.features,
                              {**task.info, "step": step, "val": metrics})
        dist.barrier()
        return metrics

    def save(step: int) -> None:
        state = {"optimizer": base_optimizer(engine).state_dict()}
        model_state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None
        ckpt.save_checkpoint(out_dir / "checkpoints", step, rank, world_size, state, model_state,
                             {"task": task.name, "zero_stage": zero_stage, "seed": t.seed,
                              "select_key": task.select_key, "best": best if best > float("-inf") else None},
                             t.keep_checkpoints, dist.barrier)

    global_batch = t.batch_size * world_size
    # the clip DeepSpeed does not do (ZeRO 0, see deepspeed_config), the loop does
    clip = 0.0 if ds_config["gradient_clipping"] else config.optim.grad_clip_norm
    step = start_step
    last_metrics: dict = {}

    def new_window() -> tuple[float, int, torch.Tensor]:
        """(start, steps, summed loss): the loss stays on the device until a step that logs reads it, so that
        steps in between need no host sync."""
        return time.perf_counter(), 0, torch.zeros((), dtype=torch.float64, device=device)

    window_start, window_steps, window_loss = new_window()
    divergence = _DivergenceWatch(device)
    engine.train()
    # closing: an early stop (an error, the last step) also ends the next epoch's workers, started ahead
    last_epoch = (t.max_steps - 1) // t.batches_per_epoch
    with contextlib.closing(task.loader.epochs(step // t.batches_per_epoch, last_epoch)) as epochs:
        for epoch, batches in epochs:
            if step >= t.max_steps:  # also a resumed run that had already finished
                break
            for _ in range(step - epoch * t.batches_per_epoch):  # resuming: the batches consumed before
                next(batches)
            for batch in batches:
                torch.manual_seed(step_seed(t.seed, step, rank))
                lr = set_learning_rate(engine, config.optim.lr_at(step, t.max_steps))
                local = task.batch_loss(engine, batch, step)
                # DeepSpeed averages gradients over ranks; the local losses sum to the global loss.
                engine.backward(local * world_size)
                if clip:
                    clip_gradients(engine.module, clip)
                engine.step()
                step += 1
                total = local.detach().reshape(1).float()
                if world_size > 1:
                    dist.all_reduce(total)
                window_steps += 1
                window_loss = window_loss + total[0]
                divergence.see(step, total[0])
                logs = step % t.log_every == 0 or step == t.max_steps
                evaluates = bool(t.eval_every) and step % t.eval_every == 0
                saves = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
                if logs or evaluates or saves:  # every rank holds the same all-reduced loss: all stop together
                    divergence.check()
                if logs:
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * global_batch / max(elapsed, 1e-9)
                    values = {"loss": float(window_loss) / window_steps, "samples_per_s": rate, "epoch": float(epoch),
                              "lr": lr}
                    log.scalars(step, "train", values)
                    log.message(f"step {step} epoch {epoch} loss {values['loss']:.4f} {rate:.1f} samples/s")
                    window_start, window_steps, window_loss = new_window()
                if evaluates:
                    last_metrics = evaluate(step)
                if saves:
                    save(step)
                if step >= t.max_steps:
                    break
    if t.eval_every and step % t.eval_every and step > start_step:
        last_metrics = evaluate(step)
    if not (t.checkpoint_every and step % t.checkpoint_every == 0) and step > start_step:
        save(step)
    log.message(f"{task.name}: done at step {step}; training data {task.loader.report()}")
    if export_dir is not None and rank == 0:
        if (out_dir / BEST_DIR).is_dir():
            best_bundle = load_bundle(out_dir / BEST_DIR)
            export_bundle(best_bundle.model, best_bundle.vocab, export_dir, best_bundle.features, best_bundle.info)
        else:
            export_bundle(engine.module, task.vocab, export_dir, task.features, {**task.info, "step": step})
        log.message(f"{task.name}: bundle exported to {export_dir}")
    dist.barrier()
    return {"step": step, "val": last_metrics, "best": best, "select_key": task.select_key, "rank": rank,
            "world_size": world_size}


class _DivergenceWatch:
    """The first step whose (all-reduced) loss was not finite, kept on the device: reading it is a host sync, so
    the loop reads it only on steps that log, evaluate or save (non-finite weights are never saved)."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def see(self, step: int, loss: torch.Tensor) -> None:
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)

    def check(self) -> None:
        step = int(self.step)
        if step >= 0:
            raise RuntimeError(f"step {step}: the loss is not finite ({float(self.loss)}); lower optim.lr")


def _check_resumable(meta: dict, latest: Path, task_name: str, world_size: int, zero_stage: int) -> None:
    """Refuse a checkpoint of another model (older checkpoints do not record it), world size or ZeRO stage."""
    if meta.get("task", task_name) != task_name:
        raise ckpt.CheckpointError(f"checkpoint {latest} is from a `train {meta['task']}` run, this is "
                                   f"`train {task_name}`: use another train.out_dir")
    if meta["world_size"] != world_size or meta.get("zero_stage") != zero_stage:
        raise ckpt.CheckpointError(
            f"checkpoint {latest} was written by {meta['world_size']} rank(s) with ZeRO stage "
            f"{meta.get('zero_stage')}; this run has {world_size} rank(s) and stage {zero_stage}")


def _checkpoint_weights(model: torch.nn.Module, latest: Path, config: RunConfig) -> dict:
    """The checkpoint's weights once they fit ``model``. A misfit is nearly always a config change since the
    checkpoint's run, so it is named key by key (from the run's saved config), else the first tensor that does
    not fit: one line instead of torch's dump of every mismatching tensor."""
    state = ckpt.load_file(latest, ckpt.MODEL_FILE)
    mismatches = ckpt.state_mismatches(model.state_dict(), state)
    if not mismatches:
        return state
    saved = _saved_config(Path(config.train.out_dir) / CONFIG_FILE)
    changes = ckpt.config_changes(saved, config.to_dict()) if saved is not None else []
    reason = f"the config changed since its run: {_summary(changes)}" if changes else \
        f"its weights do not fit this model: {_summary(mismatches, shown=1)}"
    raise ckpt.CheckpointError(f"cannot resume from {latest}: {reason}; use another train.out_dir "
                               "(or the checkpoint's settings)")


def _saved_config(path: Path) -> dict | None:
    """The config a run folder's checkpoints were written with; None when it is missing or unreadable."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def _summary(items: list[str], shown: int = 3) -> str:
    """The first ``shown`` items and how many more there are, for a one-line message."""
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more
