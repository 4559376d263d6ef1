"""The Triton kernels compile for sm_90 without a GPU (triton's bundled ptxas), through benchmarks/kernel_code.py:
the GPU-only code paths the interpreter cannot run (TMA descriptors, register caps, wgmma) must at least build,
keep the MMA in the main loop, not spill, and keep the forward epilogue as lean as it was made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
def test_kernels_compile_for_sm90_lean_and_without_spills(tmp_path):
    from dsalign.kernels import maxsim

    forward = {config: i for i, config in enumerate(maxsim.FORWARD_SPACE)}
    picks = [forward[(128, 128, 64, 8, 3, False, False, False)],  # regions as rows, pointer loads
             forward[(128, 64, 64, 4, 3, True, True, False)],  # words as rows, TMA, two blocks per SM
             forward[(128, 128, 64, 8, 3, False, True, False, 128)]]  # register cap
    backward = maxsim.BACKWARD_SPACE.index((128, 128, 64, 8, 3, True))
    out = tmp_path / "code.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_code.py"), "--forward",
                           ",".join(map(str, picks)), "--backward", str(backward), "--argmax", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5
    for row in rows:
        assert row["mma_in_main_loop"] and row["spill_bytes"] == 0 and row["registers"] <= 255, row
    rows_pointer, words_tma, capped = rows[:3]
    # Epilogue instructions per tile (per warp) before the gathered word sums: 12.5k and 3.8k.
    assert rows_pointer["epilogue_per_tile"] < 6000 and words_tma["epilogue_per_tile"] < 3000
    assert words_tma["blocks_per_sm"] >= 2 and capped["registers"] <= 128 and capped["blocks_per_sm"] == 2
    assert 0.3 < words_tma["model_share_of_peak"] < 1
