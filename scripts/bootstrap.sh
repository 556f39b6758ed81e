#!/usr/bin/env bash
# Install what symbiont needs on a Debian 12 host, idempotently: Debian packages (only the
# missing ones), a virtual environment in .venv with the project and its test tools (only
# when pyproject.toml changed), and /usr/local/bin links to the two commands.
# Sourced or run by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
  echo "symbiont: run as root (it installs Debian packages, runs libvirtd and boots VMs)" >&2
  exit 2
fi

PKGS=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
  debootstrap criu e2fsprogs pkg-config gcc python3 python3-venv python3-dev
  systemd procps psmisc iproute2 kmod ca-certificates
  vagrant vagrant-libvirt dnsmasq-base ansible ansible-lint python3-libvirt python3-lxml rsync
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "==> Debian packages: all present"
fi

PY=/usr/bin/python3
stamp=".venv/.symbiont-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> Python environment in .venv"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
else
  echo "==> Python environment: up to date"
  # An editable install follows the source tree; nothing to do.
fi
ln -sf "$ROOT/.venv/bin/symbiont" /usr/local/bin/symbiont
ln -sf "$ROOT/.venv/bin/symbiontd" /usr/local/bin/symbiontd
