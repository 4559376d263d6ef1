"""The Triton kernels compile for sm_90 without a GPU (triton's bundled ptxas), through benchmarks/kernel_code.py:
the GPU-only code paths the interpreter cannot run (TMA descriptors, register caps, wgmma) must at least build,
keep the MMA in the main loop, not spill, and keep the forward epilogue as lean as it was made -- with the
installed triton and, where .ci/run put it in build/triton-3.6, with triton 3.6, the one PyTorch 2.11 brings
(and the H200 image of docs/benchmarks.md has): the same source compiled to twice the epilogue there once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TRITON_36 = ROOT / "build" / "triton-3.6"  # pip install --no-deps --target build/triton-3.6 triton==3.6.0
TRITONS = [pytest.param(None, id="installed",
                        marks=pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")),
           pytest.param(TRITON_36, id="triton-3.6",
                        marks=pytest.mark.skipif(not (TRITON_36 / "triton").is_dir(), reason=f"no {TRITON_36}"))]


@pytest.mark.parametrize("other_triton", TRITONS)
def test_kernels_compile_for_sm90_lean_and_without_spills(tmp_path, other_triton):
    from dsalign.kernels import maxsim

    forward = {config: i for i, config in enumerate(maxsim.FORWARD_SPACE)}
    picks = [forward[(128, 128, 64, 8, 3, False, False, False)],  # regions as rows, pointer loads
             forward[(128, 64, 64, 4, 3, True, True, False)],  # words as rows, TMA, two blocks per SM
             forward[(128, 128, 64, 8, 3, False, True, False, 128)]]  # register cap
    backward = maxsim.BACKWARD_SPACE.index((128, 128, 64, 8, 3, True))
    out = tmp_path / "code.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_code.py"), "--forward",
                           ",".join(map(str, picks)), "--backward", str(backward), "--argmax", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=_with_triton(other_triton))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert other_triton is None or report["triton"] == "3.6.0"
    rows = report["rows"]
    assert len(rows) == 5
    for row in rows:  # with triton 3.6 the register cap leaves a few values (<= 64 B) to spill around the epilogue
        spill_limit = 64 if other_triton is not None and row["config"][-1] == 128 else 0
        assert row["mma_in_main_loop"] and row["spill_bytes"] <= spill_limit and row["registers"] <= 255, row
    rows_pointer, words_tma, capped = rows[:3]
    # Epilogue instructions per tile (per warp) before the gathered word sums: 12.5k and 3.8k.
    assert rows_pointer["epilogue_per_tile"] < 6000 and words_tma["epilogue_per_tile"] < 3000
    assert words_tma["blocks_per_sm"] >= 2 and capped["registers"] <= 128 and capped["blocks_per_sm"] == 2
    assert 0.3 < words_tma["model_share_of_peak"] < 1


def _with_triton(folder: Path | None) -> dict[str, str]:
    """The environment of a subprocess that imports triton from ``folder`` (None: the installed one)."""
    env = dict(os.environ)
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env
