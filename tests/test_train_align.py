"""The alignment trainer: strict config, caption sampling, end-to-end runs on tiny shapes features, exact
resume after SIGKILL, and a 2-rank torchrun run that loses a rank and resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsalign.train.align import pick_captions
from dsalign.train.checkpoint import CheckpointError, find_latest, load_file, read_meta
from dsalign.train.config import ConfigError, TrainConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "dsalign.cli", "train", "align"]


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 train / 10 val shapes scenes, 64-px whole image + 4 grid regions of efficientnet-lite0 features."""
    from dsalign.cli import main
    from dsalign.features.extract import FeatureConfig, extract_features

    root = tmp_path_factory.mktemp("shapes")
    assert main(["prepare", "shapes", "--out", str(root / "img"), "--n-train", "48", "--n-val", "10",
                 "--n-test", "0", "--image-size", "64", "--min-count", "1", "--quiet"]) == 0
    torch.set_num_threads(1)
    extract_features(root / "img", root / "feat", FeatureConfig(regions="grid", top_k=4, image_size=64),
                     progress=False)
    return root / "feat"


def load_config_data(data: dict) -> TrainConfig:
    config = parse_config(data)
    assert isinstance(config, TrainConfig)
    return config


def _config(tmp_path: Path, features: Path, **train: object) -> Path:
    data = {
        "data": {"features": str(features), "shuffle_buffer": 16, "val_batch_size": 8},
        "model": {"embed_dim": 16, "word_dim": 8, "hidden_dim": 12, "dropout": 0.1},
        "loss": {"reduction": "mean"},
        "optim": {"lr": 0.003},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 8, "batches_per_epoch": 5, "max_steps": 12,
                  "log_every": 1, "eval_every": 6, "checkpoint_every": 2, "keep_checkpoints": 2, "threads": 1,
                  **train},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def _train_in_process(config: TrainConfig, resume: bool = False) -> dict:
    """``train_alignment`` in this process, its process group torn down afterwards (the next run starts its own)."""
    import torch.distributed as dist

    from dsalign.train.align import train_alignment

    try:
        return train_alignment(config, resume=resume, echo=lambda _: None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _final_state(run: Path) -> tuple[dict, dict]:
    latest = find_latest(run / "checkpoints")
    assert latest is not None
    meta = read_meta(latest)
    return meta, {**load_file(latest, "model.pt"), **{f"opt/{k}": v for k, v in
                                                     _flat(load_file(latest, "rank0.pt")["optimizer"]).items()}}


def _flat(tree: object, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix: tree}


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)


# --- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("patch", "message"), [
    ({"train": {"batch_sise": 3}}, "unknown config key train.batch_sise"),
    ({"trian": {}}, "unknown config key trian"),
    ({"train": {"batch_size": -3}}, "train.batch_size must be >= 1, got -3"),
    ({"train": {"batch_size": "8"}}, "train.batch_size must be an integer"),
    ({"train": {"batch_size": 8.0}}, "train.batch_size must be an integer"),
    ({"loss": {"margin": -0.5}}, "loss.margin must be >= 0.0"),
    ({"loss": {"hardest_negative": 1}}, "loss.hardest_negative must be true or false"),
    ({"optim": {"lr": 0}}, "optim.lr must be > 0.0"),
    ({"optim": {"name": "adagrad"}}, "optim.name must be one of"),
    ({"distributed": {"zero_stage": 3}}, "distributed.zero_stage must be in [0, 2]"),
    ({"data": {"features": None}}, "data.features must not be null"),
    ({"model": []}, "model must be a JSON object"),
])
def test_bad_config_names_the_key(patch: dict, message: str) -> None:
    data: dict = {"data": {"features": "x"}}
    for section, values in patch.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_config_file_overrides_and_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsalign.cli import main

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": {"features": "f"}, "loss": {"margin": 0.2}}))
    config = load_config(path, ["train.max_steps=7", "loss.hardest_negative=true", "train.out_dir=o"])
    assert (config.train.max_steps, config.loss.hardest_negative, config.loss.margin) == (7, True, 0.2)
    assert config.train.out_dir == "o"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["max_steps=3"])
    path.write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    path.write_text(json.dumps({"data": {"features": "f"}, "train": {"batch_size": 0}}))
    assert main(["train", "align", "--config", str(path)]) == 2
    assert "train.batch_size must be >= 1" in capsys.readouterr().err


def test_hardest_negative_starts_after_its_warm_up() -> None:
    config = load_config_data({"data": {"features": "f"}, "loss": {"hardest_negative": True,
                                                                     "hardest_negative_after": 3}})
    assert [config.loss.hardest_at(step) for step in range(5)] == [False, False, False, True, True]
    plain = load_config_data({"data": {"features": "f"}, "loss": {"hardest_negative_after": 3}})
    assert not any(plain.loss.hardest_at(step) for step in range(5))
    with pytest.raises(ConfigError, match="loss.hardest_negative_after must be >= 0"):
        load_config_data({"data": {"features": "f"}, "loss": {"hardest_negative_after": -1}})


@pytest.mark.parametrize("path", sorted((ROOT / "launch" / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from dsalign.train.config import CaptionTrainConfig

    kind = CaptionTrainConfig if path.name.startswith("caption") else TrainConfig
    assert isinstance(load_config(path, kind=kind), kind)


def test_learning_rate_schedules() -> None:
    def lrs(optim: dict, steps: int = 10) -> list[float]:
        config = load_config_data({"data": {"features": "f"}, "optim": {"lr": 1.0, **optim}})
        return [round(config.optim.lr_at(step, steps), 6) for step in range(steps)]

    assert lrs({}) == [1.0] * 10
    assert lrs({"warmup_steps": 4}) == [0.25, 0.5, 0.75] + [1.0] * 7
    assert lrs({"schedule": "step", "decay_every": 4, "decay_factor": 0.5}) == [1.0] * 4 + [0.5] * 4 + [0.25] * 2
    cosine = lrs({"schedule": "cosine", "warmup_steps": 2, "decay_factor": 0.1}, steps=12)
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[7] == 0.55  # halfway down: (1 + 0.1) / 2
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0.1
    with pytest.raises(ConfigError, match="optim.decay_factor must be in"):
        lrs({"decay_factor": 2.0})
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        lrs({"schedule": "linear"})


def test_pick_captions_takes_one_real_caption_per_image() -> None:
    tokens = torch.tensor([[[5, 6, 0], [7, 0, 0]], [[8, 9, 10], [0, 0, 0]]])
    token_mask = tokens > 0
    caption_mask = token_mask.any(-1)
    for seed in range(20):
        chosen, mask = pick_captions(tokens, token_mask, caption_mask, torch.Generator().manual_seed(seed))
        assert chosen[1].tolist() == [8, 9, 10] and mask[1].all()
        assert chosen[0].tolist()[:2] in ([5, 6], [7, 0])


# --- end to end -----------------------------------------------------------------------------------------------

def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path, features: Path) -> None:
    """Reference run; then a run killed with SIGKILL at a random step and resumed: same final weights and
    optimizer state, bitwise (CPU, fp32). Then: rerunning without --resume is refused, and an altered
    checkpoint file is caught by its recorded hash."""
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir(), crash_dir.mkdir()
    config = _config(ref_dir, features)
    _run([*TRAIN, "--config", str(config), "--export", str(ref_dir / "bundle")], ref_dir)
    ref_meta, ref_state = _final_state(ref_dir / "run")
    assert ref_meta["step"] == 12
    kept = sorted(p.name for p in (ref_dir / "run" / "checkpoints").iterdir())
    assert kept == ["latest", "step_000000010", "step_000000012"], kept  # keep_checkpoints = 2
    rows = [json.loads(line) for line in (ref_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [6, 12] and all(0 <= r["i2t_r10"] <= 100 for r in val)
    assert any((ref_dir / "run" / "tensorboard").iterdir())

    from dsalign.bundle import load_alignment_bundle

    bundle = load_alignment_bundle(ref_dir / "bundle")
    assert bundle.info["step"] in (6, 12) and bundle.features["feature_dim"] == bundle.config.feature_dim

    config = _config(crash_dir, features)
    kill_at = random.Random().randint(3, 10)
    proc = subprocess.Popen([*TRAIN, "--config", str(config)], cwd=crash_dir, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(crash_dir / "run" / "metrics.jsonl", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    _run([*TRAIN, "--config", str(config), "--resume"], crash_dir)
    meta, state = _final_state(crash_dir / "run")
    assert meta["step"] == 12
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), f"{key} differs after a kill at step {kill_at}"
        else:
            assert state[key] == value, key

    again = subprocess.run([*TRAIN, "--config", str(config)], cwd=crash_dir, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    latest = find_latest(crash_dir / "run" / "checkpoints")
    assert latest is not None
    model = latest / "model.pt"
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_meta(latest)


def test_two_ranks_under_torchrun_rank_failure_and_resume(tmp_path: Path, features: Path) -> None:
    """2 ranks, ZeRO 1: SIGKILL of one rank ends the whole job quickly with the rank named; --resume then
    finishes the run from the last (partitioned) checkpoint."""
    config = _config(tmp_path, features, max_steps=8, eval_every=3, batch_size=4)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "dsalign.cli", "train", "align", "--config", str(config),
                "--set", "distributed.zero_stage=1", "--set", "distributed.timeout_s=60"]
    proc = subprocess.Popen(torchrun, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_for_step(tmp_path / "run" / "metrics.jsonl", 3, proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, f"expected 2 rank processes, found {children}"
    os.kill(int(children[-1]), signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - killed_at < 60
    assert "SIGKILL" in output and "FAILED" in output, output[-2000:]

    result = _run([*torchrun, "--resume"], tmp_path)
    assert "resumed at step" in result.stdout
    meta, _ = _final_state(tmp_path / "run")
    assert (meta["step"], meta["world_size"], meta["zero_stage"]) == (8, 2, 1)
    assert (tmp_path / "run" / "checkpoints" / "step_000000008" / "rank1.pt").is_file()


def test_zero2_resume_matches_an_uninterrupted_run(tmp_path: Path, features: Path) -> None:
    """ZeRO stage 2 partitions gradients and optimizer state; stopping at step 4 and resuming must end where an
    uninterrupted run ends, bitwise (world of one, in this process). With a data worker, whose next epoch's
    process starts while the current epoch trains."""


    def run(folder: str, max_steps: int, resume: bool) -> None:
        path = _config(tmp_path / folder, features, max_steps=max_steps, eval_every=0)
        config = load_config(path, ["distributed.zero_stage=2", "data.num_workers=1"])
        _train_in_process(config, resume)

    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()
    run("whole", 8, False)
    run("parts", 4, False)
    run("parts", 8, True)
    whole_meta, whole = _final_state(tmp_path / "whole" / "run")
    parts_meta, parts = _final_state(tmp_path / "parts" / "run")
    assert whole_meta["step"] == parts_meta["step"] == 8 and whole_meta["zero_stage"] == 2
    assert whole.keys() == parts.keys()
    for key in whole:
        if isinstance(whole[key], torch.Tensor):
            assert torch.equal(whole[key], parts[key]), key


def test_bf16_autocast_training_under_zero2(tmp_path: Path, features: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 path (CUDA's default) on CPU autocast: cosine unit vectors reach the score op in bf16, gradients
    are reduced in fp32 (no module in DeepSpeed's lower-precision list) and the checkpointed weights stay fp32."""
    import deepspeed.runtime.engine

    import dsalign.train.distributed
    import dsalign.train.loop

    monkeypatch.setattr(dsalign.train.loop, "resolve_precision", lambda config, device: "bf16")
    seen, low_precision_modules = set(), []
    scored = dsalign.train.distributed.score
    monkeypatch.setattr(dsalign.train.distributed, "score",
                        lambda regions, *rest: seen.add(regions.dtype) or scored(regions, *rest))
    autocast_params = deepspeed.runtime.engine.init_autocast_params
    monkeypatch.setattr(deepspeed.runtime.engine, "init_autocast_params",
                        lambda engine, dtype, modules: low_precision_modules.append(modules)
                        or autocast_params(engine, dtype, modules))
    path = _config(tmp_path, features, max_steps=4, eval_every=2)
    config = load_config(path, ["distributed.zero_stage=2", "model.similarity=\"cosine\""])
    summary = _train_in_process(config)
    assert summary["step"] == 4 and seen == {torch.bfloat16} and low_precision_modules == [[]]
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_000000004", "model.pt")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())


@pytest.mark.parametrize("checkpoint_every", [1, 3])
def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path: Path, features: Path,
                                                                 checkpoint_every: int) -> None:
    """A learning rate far too high: the run stops with one line naming the first step whose loss was not
    finite, and no checkpoint holds the weights of that step or later (the loss is read on the host only at
    steps that log, evaluate or save: here every step, or every third)."""


    path = _config(tmp_path, features, max_steps=12, eval_every=0, log_every=5, checkpoint_every=checkpoint_every,
                   keep_checkpoints=20)
    config = load_config(path, ["optim.lr=1e30", "optim.name=\"sgd\""])
    with pytest.raises(RuntimeError, match=r"^step \d+: the loss is not finite \((nan|inf)\); lower optim.lr$") as err:
        _train_in_process(config)
    bad = int(err.value.args[0].split(":")[0].split()[1])
    saved = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert bad >= 2 and saved == [step for step in range(1, bad) if step % checkpoint_every == 0]
    for step in saved:
        weights = load_file(tmp_path / "run" / "checkpoints" / f"step_{step:09d}", "model.pt")
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_learning_rate_schedule_reaches_the_optimizer_under_zero2(tmp_path: Path, features: Path) -> None:
    """A step schedule that drops the rate to 0 after 4 steps freezes the weights from then on (ZeRO 2 wraps
    the optimizer), and the log records the rate each step used."""


    path = _config(tmp_path, features, max_steps=8, eval_every=0, keep_checkpoints=5)
    config = load_config(path, ["distributed.zero_stage=2", "optim.schedule=\"step\"", "optim.decay_every=4",
                                "optim.decay_factor=0", "optim.warmup_steps=2"])
    _train_in_process(config)
    weights = {step: load_file(tmp_path / "run" / "checkpoints" / f"step_{step:09d}", "model.pt")
               for step in (2, 4, 8)}
    assert all(torch.equal(weights[4][k], weights[8][k]) for k in weights[4])
    assert not all(torch.equal(weights[2][k], weights[4][k]) for k in weights[2])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train"] == [0.0015, 0.003, 0.003, 0.003, 0, 0, 0, 0]


def test_resuming_a_finished_run_takes_no_step(tmp_path: Path, features: Path) -> None:
    """--resume of a run that reached train.max_steps (at an epoch boundary, so the data loader already stands at
    the next epoch) trains nothing more and keeps its last checkpoint."""


    config = load_config(_config(tmp_path, features, max_steps=5, eval_every=0, checkpoint_every=5))
    summaries = []
    for resume in (False, True):
        summaries.append(_train_in_process(config, resume))
    assert [s["step"] for s in summaries] == [5, 5]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step_000000005"


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_gradients_are_clipped_at_every_zero_stage(tmp_path: Path, features: Path, zero_stage: int) -> None:
    """optim.grad_clip_norm bounds every step (plain SGD: a step moves the weights by lr x the clipped norm):
    at ZeRO 0 the loop clips, DeepSpeed at ZeRO 1/2; a loose limit leaves the steps alone."""


    def step_norms(clip: float) -> list[float]:
        folder = tmp_path / f"clip{clip}"
        folder.mkdir()
        path = _config(folder, features, max_steps=3, eval_every=0, checkpoint_every=1, keep_checkpoints=5)
        config = load_config(path, [f"distributed.zero_stage={zero_stage}", "optim.name=\"sgd\"",
                                    "optim.momentum=0", "optim.lr=0.05", f"optim.grad_clip_norm={clip}"])
        _train_in_process(config)
        weights = [load_file(folder / "run" / "checkpoints" / f"step_{step:09d}", "model.pt") for step in (1, 2, 3)]
        return [float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[k] - a[k]) for k in a])))
                for a, b in zip(weights, weights[1:])]

    assert all(n == pytest.approx(0.05 * 1e-3, rel=1e-3) for n in step_norms(1e-3))
    assert all(n > 1e-2 for n in step_norms(1e6))


# --- refused before training ----------------------------------------------------------------------------------

def test_deepspeed_json_cannot_move_the_gradient_average_or_clip(tmp_path: Path) -> None:
    """The loop clips at ZeRO 0 right after the engine's backward, which must have averaged the gradients: a
    JSON's managed_gradient_accumulation=false (average in step) and gradient_clipping are overridden."""
    from dsalign.train.runtime import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"managed_gradient_accumulation": False, "gradient_clipping": 2.0}))
    for stage, clip in ((0, 0.0), (2, 3.0)):
        config = load_config_data({"data": {"features": "f"}, "optim": {"grad_clip_norm": 3.0},
                                   "distributed": {"deepspeed_config": str(path), "zero_stage": stage}})
        ds = deepspeed_config(config, 2, "fp32")
        assert ds["managed_gradient_accumulation"] is True and ds["gradient_clipping"] == clip


@pytest.mark.parametrize(("zero", "message"), [
    ({"stage": 3}, "zero_optimization.stage must be 0, 1 or 2 (ZeRO 3 is not supported), got 3"),
    ({"stage": 7}, "got 7"),
    ({"stage": "2"}, "got '2'"),
    ([2], "zero_optimization must be a JSON object"),
])
def test_deepspeed_json_zero_stage_is_range_checked(tmp_path: Path, zero: object, message: str) -> None:
    """The JSON's stage wins over distributed.zero_stage, so it gets the same check (ZeRO 3 used to crash at the
    first checkpoint save, stage 7 inside DeepSpeed's pydantic model)."""
    from dsalign.train.runtime import deepspeed_config

    path = tmp_path / "ds.json"
    config = load_config_data({"data": {"features": "f"}, "distributed": {"deepspeed_config": str(path)}})
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}))
    assert deepspeed_config(config, 1, "fp32")["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    path.write_text(json.dumps({"zero_optimization": zero}))
    with pytest.raises(ConfigError) as err:
        deepspeed_config(config, 1, "fp32")
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_device_of_a_run_without_launcher_and_deepspeeds_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without a launcher on train.device cuda:1 told DeepSpeed LOCAL_RANK=0, which puts the model on
    cuda:0 beside batches on cuda:1; and a CPU run on a GPU machine got DeepSpeed's CUDA accelerator."""
    from types import SimpleNamespace

    import deepspeed.accelerator

    from dsalign.train import runtime

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    on_gpu1 = load_config_data({"data": {"features": "f"}, "train": {"device": "cuda:1"}})
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(runtime, "_own_world", True)  # LOCAL_RANK=0 left by this process's own earlier run
    assert runtime.resolve_device(on_gpu1) == torch.device("cuda", 1)
    monkeypatch.setattr(runtime, "_own_world", False)  # a launcher's LOCAL_RANK wins
    assert runtime.resolve_device(on_gpu1) == torch.device("cuda", 0)

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: SimpleNamespace(device_name=lambda: "cuda"))
    on_cpu = load_config_data({"data": {"features": "f"}, "train": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="train.device is cpu but DeepSpeed's accelerator in this process is cuda; "
                                          "set DS_ACCELERATOR=cpu"):
        runtime.init_distributed(on_cpu, runtime.resolve_device(on_cpu))


@pytest.mark.parametrize(("capability", "precision"), [((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_gpus_have_it(monkeypatch: pytest.MonkeyPatch, capability: tuple,
                                                        precision: str) -> None:
    """V100s and T4s only emulate bf16 (slowly): "auto" trains them in fp32."""
    from dsalign.train.runtime import resolve_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    config = load_config_data({"data": {"features": "f"}})
    assert resolve_precision(config, torch.device("cuda", 0)) == precision
    assert resolve_precision(config, torch.device("cpu")) == "fp32"


def test_too_few_val_captions_are_refused_before_training(tmp_path: Path, features: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The shapes val images have 5 captions each; asking for 6 used to fail at the first validation, after
    eval_every steps and without a checkpoint."""
    from dsalign.cli import main

    config = _config(tmp_path, features)
    assert main(["train", "align", "--config", str(config), "--set", "data.captions_per_image=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.val_split 'val'" in err and "6 captions (at most 5)" in err and "data.captions_per_image" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_val_caption_check_reads_past_images_with_fewer_captions() -> None:
    """Validation skips images with fewer captions, so a first batch of such images must not refuse the run."""
    from dsalign.train.align import check_val_captions

    def batch(*counts: int) -> dict:
        return {"caption_mask": torch.tensor([[i < c for i in range(5)] for c in counts])}

    check_val_captions([batch(2, 2), {"skipped": 1}, batch(1, 5)], "val", 5)
    with pytest.raises(ConfigError, match=r"no image has 5 captions \(at most 3\)"):
        check_val_captions([batch(2, 2), batch(3, 1)], "val", 5)
    with pytest.raises(ConfigError, match="has no usable image"):
        check_val_captions([], "val", 5)


def test_an_empty_or_missing_val_split_is_refused() -> None:
    from dsalign.train.align import require_val_images

    manifest = {"splits": {"train": {"images": 4, "shards": ["a.tar"]}, "val": {"images": 0, "shards": []}}}
    require_val_images(manifest, "feat", "train")
    with pytest.raises(ConfigError, match="data.val_split 'val' of feat has no images"):
        require_val_images(manifest, "feat", "val")
    with pytest.raises(ConfigError, match=r"data.val_split 'dev' is not a split of feat \(has: train, val\)"):
        require_val_images(manifest, "feat", "dev")


def test_validation_without_enough_captions_names_the_split_and_key(tmp_path: Path, features: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the split change after the start-up check, validation still fails in one line naming both."""
    from dsalign.train import align
    from dsalign.train.loop import RunContext
    from dsalign.train.runtime import RunLogger

    monkeypatch.setattr(align, "check_val_captions", lambda *args: None)
    config = load_config(_config(tmp_path, features), ["data.captions_per_image=6"])
    ctx = RunContext(config, torch.device("cpu"), "fp32", 0, 1, RunLogger(tmp_path, False, print), False)
    task = align.alignment_task(ctx)
    assert task.evaluate is not None
    with pytest.raises(ConfigError, match=r"data.val_split 'val': no image has 6 captions \(at most 5\); set "
                                          "data.captions_per_image to 5 or less"):
        task.evaluate(task.model, 0)


def test_training_batches_carry_the_stored_float16_and_train_as_float32(tmp_path: Path, features: Path) -> None:
    """The trainer's batches keep the shards' float16 features (half the bytes through the data workers and to
    the GPU, pinned there); the loss is the one of float32 batches, bit for bit (float16 -> float32 is exact)."""
    from dsalign.train import align
    from dsalign.train.loop import RunContext
    from dsalign.train.runtime import RunLogger

    config = load_config(_config(tmp_path, features))
    log = RunLogger(tmp_path, False, print)
    task = align.alignment_task(RunContext(config, torch.device("cpu"), "fp32", 0, 1, log, False))
    batch = next(iter(task.loader))
    assert batch["regions"].dtype == torch.float16 and not task.loader.pin_memory
    model = task.model.eval()
    losses = []
    for regions in (batch["regions"], batch["regions"].float()):
        torch.manual_seed(0)  # the same captions picked
        losses.append(task.batch_loss(model, {**batch, "regions": regions}, 0))
    assert losses[0].dtype == torch.float32 and torch.equal(losses[0], losses[1])
    on_gpu = align.alignment_task(RunContext(config, torch.device("cuda", 0), "bf16", 0, 1, log, False))
    assert on_gpu.loader.pin_memory


def test_resume_after_a_model_change_names_the_changed_key(tmp_path: Path, features: Path) -> None:
    """--resume with another model.embed_dim used to print torch's state_dict dump, one line per tensor; now one
    line names the key (from the run's config.json), else the first tensor that does not fit."""


    path = _config(tmp_path, features, max_steps=2, eval_every=0)

    def run(overrides: list[str], resume: bool) -> None:
        _train_in_process(load_config(path, overrides), resume)

    run([], False)
    with pytest.raises(CheckpointError) as err:
        run(["model.embed_dim=24", "train.max_steps=4"], True)
    message = str(err.value)
    assert "model.embed_dim=16 in the checkpoint, 24 now" in message and "use another train.out_dir" in message
    assert "\n" not in message and "max_steps" not in message
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"its weights do not fit this model: \S+ is \[\d+(, \d+)*\] in the "
                                              r"checkpoint, \[\d+(, \d+)*\] now \(and \d+ more\)"):
        run(["model.embed_dim=24", "train.max_steps=4"], True)
