"""Two gloo ranks with all-gather-with-grad + local loss give the single-process loss and gradients on the same
global batch, for plain autograd and for the DeepSpeed engine at ZeRO 0/1/2."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsalign.models.alignment import AlignmentConfig, AlignmentModel
from dsalign.models.losses import ranking_loss
from dsalign.ops.score import score
from dsalign.train.distributed import alignment_loss, init_host_group, longest_over_ranks
from dsalign.train.runtime import clip_gradients

WORLD = 2
PER_RANK = 3


def _global_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ragged (regions [R_i, F], tokens [T_i]) pairs; rank 1 gets more regions and longer sentences, so the
    ranks pad to different sizes."""
    g = torch.Generator().manual_seed(7)
    pairs = []
    for i in range(WORLD * PER_RANK):
        n_regions, n_words = (2 + i % 2, 2 + i % 3) if i < PER_RANK else (4 + i % 2, 5 + i % 2)
        pairs.append((torch.randn(n_regions, 10, generator=g),
                      torch.randint(4, 20, (n_words,), generator=g)))
    return pairs


def _collate(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    r, t = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
    regions, region_mask = torch.zeros(len(pairs), r, 10), torch.zeros(len(pairs), r, dtype=torch.bool)
    tokens, token_mask = torch.zeros(len(pairs), t, dtype=torch.long), torch.zeros(len(pairs), t, dtype=torch.bool)
    for i, (reg, tok) in enumerate(pairs):
        regions[i, : len(reg)], region_mask[i, : len(reg)] = reg, True
        tokens[i, : len(tok)], token_mask[i, : len(tok)] = tok, True
    return regions, region_mask, tokens, token_mask


def _model() -> AlignmentModel:
    torch.manual_seed(0)
    return AlignmentModel(AlignmentConfig(vocab_size=20, feature_dim=10, embed_dim=6, word_dim=5, hidden_dim=4,
                                          dropout=0.0))


def _reference(model: AlignmentModel, margin: float, hardest: bool) -> tuple[torch.Tensor, dict]:
    regions, region_mask, tokens, token_mask = _collate(_global_batch())
    v, s = model(regions, region_mask, tokens, token_mask)
    loss = ranking_loss(score(v, region_mask, s, token_mask, "torch"), margin, hardest)
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _local_batch(rank: int) -> tuple[torch.Tensor, ...]:
    return _collate(_global_batch()[rank * PER_RANK:(rank + 1) * PER_RANK])


def _check_plain(rank: int) -> None:
    for margin, hardest in ((1.0, False), (0.5, True)):
        model = _model().double()
        ref_loss, ref_grads = _reference(model, margin, hardest)
        regions, region_mask, tokens, token_mask = _local_batch(rank)
        model.zero_grad()
        v, s = model(regions.double(), region_mask, tokens, token_mask)
        local = alignment_loss(v, region_mask, s, token_mask, margin, hardest, backend="torch")
        local.backward()
        total = local.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, ref_loss)
        for name, param in model.named_parameters():
            grad = param.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, ref_grads[name], msg=f"gradient of {name} (hardest={hardest})")


def _one_sgd_step(rank: int, stage: int, lr: float, max_norm: float = 0.0) -> dict[str, torch.Tensor]:
    """This rank's weights after one DeepSpeed SGD step on its share of the batch; with ``max_norm`` the loop's
    clip runs between the engine's backward and step, as the trainer's does at ZeRO 0."""
    import deepspeed

    model = _model()
    config = {"train_micro_batch_size_per_gpu": PER_RANK, "train_batch_size": PER_RANK * WORLD,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                      config=config)
    regions, region_mask, tokens, token_mask = _local_batch(rank)
    v, s = engine(regions, region_mask, tokens, token_mask)
    engine.backward(alignment_loss(v, region_mask, s, token_mask, 1.0, False, backend="torch") * WORLD)
    if max_norm:
        clip_gradients(engine.module, max_norm)
    engine.step()
    return {name: param.detach() for name, param in engine.module.named_parameters()}


def _check_deepspeed(rank: int) -> None:
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    lr = 0.05
    reference = _model()
    _reference(reference, 1.0, False)
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters()}
    for stage in (0, 1, 2):
        for name, param in _one_sgd_step(rank, stage, lr).items():
            torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6,
                                       msg=f"ZeRO {stage}: {name} after one step")
    # ZeRO 0 as the trainer runs it: DeepSpeed does not clip, the loop clips the averaged gradients
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    max_norm = 0.5 * float(norm)
    clipped = {n: p.detach() - lr * (max_norm / (float(norm) + 1e-6)) * p.grad
               for n, p in reference.named_parameters()}
    for name, param in _one_sgd_step(rank, 0, lr, max_norm).items():
        torch.testing.assert_close(param, clipped[name], rtol=1e-5, atol=1e-6,
                                   msg=f"ZeRO 0, clipped: {name} after one step")


def _worker(rank: int, store_file: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    # A file rendezvous: no TCP port to pick in advance and lose to another process.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        _check_plain(rank)
        _check_deepspeed(rank)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_single_process_loss_is_the_whole_loss() -> None:
    model = _model().double()
    ref_loss, _ = _reference(model, 1.0, False)
    regions, region_mask, tokens, token_mask = _collate(_global_batch())
    v, s = model(regions.double(), region_mask, tokens, token_mask)
    torch.testing.assert_close(alignment_loss(v, region_mask, s, token_mask, backend="torch_chunked"), ref_loss)


def _host_exchange(rank: int, store_file: str) -> None:
    # "cpu:gloo" is not plain "gloo", so the world gets its own host group, as a NCCL world does
    dist.init_process_group("cpu:gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    init_host_group(timedelta(seconds=1))
    assert longest_over_ranks(3 + rank, 7 - rank) == [4, 7]
    if rank == 1:
        time.sleep(4)  # a hung rank
    else:
        start = time.monotonic()
        try:
            longest_over_ranks(1, 2)
        except RuntimeError as exc:
            assert "Timed out" in str(exc), exc
        else:
            raise AssertionError("the exchange with a hung rank returned")
        waited = time.monotonic() - start
        assert waited < 3, f"waited {waited:.1f} s, not the host group's 1 s"
    os._exit(0)  # no orderly teardown of a world whose collective timed out


def test_host_numbers_are_exchanged_with_the_runs_timeout(tmp_path) -> None:
    """The padding lengths go over a gloo group made with distributed.timeout_s (not torch's 30 minutes)."""
    mp.spawn(_host_exchange, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
