"""Image-sentence score (MaxSim) backends: time, throughput and peak memory, each checked first.

On CPU: ``torch`` (naive einsum + masked max + sum, the 4-D similarity tensor in memory) vs ``torch_chunked``
at B in {128, 512}, D = 1024, with issue 4's targets (chunked <= 1/10 of the peak memory at B = 512, <= 1.2x
the time) computed and printed. On CUDA: naive ``torch``, ``torch_chunked`` and the fused ``triton`` kernel for
B in {256, 1024, 4096} (images = sentences), R = T = 20, D in {512, 1024}, fp32 and bf16, forward and
forward+backward, plus a dense bf16 matmul in the same run as the throughput ceiling. ``triton``'s backward is
the one-hot GEMMs (its default); ``triton_fused_bwd`` times forward+backward again with the fused backward
kernels (``DSALIGN_MAXSIM_WORKSPACE_MB=0``). Issue 5's targets are computed and printed: triton fwd+bwd >= 5x
the naive einsum at B = 1024, D = 1024, bf16, and triton forward >= 50% of the matmul ceiling at B = 4096.
Each triton row records the config the autotuner picked per kernel and the timings of every config it tried.

Before timing, every backend is checked on a sub-batch of exactly representable inputs (forward and both
gradients; see ``make_inputs``) against the float64 ``torch`` backend (itself tested against a loop-level
reference in tests/test_score.py); on CUDA the full triton forward is also compared with fp32
``torch_chunked``. Times are medians (CUDA events on GPU); TFLOP/s counts the dense-equivalent
2*B_img*B_sent*R*T*D multiply-adds per forward and 3x that for forward+backward (the backward is two GEMMs of
the forward's size), for every backend alike. Configurations whose naive 4-D tensor would not fit are
skipped and listed. Writes JSON.

    python benchmarks/bench_score.py [--out FILE] [--repeats N] [--dtypes bf16,fp32] [--sizes ...] [--dims ...]

The JSON is rewritten after every measured row, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch

from dsalign.ops import score

CPU_SIZES = [128, 512]  # issue 4's CPU targets are stated at B = 512, D = 1024
CPU_DIMS = [1024]
GPU_SIZES = [256, 1024, 4096]
GPU_DIMS = [1024, 512]  # issue 5's targets are at D = 1024: measured first, in case a run is cut short
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
N_REG = N_WRD = 20
CHECK_BATCH = 64
# Max error relative to the largest reference magnitude; bf16 gradients carry bf16 rounding (and dL/dS
# rounded to bf16 in the kernel's backward), TF32 would need ~1e-3 for fp32.
CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
GPU_CHUNK_ELEMS = 1 << 26  # 256 MB fp32 blocks: the GPU needs large einsums to be busy
WORKSPACE_ENV = "DSALIGN_MAXSIM_WORKSPACE_MB"  # read by dsalign.kernels.maxsim at each backward


class Backend(NamedTuple):
    """One kind of row: the score backend it runs, its keyword arguments, environment overrides while it
    runs, and the passes it is timed for."""

    op: str
    kwargs: dict = {}
    env: dict = {}
    passes: tuple[bool, ...] = (False, True)  # backward?


@contextlib.contextmanager
def overridden_env(env: dict) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_inputs(n_img: int, n_sent: int, dim: int, dtype: torch.dtype, device: str, seed: int = 0,
                exact: bool = False):
    """Full region sets (19 boxes + the whole image in the paper) and captions of 5-20 real words.

    exact=True draws multiples of 1/8 in [-1, 1]: every product is a multiple of 1/64 and every partial sum
    (|sum| <= D) is exact in fp32, so the argmax regions do not depend on the order of accumulation. With
    Gaussian inputs, some top-2 gaps are ~4e-4, within the accumulation error of a tensor-core dot over
    D = 512, and one flipped argmax moves a whole dL/dS x w term to another region (0.02-0.2 of the largest
    gradient on the check batch): a disagreement of order, not of correctness.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(n: int, rows: int) -> torch.Tensor:
        if exact:
            return (torch.randint(-8, 9, (n, rows, dim), device=device, generator=gen) / 8).to(dtype)
        return torch.randn(n, rows, dim, device=device, generator=gen).to(dtype)

    regions, words = draw(n_img, N_REG), draw(n_sent, N_WRD)
    region_mask = torch.ones(n_img, N_REG, dtype=torch.bool, device=device)
    lengths = torch.randint(5, N_WRD + 1, (n_sent,), device=device, generator=gen)
    word_mask = torch.arange(N_WRD, device=device)[None, :] < lengths[:, None]
    return regions, region_mask, words, word_mask


def forward_and_grads(backend: str, regions, region_mask, words, word_mask, grad, **kwargs):
    v = regions.detach().clone().requires_grad_()
    w = words.detach().clone().requires_grad_()
    s = score(v, region_mask, w, word_mask, backend=backend, **kwargs)
    s.backward(grad.to(s.dtype))
    return s.detach(), v.grad, w.grad


def max_rel_err(got: tuple, want: tuple) -> float:
    return max(((g.double() - x).abs().max() / x.abs().max().clamp_min(1.0)).item()
               for g, x in zip(got, want))


def check(backend: Backend, dim: int, dtype: torch.dtype, device: str) -> float:
    """Forward and both gradients on a CHECK_BATCH sub-problem vs the float64 torch backend."""
    inputs = make_inputs(CHECK_BATCH, CHECK_BATCH + 3, dim, dtype, device, seed=1, exact=True)
    grad = torch.randn(CHECK_BATCH, CHECK_BATCH + 3, device=device, dtype=torch.float64,
                       generator=torch.Generator(device=device).manual_seed(2))
    want = forward_and_grads("torch", *(x.double() if x.is_floating_point() else x for x in inputs), grad)
    with overridden_env(backend.env):
        return max_rel_err(forward_and_grads(backend.op, *inputs, grad, **backend.kwargs), want)


@torch.no_grad()
def full_forward_error(inputs: tuple) -> float:
    """The triton forward at full size (all tiles, large indices) vs fp32 torch_chunked."""
    want = score(*(x.float() if x.is_floating_point() else x for x in inputs), backend="torch_chunked",
                 chunk_elems=GPU_CHUNK_ELEMS)
    return max_rel_err((score(*inputs, backend="triton"),), (want.double(),))


class Timer:
    """Median time of a callable in ms: CUDA events on GPU, wall clock on CPU.

    On CPU the median process CPU time (all threads) is kept too in ``last_cpu_ms``: on a shared machine
    it moves far less than wall time when other jobs compete for the cores.
    """

    def __init__(self, device: str, repeats: int) -> None:
        self.device, self.repeats = device, repeats
        self.last_cpu_ms: float | None = None

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # warm-up (and Triton autotuning)
        times, cpu_times = [], []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                cpu_times.append((time.process_time() - c0) * 1e3)
        self.last_cpu_ms = statistics.median(cpu_times) if cpu_times else None
        return statistics.median(times)


def _rss_peak_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _rss_now_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def release_freed_cpu_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so that a call re-faulting them shows in
    peak RSS instead of hiding in pages kept from earlier calls. False where that is unavailable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory above what was allocated before the call (CUDA allocator; Linux peak RSS on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not release_freed_cpu_memory():
        return None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS counter (VmHWM)
    except OSError:
        return None
    base = _rss_now_kb()
    fn()
    return (_rss_peak_kb() - base) / 1024


def matmul_ceiling(device: str, timer: Timer) -> dict:
    """Dense GEMM throughput in this run: bf16 8192^3 on GPU, fp32 1024^3 on CPU (no fast CPU bf16 here)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(lambda: a @ b)
    return {"op": f"matmul {n}x{n}x{n}", "dtype": str(dtype).removeprefix("torch."), "ms": ms,
            "tflops": 2 * n**3 / ms / 1e9}


def naive_bytes(n: int, dim: int, backward: bool) -> int:
    """The torch backend's 4-D fp32 tensors: einsum output + masked copy, and as many again for backward,
    plus fp32 copies of the inputs."""
    return n * n * N_REG * N_WRD * 4 * (4 if backward else 2) + 2 * n * N_REG * dim * 4


def run(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timer = Timer(device, args.repeats)
    if args.suite == "gpu":
        sizes, dims = args.sizes or GPU_SIZES, args.dims or GPU_DIMS
        dtypes = [DTYPES[name] for name in args.dtypes]
        backends = {"torch": Backend("torch"),
                    "torch_chunked": Backend("torch_chunked", {"chunk_elems": GPU_CHUNK_ELEMS}),
                    "triton": Backend("triton"),
                    "triton_fused_bwd": Backend("triton", env={WORKSPACE_ENV: "0"}, passes=(True,))}
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    else:
        sizes, dims, dtypes = args.sizes or CPU_SIZES, args.dims or CPU_DIMS, [torch.float32]
        backends = {"torch": Backend("torch"), "torch_chunked": Backend("torch_chunked")}
        name = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    report = {"benchmark": "score", "date": date.today().isoformat(), "device": name,
              "torch": torch.__version__, "R": N_REG, "T": N_WRD,
              "timing": "median ms" + (" (CUDA events)" if device == "cuda" else ""),
              "ceiling": matmul_ceiling(device, timer), "results": [], "skipped": [], "failed_checks": []}
    print(f"# {name}; ceiling {report['ceiling']['tflops']:.3f} TFLOP/s ({report['ceiling']['op']})")
    for dtype in dtypes:
        for dim in dims:
            errors = {}
            for backend, spec in backends.items():
                errors[backend] = check(spec, dim, dtype, device)
                if errors[backend] > CHECK_TOL[dtype]:
                    report["failed_checks"].append({"backend": backend, "D": dim, "dtype": str(dtype),
                                                    "max_rel_err": errors[backend]})
            for n in sizes:
                inputs = make_inputs(n, n, dim, dtype, device)
                grad = torch.randn(n, n, device=device)
                flops = 2 * n * n * N_REG * N_WRD * dim
                if "triton" in backends:
                    from dsalign.kernels.maxsim import clear_tuning_report
                    clear_tuning_report()  # the tuning reports then cover this size's rows, from its first tuning
                    if (err := full_forward_error(inputs)) > CHECK_TOL[dtype]:
                        report["failed_checks"].append({"backend": "triton", "B": n, "D": dim,
                                                        "dtype": str(dtype), "full_forward_rel_err": err})
                for backend, spec in backends.items():
                    for backward in spec.passes:
                        row = {"B": n, "D": dim, "dtype": str(dtype).removeprefix("torch."),
                               "backend": backend, "pass": "fwd+bwd" if backward else "fwd",
                               "check_max_rel_err": errors[backend]}
                        free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
                        if (backend == "torch" and free is not None
                                and naive_bytes(n, dim, backward) > 0.8 * free):
                            report["skipped"].append({**row, "reason": "naive 4-D tensor would not fit"})
                            continue
                        fn = _step(spec, inputs, grad, backward)
                        try:
                            with overridden_env(spec.env):
                                ms = timer(fn)
                                cpu_ms = timer.last_cpu_ms
                                peak = peak_memory_mb(fn, device)
                        except torch.OutOfMemoryError:
                            report["skipped"].append({**row, "reason": "out of memory"})
                            torch.cuda.empty_cache()
                            continue
                        row.update(ms=ms, tflops=flops * (3 if backward else 1) / ms / 1e9, peak_mem_mb=peak)
                        if spec.op == "triton":  # the autotuner's pick per kernel and what it measured
                            from dsalign.kernels.maxsim import tuned_configs, tuning_timings
                            row["configs"] = tuned_configs()
                            row["tuning_ms"] = tuning_timings()
                        if cpu_ms is not None:
                            row["cpu_ms"] = cpu_ms
                        report["results"].append(row)
                        save(report)
                        cpu = "" if cpu_ms is None else f" (cpu {cpu_ms:7.1f} ms)"
                        print(f"{row['dtype']:>8} D={dim:<5} B={n:<5} {backend:>13} {row['pass']:>7}: "
                              f"{ms:9.2f} ms{cpu} {row['tflops']:8.3f} TFLOP/s peak {_fmt_mb(peak)} "
                              f"check err {errors[backend]:.1e}")
    for skipped in report["skipped"]:
        print(f"skipped: {skipped}")
    if "triton" not in backends:
        report["targets"] = cpu_targets(report["results"], max(sizes), max(dims))
        for target in report["targets"]:
            print(f"target {target['pass']:>7} at B={target['B']}: chunked/torch peak memory "
                  f"{target['memory_ratio']:.3f} (<= 0.1), time {target['time_ratio']:.2f}x (<= 1.2)")
    else:
        report["targets"] = gpu_targets(report["results"], report["ceiling"]["tflops"])
        for target in report["targets"]:
            print(f"target {target['name']}: {target['value']:.3f} (>= {target['goal']}) "
                  f"{'met' if target['met'] else 'NOT met'}")
    return report


def gpu_targets(results: list[dict], ceiling_tflops: float) -> list[dict]:
    """Issue 5's GPU targets from this run's rows (bf16): each triton backend's fwd+bwd speed-up over the naive
    einsum at B = 1024, D = 1024, and the triton forward's share of the matmul ceiling at B = 4096, D = 1024."""
    rows = {(r["backend"], r["pass"], r["B"], r["D"]): r for r in results if r["dtype"] == "bfloat16"}
    targets = []
    naive = rows.get(("torch", "fwd+bwd", 1024, 1024))
    for backend in ("triton", "triton_fused_bwd"):
        if naive and (fast := rows.get((backend, "fwd+bwd", 1024, 1024))):
            targets.append({"name": f"{backend} fwd+bwd speed-up over naive, B=1024 D=1024 bf16",
                            "value": naive["ms"] / fast["ms"], "goal": 5.0})
    if forward := rows.get(("triton", "fwd", 4096, 1024)):
        targets.append({"name": "triton fwd share of the bf16 matmul ceiling, B=4096 D=1024",
                        "value": forward["tflops"] / ceiling_tflops, "goal": 0.5})
    return [{**t, "met": t["value"] >= t["goal"]} for t in targets]


def cpu_targets(results: list[dict], n: int, dim: int) -> list[dict]:
    """Issue 4's CPU targets: torch_chunked uses <= 1/10 of the reference's peak memory at the largest B and is
    no more than 1.2x slower."""
    rows = {(r["backend"], r["pass"]): r for r in results if r["B"] == n and r["D"] == dim}
    targets = []
    for kind in ("fwd", "fwd+bwd"):
        ref, chunked = rows.get(("torch", kind)), rows.get(("torch_chunked", kind))
        if ref and chunked and ref["peak_mem_mb"]:
            targets.append({"B": n, "D": dim, "pass": kind,
                            "memory_ratio": chunked["peak_mem_mb"] / ref["peak_mem_mb"],
                            "time_ratio": chunked["ms"] / ref["ms"]})
    return targets


def _fmt_mb(peak: float | None) -> str:
    return "n/a" if peak is None else f"{peak:9.1f} MB"


def _step(backend: Backend, inputs: tuple, grad: torch.Tensor, backward: bool) -> Callable[[], object]:
    regions, region_mask, words, word_mask = inputs
    if not backward:
        def forward() -> object:
            with torch.no_grad():
                return score(regions, region_mask, words, word_mask, backend=backend.op, **backend.kwargs)
        return forward
    v = regions.detach().clone().requires_grad_()
    w = words.detach().clone().requires_grad_()

    def forward_backward() -> object:
        v.grad = w.grad = None
        score(v, region_mask, w, word_mask, backend=backend.op, **backend.kwargs).backward(grad)
        return v.grad
    return forward_backward


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/score_<cpu|cuda>[_<suite>_suite].json)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", type=lambda text: text.split(","), default=list(DTYPES),
                        help="CUDA only: comma-separated, in the order run (default bf16,fp32)")
    parser.add_argument("--sizes", type=_int_list, default=None, help="batch sizes (default per device)")
    parser.add_argument("--dims", type=_int_list, default=None, help="feature sizes D (default per device)")
    parser.add_argument("--suite", choices=("cpu", "gpu"), default=None,
                        help="which backends and targets (default: gpu on CUDA, else cpu); --suite gpu on CPU "
                             "runs the kernels under the Triton interpreter, a smoke test of this script (use "
                             "small --sizes and --dims)")
    args = parser.parse_args()
    if unknown := [name for name in args.dtypes if name not in DTYPES]:
        parser.error(f"unknown --dtypes {unknown}; choose from {list(DTYPES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    native = "gpu" if device == "cuda" else "cpu"
    args.suite = args.suite or native
    if args.suite == "gpu" and device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    name = f"score_{device}.json" if args.suite == native else f"score_{device}_{args.suite}_suite.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    report = run(args, save)
    save(report)
    print(f"wrote {out}")
    if report["failed_checks"]:
        print(f"FAILED checks: {report['failed_checks']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
