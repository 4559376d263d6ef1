#!/usr/bin/env bash
# Create a virtual environment with everything dsalign needs and install dsalign into it (editable),
# compiling dsalign._C: C++ always, plus the CUDA sources when a CUDA toolkit is found (nvcc / CUDA_HOME).
#
#   bash scripts/setup.sh            # -> .venv
#   DSALIGN_VENV=/path/env bash scripts/setup.sh
#
# torch is pinned in the same pip command as deepspeed: otherwise pip resolves deepspeed's bare `torch`
# requirement to the newest multi-GB CUDA wheel. On a GPU cluster, install your site's CUDA torch first
# and set DSALIGN_TORCH="" to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${DSALIGN_VENV:-.venv}
TORCH=${DSALIGN_TORCH-"torch==2.14.1 torchvision==0.29.1"}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip "setuptools>=77" wheel
# shellcheck disable=SC2086  # TORCH is a list of requirement specifiers
$PIP install --quiet $TORCH "deepspeed==0.19.8" ninja pybind11
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
MAX_JOBS=${MAX_JOBS:-2} $PIP install --quiet --no-build-isolation -e ".[train,features,eval,dev]"
"$VENV/bin/python" -c "import dsalign, dsalign.ops; print('dsalign', dsalign.__version__, 'installed in $VENV')"
