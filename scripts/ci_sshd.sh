#!/usr/bin/env bash
# What CI needs for tests/test_remote.py: the OpenSSH server and client binaries.
# The tests start their own sshd on 127.0.0.1 at a free port with throwaway host/user keys;
# nothing is configured system-wide except the privilege-separation folder sshd insists on.
set -euo pipefail
if ! command -v /usr/sbin/sshd >/dev/null 2>&1 || ! command -v ssh >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends openssh-server openssh-client
fi
if [ "$(id -u)" = "0" ]; then mkdir -p /run/sshd && chmod 0755 /run/sshd; fi
/usr/sbin/sshd -V 2>&1 || ssh -V
