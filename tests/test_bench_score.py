"""benchmarks/bench_score.py's GPU suite, run on CPU under the Triton interpreter at toy sizes (so a device
session does not discover a broken script), and its target arithmetic on known rows."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_score.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_score", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_targets_from_rows(bench):
    def row(backend, kind, n, ms, tflops=0.0):
        return {"backend": backend, "pass": kind, "B": n, "D": 1024, "dtype": "bfloat16", "ms": ms,
                "tflops": tflops}

    rows = [row("torch", "fwd+bwd", 1024, 60.0), row("triton", "fwd+bwd", 1024, 10.0),
            row("triton_fused_bwd", "fwd+bwd", 1024, 20.0), row("triton", "fwd", 4096, 70.0, tflops=200.0),
            row("triton", "fwd+bwd", 256, 1.0)]
    targets = {t["name"].split(",")[0]: t for t in bench.gpu_targets(rows, ceiling_tflops=800.0)}
    assert targets["triton fwd+bwd speed-up over naive"]["value"] == pytest.approx(6.0)
    assert targets["triton fwd+bwd speed-up over naive"]["met"]
    assert targets["triton_fused_bwd fwd+bwd speed-up over naive"]["value"] == pytest.approx(3.0)
    assert not targets["triton_fused_bwd fwd+bwd speed-up over naive"]["met"]
    share = targets["triton fwd share of the bf16 matmul ceiling"]
    assert share["value"] == pytest.approx(0.25) and not share["met"]
    assert bench.gpu_targets(rows[1:], 800.0)[0]["name"].startswith("triton fwd share")  # no naive row


@pytest.mark.usefixtures("one_torch_thread")
def test_gpu_suite_runs_every_backend_checked(bench, monkeypatch):
    monkeypatch.setattr(bench, "CHECK_BATCH", 6)  # the interpreter takes seconds per 64 x 67 check
    args = argparse.Namespace(suite="gpu", sizes=[8], dims=[24], dtypes=["bf16"], repeats=1)
    saved = []
    report = bench.run(args, saved.append)
    assert saved and not report["failed_checks"]
    rows = {(r["backend"], r["pass"]) for r in report["results"]}
    assert rows == {("torch", "fwd"), ("torch", "fwd+bwd"), ("torch_chunked", "fwd"),
                    ("torch_chunked", "fwd+bwd"), ("triton", "fwd"), ("triton", "fwd+bwd"),
                    ("triton_fused_bwd", "fwd+bwd")}
    by_backend = {r["backend"]: r for r in report["results"] if r["pass"] == "fwd+bwd"}
    # The default triton backward is the one-hot GEMMs: the fused backward kernels run only in their own row.
    assert by_backend["triton"]["configs"]["backward_dv"] is None
    assert by_backend["triton_fused_bwd"]["configs"]["backward_dv"] is not None
    assert report["targets"] == []  # no B = 1024 / 4096 rows at toy sizes
