#!/usr/bin/env bash
# Set up edgeprune on a fresh Debian machine with Python 3.11 (run as root or with sudo rights).
#   bash scripts/setup.sh          runtime: Fashion-MNIST data + edgeprune with ONNX Runtime and OpenVINO
#   bash scripts/setup.sh --dev    also the test tools (pytest, hypothesis, hadolint), OpenSSH for the
#                                  remote-target tests and Chromium to render the HTML report
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
pkgs=(dataset-fashion-mnist)
extra="all"
if [ "${1:-}" = "--dev" ]; then pkgs+=(openssh-server openssh-client chromium); extra="dev"; fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "$extra" = "dev" ] && [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd && chmod 0755 /run/sshd; fi
# torch/torchvision are pinned in pyproject.toml's [host] extra (2.14.1 / 0.29.1), part of [all] and [dev]
python3 -m pip install -q --disable-pip-version-check -e ".[${extra}]"
echo "edgeprune $(python3 -c 'import edgeprune; print(edgeprune.__version__)') ready ($extra)"
