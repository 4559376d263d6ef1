"""The parts of a training run that do not depend on the model: process group, device, precision, the DeepSpeed
config, the optimizer, logging and per-step seeds. Shared by ``dsalign train align`` and ``dsalign train caption``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dsalign.train.config import ConfigError, RunConfig
from dsalign.train.distributed import init_host_group


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one rank, independent of everything that ran before."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_own_world = False  # this process made up its own world of one (no launcher); not inherited by children


def init_distributed(config: RunConfig, device: torch.device) -> tuple[int, int]:
    """Start the process group (a world of one without a launcher) the way DeepSpeed expects it.

    Several runs may follow each other in one process (the demo, tests): a new process group after an earlier
    one was destroyed also needs DeepSpeed to forget the groups it cached from the old one.
    """
    if device.type == "cpu" and torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import, or it takes the GPU
    import deepspeed

    _check_accelerator(device)
    global _own_world
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=config.distributed.timeout_s)
    if not dist.is_initialized():
        _forget_deepspeed_groups()
    if "WORLD_SIZE" not in os.environ or _own_world:
        _own_world = True
        # DeepSpeed places the model on its accelerator's device LOCAL_RANK: the one train.device names
        os.environ.update(RANK="0", LOCAL_RANK=str(device.index or 0), WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        if not dist.is_initialized():
            # A world of one needs no rendezvous: an in-process store cannot lose a race for a TCP port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if not config.distributed.shm_comm:
        # DeepSpeed compiles a shared-memory all-reduce for CPU on first use (~60 s); gloo alone is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    if dist.get_world_size() > 1:
        init_host_group(timeout)
    return dist.get_rank(), dist.get_world_size()


def _check_accelerator(device: torch.device) -> None:
    """DeepSpeed moves the model to its own accelerator, chosen once per process: it must be train.device's kind
    (a CPU run in a process where DeepSpeed already took the GPU would meet its batches on another device)."""
    from deepspeed.accelerator import get_accelerator

    kind = get_accelerator().device_name()
    if kind != device.type:
        raise ConfigError(f"train.device is {device} but DeepSpeed's accelerator in this process is {kind}; set "
                          f"DS_ACCELERATOR={device.type} in the environment (or train in a new process)")


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's module-level references to process groups of an earlier, destroyed world."""
    from deepspeed import comm
    from deepspeed.utils import groups

    comm.comm.cdb = None
    for name, value in vars(groups).items():
        if name.startswith("_") and name.endswith("_GROUP"):
            setattr(groups, name, {} if isinstance(value, dict) else None)
        elif name.startswith("_") and name.endswith("_GROUP_RANKS") and isinstance(value, dict):
            value.clear()


def resolve_device(config: RunConfig) -> torch.device:
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        launched = "LOCAL_RANK" in os.environ and not _own_world  # not the one this process set for itself
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if launched else device.index or 0)
        torch.cuda.set_device(device)
    return device


def resolve_precision(config: RunConfig, device: torch.device) -> str:
    precision = config.distributed.precision
    if precision == "auto":  # bf16 where the tensor cores have it (sm_80+): emulated on older GPUs, and slow
        return "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("distributed.precision bf16 needs a CUDA device (CPU training runs in fp32)")
    return precision


SUPPORTED_ZERO_STAGES = (0, 1, 2)


def deepspeed_config(config: RunConfig, world_size: int, precision: str) -> dict:
    """The DeepSpeed config: the optional JSON file, with batch sizes, clipping and precision from ours."""
    ds = read_deepspeed_json(Path(config.distributed.deepspeed_config)) if config.distributed.deepspeed_config \
        else {}
    zero = dict(ds.get("zero_optimization") or {})
    zero.setdefault("stage", config.distributed.zero_stage)
    ds.update({
        "train_micro_batch_size_per_gpu": config.train.batch_size,
        "gradient_accumulation_steps": 1,
        # the engine's backward averages the gradients (the loop's ZeRO 0 clip needs them averaged), not its step
        "managed_gradient_accumulation": True,
        "train_batch_size": config.train.batch_size * world_size,
        # ZeRO 0: the loop clips (clip_gradients); ZeRO 1/2 clip inside DeepSpeed's optimizer
        "gradient_clipping": 0.0 if zero["stage"] == 0 else config.optim.grad_clip_norm,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        # ZeRO 1/2 refuse optimizers DeepSpeed did not write unless told; torch's are elementwise and safe.
        "zero_allow_untested_optimizer": True,
    })
    # Autocast keeps fp32 master weights in the module, so checkpoints (and resume) stay exact; no module's
    # gradients are reduced in bf16 (DeepSpeed's default for Linear layers at ZeRO 1/2): every stage and rank
    # count averages in fp32, like ZeRO 0, and the model is small enough that the bytes do not matter.
    ds["torch_autocast"] = {"enabled": precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


def clip_gradients(module: torch.nn.Module, max_norm: float) -> None:
    """Scale the gradients to a global 2-norm of at most ``max_norm`` (ZeRO 0, after the engine's backward has
    averaged them over ranks). DeepSpeed's own clip at ZeRO 0 builds two tensors from Python numbers on the
    device every step (copies that wait for the GPU to finish the backward) and all-reduces a norm every rank
    already has; torch's clip does neither and scales by exactly 1.0 below the limit, as DeepSpeed's does."""
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)


def read_deepspeed_json(path: Path) -> dict:
    """``distributed.deepspeed_config`` read and checked: what it may not set is refused here, in one line,
    rather than deep inside DeepSpeed (or at the first checkpoint, for ZeRO 3)."""
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
    _check_zero_stage(ds.get("zero_optimization"), path)
    return ds


def _check_zero_stage(zero: object, path: Path) -> None:
    """The JSON's stage wins over ``distributed.zero_stage``, so it gets the same range check: ZeRO 3 partitions
    the weights themselves, which the checkpoints (whole model once, torch optimizer state per rank) cannot
    save."""
    if zero is None:
        return
    if not isinstance(zero, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path}: zero_optimization must be a JSON object, "
                          f"got {zero!r}")
    if "stage" not in zero:  # distributed.zero_stage applies, already range-checked with the config
        return
    stage = zero["stage"]
    if type(stage) is not int or stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"distributed.deepspeed_config: {path}: zero_optimization.stage must be 0, 1 or 2 "
                          f"(ZeRO 3 is not supported), got {stage!r}")


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A torch optimizer handed to DeepSpeed (a DeepSpeed-config optimizer would build fused ops for minutes on
    CPU). RMSprop is the paper's choice for the generator."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, alpha=0.99, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def base_optimizer(engine: object) -> torch.optim.Optimizer:
    """The torch optimizer whose state is this rank's (ZeRO 1/2 wrap it around the rank's partition)."""
    optimizer = engine.optimizer  # type: ignore[attr-defined]
    return getattr(optimizer, "optimizer", optimizer)


def set_learning_rate(engine: object, lr: float) -> float:
    """Sets ``lr`` on every parameter group (ZeRO's wrapper shares the torch optimizer's groups); returns it."""
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr
    return lr


class RunLogger:
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
