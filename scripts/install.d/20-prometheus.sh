#!/usr/bin/env bash
# Debian's Prometheus server and promtool, for the tests that run queries and alert rules against a
# real Prometheus. Skipped when both binaries are already on PATH.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  echo "prometheus already installed: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package starts no daemon we need; tests start their own server on loopback.
$SUDO pkill -x prometheus 2>/dev/null || true
prometheus --version 2>&1 | head -1
