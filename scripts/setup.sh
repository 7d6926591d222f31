#!/usr/bin/env bash
# Install what the formula's demo and tests need on a fresh Debian 12 machine
# (root, no systemd): Debian packages, then the Python environment in .venv.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config  # libvirtd, virsh, libvirt-python's build
  qemu-system-x86 qemu-utils                                    # guests (KVM or TCG)
  sasl2-bin libsasl2-modules db5.3-util                         # saslpasswd2, DIGEST-MD5/SCRAM, db_dump
  gnutls-bin openssl                                            # certtool/virt-pki-validate, openssl verify
  podman runc debootstrap                                       # the nova_libvirt container and its test image
  util-linux iproute2 procps curl ca-certificates
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python requirements into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
