#!/usr/bin/env bash
# kubectl, for `kubectl kustomize` in the manifest tests (no cluster is contacted).
set -euo pipefail
if command -v kubectl >/dev/null; then
  echo "kubectl already installed: $(kubectl version --client 2>/dev/null | head -1)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends kubectl >/dev/null
kubectl version --client 2>/dev/null | head -1
