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
# The package's own service is not needed (tests start their own server on their own ports); stop
# it where a service manager started it, and leave any other Prometheus alone.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl disable --now prometheus || true
fi
prometheus --version 2>&1 | head -1
