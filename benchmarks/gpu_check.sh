#!/usr/bin/env bash
# One-shot check on a CUDA machine, in priority order, each step under its own time limit:
#   1. the machine (nvidia-smi, torch/triton versions);
#   2. the Triton MaxSim kernel and the score op against their references on CUDA (pytest);
#   3. benchmarks/bench_score.py (GPU part);
#   4. dsalign._C built with its CUDA sources (in the background from the start), and the CUDA Viterbi tests;
#   5. bench_decode.py --device cuda, then bench_train.py (bf16);
#   6. feature extraction on the GPU with worker processes: its CUDA test, bench_features.py --device cuda.
# Everything lands in OUT_DIR (default benchmarks/out/gpu): gpu_check.log and the benchmark JSONs, which a
# run stopped early still holds up to its last measured row. Assumes torch with CUDA, triton and pytest are
# importable; the wheels in .whl/ (benchmarks/gpu_wheels.sh: deepspeed, webdataset, the backbone, for
# bench_train) are installed first into a folder on PYTHONPATH when present (carry .whl with the tree).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [STEPS]
#     STEPS: comma list of env,tests,score,viterbi,decode,train,features
# Limits: TESTS_LIMIT, SCORE_LIMIT, TRAIN_LIMIT, FEATURES_LIMIT (seconds); extra arguments: SCORE_ARGS, TRAIN_ARGS;
# TRAIN_AUTOTUNE=0 trains on one Triton config (no autotuning inside the timed runs).
# On an H200 (2026-11-30): tests ~2 min (with 13 forward and 8 backward configs; 25 and 13 now, and the tests
# run the backward both as one-hot GEMMs and as the fused kernels), bench_score ~2 min per dtype (fp32's
# B = 4096 rows take longest; a triton_fused_bwd row per size since), the Viterbi build ~1 min in the
# background, bench_train ~30 s (one trainer run then; one per --workers count now). With the larger search
# spaces, split a 15-minute device budget into two calls of <= 10 minutes, e.g.:
#   SCORE_ARGS="--dtypes bf16" bash benchmarks/gpu_check.sh "$OUT" env,tests,score
#   TRAIN_AUTOTUNE=0 TRAIN_ARGS="--steps 20 --images 300 --trainer-steps 30 --trainer-timeout 60 --workers 0,4" \
#   bash benchmarks/gpu_check.sh "$OUT" viterbi,train
set -u
out=${1:-benchmarks/out/gpu}
steps=${2:-env,tests,score,viterbi,decode,train,features}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/dsalign-site
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        >>"$log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$site" || echo "=== wheels from .whl/ not installed" | tee -a "$log"
fi
# The source tree imports as installed: dsalign.kernels lives in kernels/ (setup.py's package_dir).
[ -e dsalign/kernels ] || ln -s ../kernels dsalign/kernels

wanted() { [[ ",$steps," == *",$1,"* ]]; }

step() {  # step NAME SECONDS CMD...: run with a limit, append to the log, report rc and time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
    return $rc
}

if wanted env; then
    step env 60 bash -c "nvidia-smi; $py -c 'import torch, triton; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name(), torch.version.cuda)'; nproc; free -g"
fi
if wanted viterbi; then  # compile in the background while the kernel tests run
    (MAX_JOBS=${MAX_JOBS:-12} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DSALIGN_BUILD_CUDA=1 \
        timeout 400 $py setup.py -q build_ext --inplace >"$out/build.txt" 2>&1; echo "build rc=$?" >>"$out/build.txt") &
    build=$!
fi
if wanted tests; then
    DSALIGN_TRITON_AUTOTUNE=0 step tests "${TESTS_LIMIT:-270}" $py -m pytest -q -x -p no:cacheprovider \
        tests/test_score_triton.py tests/test_score.py
fi
if wanted score; then
    step score "${SCORE_LIMIT:-360}" $py benchmarks/bench_score.py --out "$out/score_cuda.json" ${SCORE_ARGS:-}
fi
if wanted viterbi; then
    wait "$build"
    cat "$out/build.txt" >>"$log" && rm "$out/build.txt"
    # CUDA against CPU first: on 2026-11-30 a bad-input test crashed the process (segfault) before these ran;
    # the toolchain and the libraries the op links decide whether a C++ exception can cross into torch.
    step toolchain 30 bash -c "command -v c++ g++; g++ --version | head -1; ldd dsalign/_C*.so; \
        strings dsalign/_C*.so | grep -o 'GLIBCXX_3\.4\.[0-9]*' | sort -uV | tail -1; \
        $py -c 'import torch; print(torch.__config__.show().splitlines()[1:4])'"
    # The smallest bad input, alone: does a TORCH_CHECK thrown inside dsalign._C reach Python as an error?
    step throw 30 $py -X faulthandler -c "import torch; from dsalign.ops import viterbi; viterbi(torch.zeros(1, 2, 3), [5], [3], 1.0)"
    step viterbi 90 $py -m pytest -q -p no:cacheprovider tests/test_viterbi.py -k cuda
    step viterbi_rest 90 $py -m pytest -q -p no:cacheprovider tests/test_viterbi.py tests/test_snippet_align.py \
        -k "not cuda"
fi
if wanted decode; then
    step decode 90 $py benchmarks/bench_decode.py --device cuda --out "$out/decode_cuda.json"
fi
if wanted train; then
    DSALIGN_TRITON_AUTOTUNE=${TRAIN_AUTOTUNE:-1} step train "${TRAIN_LIMIT:-180}" $py benchmarks/bench_train.py --out "$out/train_cuda.json" ${TRAIN_ARGS:-}
fi
if wanted features; then  # Flickr8k from ../shared when the tree has it, else shapes scenes at 224 px
    step features "${FEATURES_LIMIT:-150}" bash -c "$py -m pytest -q -p no:cacheprovider tests/test_features_extract.py \
        -k cuda && $py benchmarks/bench_features.py --device cuda --threads 4 --workers 8 --feed-workers 0,4,8,14 \
        --images 1024 --chunk 256 --crop-images 64 --out $out/features_cuda.json"
fi
echo "=== done" | tee -a "$log"
