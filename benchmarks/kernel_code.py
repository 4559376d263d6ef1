"""The Triton MaxSim kernels compiled for an sm_90 GPU on any machine, and what their machine code implies.

No GPU needed: triton's own ptxas and nvdisasm (shipped in its wheel) turn each autotuner config into sm_90a code
with the runtime's specialisations (pointers and integers divisible by 16, unit strides constant), at
B = 1024, R = T = 20, D = 1024, bf16. Reported per config: registers and spill bytes per thread, shared memory,
blocks per SM, and instruction counts of the main loop (one step) and, for the forward, of its epilogue (the
per-image part counted once per image of the tile). An issue-bound model estimates the share of the tensor-core
peak: a main-loop step runs at the MMA rate (2*M*N*BLOCK_D FLOP at FLOP_PER_CYCLE_SM) or at its instruction
issue (one instruction per cycle per warp scheduler, 4 per SM), whichever is slower; the forward's epilogue
then issues its instructions the same way, at one block per SM (where two fit, one's epilogue can also hide
behind the other's MMA: ``blocks_per_sm``); only real (image, sentence) products count. The model matched the
H200's measured 25% of its matmul for the first forward epilogue (docs/benchmarks.md); it is a guide for
choosing what to time, not a measurement. Without a GPU this is also the compile check of the GPU code paths
(TMA, register caps, padded tiles) that the interpreter cannot run.

    python benchmarks/kernel_code.py [--forward all|I,J,...] [--backward all|none|I,...] [--argmax 0,1] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret: set before triton is imported

import triton  # noqa: E402
from dsalign.kernels import maxsim  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

B, R, T, D = 1024, 20, 20, 1024
R_P = T_P = 32
FLOP_PER_CYCLE_SM = 989.4e12 / 132 / 1.98e9  # dense bf16 tensor cores of an H100/H200 SXM SM, per cycle
SCHEDULERS_PER_SM = 4
REGISTERS_PER_SM, SHARED_PER_SM, SHARED_RESERVED = 65536, 233472, 1024  # sm_90; the driver keeps 1 KiB a block
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _signature(fn, pointers: dict[str, str], ints: dict[str, int], constexprs: dict) -> ASTSource:
    """The source with the specialisations triton's launcher would pick for these arguments."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            if pointers[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, attrs=attrs,
                     constexprs={(fn.arg_names.index(name),): value for name, value in consts.items()})


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """Registers and spill-store bytes per thread, from ptxas -v on the PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        log = subprocess.run([str(TOOLS / "ptxas"), "-v", "-arch=sm_90a", handle.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    return (int(re.search(r"Used (\d+) registers", log).group(1)),
            int(re.search(r"(\d+) bytes spill stores", log).group(1)))


def _instructions(cubin: bytes) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """(address, opcode) of every instruction, and the (start, end) address of every loop (backward branch)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", handle.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(handle.name)
    code, labels, pending = [], {}, []
    for line in sass.splitlines():
        if label := re.match(r"\s*\.L_x_(\d+):", line):
            pending.append(label.group(1))
        elif match := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            address = int(match.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            text = match.group(2)
            code.append((address, text))
    loops = [(labels[target.group(1)], address) for address, text in code
             if (target := re.search(r"BRA.*\.L_x_(\d+)", text)) and labels.get(target.group(1), address) < address]
    ops = [(address, (text.split()[1] if text.startswith("@") else text.split()[0]).split(".")[0])
           for address, text in code]
    return ops, loops


def _count(ops: list[tuple[int, str]], start: int, end: int) -> collections.Counter:
    return collections.Counter(op for address, op in ops if start <= address <= end)


def inspect(fn, pointers: dict, ints: dict, constexprs: dict, num_warps: int, num_stages: int,
            maxnreg: int | None) -> dict:
    """Compile one config for sm_90a and split its instructions into main loop and what follows it."""
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(_signature(fn, pointers, ints, constexprs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    registers, spill_bytes = _ptxas_usage(kernel.asm["ptx"])
    ops, loops = _instructions(kernel.asm["cubin"])
    with_mma = sorted((loop for loop in loops if _count(ops, *loop)["HGMMA"]), key=lambda loop: loop[1] - loop[0])
    main = with_mma[0] if with_mma else (0, -1)
    after = [loop for loop in loops if loop[0] > main[1]]
    body = max(after, key=lambda loop: loop[1] - loop[0], default=None)
    tail = sum(1 for address, _ in ops if address > main[1])
    body_count = sum(_count(ops, *body).values()) if body else 0
    blocks = min(REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * num_warps),
                 SHARED_PER_SM // (kernel.metadata.shared + SHARED_RESERVED))
    return {"registers": registers, "spill_bytes": spill_bytes, "shared_bytes": kernel.metadata.shared,
            "blocks_per_sm": blocks, "mma_in_main_loop": bool(with_mma), "main_loop": sum(_count(ops, *main).values()),
            "epilogue_loop": body_count, "epilogue_rest": tail - body_count}


def forward(config: tuple, store_argmax: bool) -> dict:
    bm, bn, bd, warps, stages, rows, tma, pad, *cap = config
    m, n = maxsim._tile_side(bm, R_P), maxsim._tile_side(bn, T_P)
    pointers = {"V": "*bf16", "VM": "*u8", "VH": "*u8", "W": "*bf16", "WM": "*u8", "S": "*fp32", "A": "*i8"}
    constexprs = {"R_P": R_P, "T_P": T_P, "UPCAST": False, "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
                  "BLOCK_D": bd, "WORDS_AS_ROWS": rows, "USE_TMA": tma, "PAD_REGIONS": pad,
                  "STORE_ARGMAX": store_argmax, "GROUP": 8}
    if tma:
        pointers.update(V_DESC=f"tensordesc<bf16[{m}, {bd}]>", W_DESC=f"tensordesc<bf16[{n}, {bd}]>")
    else:
        constexprs.update(V_DESC=None, W_DESC=None)
    ints = {"n_img": B, "n_sent": B, "R": R, "T": T, "D": D, "s_vb": R * D, "s_vr": D, "s_vd": 1, "s_wb": T * D,
            "s_wt": D, "s_wd": 1, "s_sb": B, "s_ss": 1}
    report = inspect(maxsim._maxsim_fwd_kernel, pointers, ints, constexprs, warps, stages, cap[0] if cap else None)
    images = m // R_P if pad else m // R
    mma = 2 * m * n * bd / FLOP_PER_CYCLE_SM
    main_cycles = (D // bd) * max(mma, report["main_loop"] * warps / SCHEDULERS_PER_SM)
    epilogue = report["epilogue_loop"] * (0 if pad else images) + report["epilogue_rest"]
    useful = images * R * (n // T) * T / (m * n)
    report.update(config=list(config), store_argmax=store_argmax, epilogue_per_tile=epilogue,
                  model_share_of_peak=useful * (D // bd) * mma
                  / (main_cycles + epilogue * warps / SCHEDULERS_PER_SM))
    return report


def backward(kind: str, config: tuple) -> dict:
    bm, bn, bd, warps, stages, pad = config
    rows = R if kind == "dv" else T
    pointers = {"W": "*bf16", "V": "*bf16", "C": "*bf16", "A": "*i8", "DV": "*bf16", "DW": "*bf16"}
    constexprs = {"R_P": R_P, "T_P": T_P, "UPCAST": False, "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
                  "BLOCK_D": bd, "PAD_REGIONS": pad}
    ints = {"n_img": B, "n_sent": B, "R": R, "T": T, "D": D, "s_wb": T * D, "s_wt": D, "s_wd": 1, "s_vb": R * D,
            "s_vr": D, "s_vd": 1, "s_db": rows * D, "s_dr": D, "s_dt": D, "s_dd": 1}
    fn = maxsim._maxsim_bwd_dv_kernel if kind == "dv" else maxsim._maxsim_bwd_dw_kernel
    report = inspect(fn, pointers, ints, constexprs, warps, stages, None)
    # One main-loop step multiplies the one-hot tile (M region rows x N word columns) by BLOCK_D features; its
    # real part is the tile's images x R rows by its sentences x T columns.
    m, n = maxsim._tile_side(bm, R_P), maxsim._tile_side(bn, T_P)
    mma = 2 * m * n * bd / FLOP_PER_CYCLE_SM
    useful = (m // R_P if pad else m // R) * R * (n // T) * T / (m * n)
    return {"kernel": f"backward_{kind}", "config": list(config), **report,
            "model_share_of_peak": useful * mma / max(mma, report["main_loop"] * warps / SCHEDULERS_PER_SM)}


def _indices(text: str, space: list) -> list[int]:
    if text == "all":
        return list(range(len(space)))
    return [] if text == "none" else [int(i) for i in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward", default="all", help="indices into FORWARD_SPACE, 'all' or 'none'")
    parser.add_argument("--backward", default="all", help="indices into BACKWARD_SPACE, 'all' or 'none'")
    parser.add_argument("--argmax", default="0,1", help="forward variants: 0 without the argmax, 1 with it")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernel_code_sm90.json")
    args = parser.parse_args()
    try:
        rows = [forward(maxsim.FORWARD_SPACE[i], flag == "1") for flag in args.argmax.split(",")
                for i in _indices(args.forward, maxsim.FORWARD_SPACE)]
        rows += [backward(kind, maxsim.BACKWARD_SPACE[i]) for i in _indices(args.backward, maxsim.BACKWARD_SPACE)
                 for kind in ("dv", "dw")]
    except (IndexError, ValueError) as err:
        sys.exit(f"kernel_code: bad --forward/--backward/--argmax ({err})")
    for row in rows:
        name = "forward" + (" +argmax" if row.get("store_argmax") else "") if "kernel" not in row else row["kernel"]
        model = f" model {row['model_share_of_peak']:.0%} of peak" if "model_share_of_peak" in row else ""
        epilogue = f" epilogue {row['epilogue_per_tile']}" if "epilogue_per_tile" in row else ""
        print(f"{name:>15} {str(tuple(row['config'])):<48} regs {row['registers']:3d} spill {row['spill_bytes']:4d} B "
              f"smem {row['shared_bytes'] // 1024:3d} KiB blocks/SM {row['blocks_per_sm']} main loop "
              f"{row['main_loop']:4d}{epilogue}{model}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"target": "sm_90a", "triton": triton.__version__, "B": B, "R": R, "T": T,
                                    "D": D, "dtype": "bfloat16", "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
