"""Potts-chain Viterbi: the compiled op (CPU) vs a vectorised torch O(N·M²) solver vs a plain Python loop.

For B in {1e3, 1e4, 1e5} sentence-image pairs with N = 20 words and M = 20 regions (float32), each
implementation is first checked to give exactly the same labels as the extension, then timed (min and median
of at least --repeats runs, wall clock). The Python loop runs on the first --python-subset pairs only and its time is
scaled per sequence to the full batch (reported as an estimate). A last row times a ragged batch (random
n_words in [5, N], n_regions in [10, M]) at the largest B.

The unaries are standard normals rounded to multiples of 1/64 in [-4, 4] and beta = 0.5: every partial sum is
then exact in float32, so the float64 Python loop does the same arithmetic as the float32 solvers and exact
agreement is a fair check (ties do occur). The references live in tests/viterbi_reference.py. Writes JSON.

    python benchmarks/bench_viterbi.py [--out FILE] [--sizes 1000,10000,100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from dsalign.ops import viterbi
from dsalign.ops.viterbi import extension_available

ROOT = Path(__file__).resolve().parents[1]
N_WORDS = N_REGIONS = 20
Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _load_references():
    path = ROOT / "tests" / "viterbi_reference.py"
    spec = importlib.util.spec_from_file_location("viterbi_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_batch(B: int, ragged: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unary = (torch.randn(B, N_WORDS, N_REGIONS, generator=g) * 64).round().clamp(-256, 256) / 64
    if ragged:
        n_words = torch.randint(5, N_WORDS + 1, (B,), generator=g)
        n_regions = torch.randint(10, N_REGIONS + 1, (B,), generator=g)
    else:
        n_words = torch.full((B,), N_WORDS)
        n_regions = torch.full((B,), N_REGIONS)
    return unary, n_words, n_regions


def timed(fn: Solver, args: tuple, repeats: int, min_time: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Runs fn at least `repeats` times and until `min_time` seconds have passed (at most 100 runs)."""
    times: list[float] = []
    out = None
    while len(times) < repeats or (sum(times) < min_time and len(times) < 100):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return out, times


def run_size(B: int, ragged: bool, beta: float, repeats: int, min_time: float, subset: int, refs) -> dict:
    unary, n_words, n_regions = make_batch(B, ragged)
    args = (unary, n_words, n_regions, beta)
    ext_out, ext_t = timed(viterbi, args, repeats, min_time)
    ref_out, ref_t = timed(refs.viterbi_torch, args, repeats, min_time)
    if not torch.equal(ext_out, ref_out):
        bad = (ext_out != ref_out).any(1).nonzero().flatten()[:5].tolist()
        raise SystemExit(f"B={B}: extension and torch reference disagree (first sequences: {bad})")
    row = {
        "B": B,
        "ragged": ragged,
        "cells": int((n_words * n_regions).sum()),
        "extension_s": {"min": min(ext_t), "median": statistics.median(ext_t), "runs": len(ext_t)},
        "torch_s": {"min": min(ref_t), "median": statistics.median(ref_t), "runs": len(ref_t)},
        "python_s": None,
    }
    if not ragged:
        k = min(subset, B)
        sub = (unary[:k], n_words[:k], n_regions[:k], beta)
        py_out, py_t = timed(refs.viterbi_python, sub, 1)
        if not torch.equal(py_out, ext_out[:k]):
            raise SystemExit(f"B={B}: extension and Python loop disagree on the first {k} sequences")
        row["python_s"] = {"estimate": py_t[0] * B / k, "measured_on": k}
    row["speedup_vs_torch"] = row["torch_s"]["min"] / row["extension_s"]["min"]
    if row["python_s"]:
        row["speedup_vs_python"] = row["python_s"]["estimate"] / row["extension_s"]["min"]
    row["extension_ns_per_cell"] = row["extension_s"]["min"] / row["cells"] * 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "viterbi.json")
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated batch sizes B")
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed runs per implementation")
    parser.add_argument("--min-time", type=float, default=1.0, help="keep repeating cheap runs up to this many s")
    parser.add_argument("--python-subset", type=int, default=200, help="sequences timed with the Python loop")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if not extension_available():
        raise SystemExit("dsalign._C is not built: pip install --no-build-isolation -e .")
    if args.threads:
        torch.set_num_threads(args.threads)
    refs = _load_references()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    viterbi(*make_batch(64, False)[:3], args.beta)  # warm-up (thread pool)

    rows = [run_size(B, False, args.beta, args.repeats, args.min_time, args.python_subset, refs) for B in sizes]
    rows.append(run_size(max(sizes), True, args.beta, args.repeats, args.min_time, args.python_subset, refs))

    print(
        f"Potts-chain Viterbi, N={N_WORDS} words, M={N_REGIONS} regions, float32, beta={args.beta}, "
        f"{torch.get_num_threads()} threads, {_cpu_model()}"
    )
    print(
        "All three implementations gave identical labels before timing. Times: min over >= "
        f"{args.repeats} runs (more for cheap ones, up to {args.min_time:g} s); Python loop timed once on "
        f"{args.python_subset} sequences and scaled per sequence (est.)."
    )
    header = (
        f"{'B':>8} {'ragged':>6} {'extension':>11} {'torch O(NM^2)':>14} {'python (est.)':>14} "
        f"{'x torch':>8} {'x python':>9} {'ns/cell':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        py = f"{r['python_s']['estimate'] * 1e3:11.1f} ms" if r["python_s"] else f"{'-':>14}"
        xpy = f"{r['speedup_vs_python']:9.0f}" if r["python_s"] else f"{'-':>9}"
        print(
            f"{r['B']:>8} {'yes' if r['ragged'] else 'no':>6} {r['extension_s']['min'] * 1e3:8.2f} ms "
            f"{r['torch_s']['min'] * 1e3:11.1f} ms {py} {r['speedup_vs_torch']:8.1f} {xpy} "
            f"{r['extension_ns_per_cell']:8.2f}"
        )

    result = {
        "benchmark": "viterbi",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "N": N_WORDS,
        "M": N_REGIONS,
        "dtype": "float32",
        "beta": args.beta,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "data": "standard normal rounded to 1/64 in [-4, 4] (exact float32 sums); ragged row: n_words U[5,20], "
        "n_regions U[10,20]",
        "python_loop": f"timed on the first {args.python_subset} sequences, scaled per sequence",
        "checked_identical": True,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
