#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the project's dependencies, and builds and installs
# evomask from this checkout. Idempotent: rerun it after changing C++/CUDA or Python sources.
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter
#   EVOMASK_CUDA=OFF bash scripts/setup.sh      # force a CPU-only build (AUTO / ON / OFF); saves most
#                                               # of the build on a machine with nvcc but no GPU
#   TORCH_CUDA_ARCH_LIST=9.0 bash scripts/setup.sh   # only your GPU's architecture (default 8.0;9.0+PTX)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.2"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip 2>/dev/null || true
if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  pip install -q $TORCH_SPEC
fi
echo "[setup] installing build and runtime dependencies"
pip install -q scikit-build-core ninja "cmake>=3.26" numpy \
  pytest scipy scikit-learn fastcluster hypothesis \
  "timm>=1.0" tqdm tensorboard matplotlib scikit-image pillow transformers
# lightly's format is tested against its own helpers; --no-deps keeps it from replacing torch or
# pulling pytorch-lightning (lightly.models.utils needs neither).
pip install -q --no-deps "lightly>=1.5"
echo "[setup] building evomask (CMake + scikit-build-core; a few minutes with the CUDA kernels)"
pip install -q --no-build-isolation --no-deps --force-reinstall .
python -P -c "import evomask_ext as e; print('[setup] evomask', e.__version__, 'kernels:', e.kernel_sources())"
