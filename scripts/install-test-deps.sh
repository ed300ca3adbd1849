#!/usr/bin/env bash
# Installs the real components the test suite runs against, beyond the Python extras:
# the vLLM CPU build (with the CPU torch wheel) and the Prometheus server.
set -euo pipefail
VENV=${1:-.venv}
for part in "$(dirname "$0")"/install.d/*.sh; do
  [ -e "$part" ] || continue
  echo "== $(basename "$part")"
  bash "$part" "$VENV"
done
