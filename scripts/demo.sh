#!/usr/bin/env bash
# `make demo`: apply the formula masterless on this machine in its default
# mode, libvirt in Kolla's nova_libvirt container, and show what a
# nova-compute operator cares about: the container, the connection URI
# nova-compute will use, and the domains listed through it.
#
# Engine: Podman through its Docker Engine API (this machine has no Docker
# engine). Image: Kolla's published one when it can be pulled, else one built
# here offline (test/image/build-image.sh).
#
# Changes on this machine: Debian packages and .venv (scripts/setup.sh),
# Podman's API service, the image, the container nova_libvirt and its five
# volumes, /etc/udev/rules.d/99-kolla-kvm.rules and /dev/kvm's group (kvm
# fix-ups), /lib/modules (created if missing), and $DEMO_DIR.
# Undo: scripts/demo.sh clean (the formula's own cleanup, then $DEMO_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO_DIR=${DEMO_DIR:-/var/tmp/nova_libvirt-demo}
DEFAULT_IMAGE=quay.io/openstack.kolla/nova-libvirt:2026.1-rocky-10
SALT_CALL=("$ROOT/.venv/bin/salt-call" -c "$DEMO_DIR/etc" --local)
URI_PORT=16509

# value FUNCTION [PYTHON-EXPRESSION on `r`]: one value out of a salt-call return.
value() {
  "${SALT_CALL[@]}" "$1" --out=json | python3 -c "import json,sys; r=next(iter(json.load(sys.stdin).values())); print(${2:-r})"
}

write_pillar() {  # write_pillar IMAGE TAG ENABLED
  (umask 077; cat > "$DEMO_DIR/pillar/nova.sls" <<EOF
nova_libvirt:
  virt_type: auto
  config_dir: $DEMO_DIR/kolla
  listen_address: 127.0.0.1
  sasl:
    password: $(cat "$DEMO_DIR/pillar/password")
  # This machine forbids raising hard rlimits: Kolla's 32768/131072 cannot be set.
  qemu: {max_files: 16000, max_processes: 16000}
  container:
    enabled: $3
    engine: podman
    ulimits: {}   # Kolla's 64 MiB memlock is above this machine's hard limit
    image: $1
    tag: $2
  cleanup: {running_vms_fatal: false, remove_volumes: true}
EOF
  )
}

virsh_nova() {  # virsh as nova-compute connects: TCP, SASL credentials from its auth.conf
  LIBVIRT_AUTH_FILE="$DEMO_DIR/kolla/nova-compute/auth.conf" virsh -q -c "qemu+tcp://127.0.0.1:$URI_PORT/system" "$@"
}

if [ "${1:-}" = clean ]; then
  if [ -f "$DEMO_DIR/pillar/image" ]; then
    read -r image tag < "$DEMO_DIR/pillar/image"
    write_pillar "$image" "$tag" false
    echo "== salt-call --local state.apply nova_libvirt.clean (container disabled, volumes removed)"
    "${SALT_CALL[@]}" state.apply nova_libvirt.clean -l warning --state-output=terse
  fi
  rm -rf "$DEMO_DIR"
  echo "demo: removed $DEMO_DIR. Left in place: packages, .venv, Podman's API service and the image."
  exit 0
fi

mkdir -p "$DEMO_DIR"/{etc,pillar,srv}
chmod 700 "$DEMO_DIR"
for part in nova_libvirt _modules _states _runners; do
  rm -rf "${DEMO_DIR:?}/srv/$part" && cp -r "$part" "$DEMO_DIR/srv/"
done
cat > "$DEMO_DIR/etc/minion" <<EOF
id: demo-compute
file_client: local
root_dir: $DEMO_DIR/root
file_roots: {base: [$DEMO_DIR/srv]}
pillar_roots: {base: [$DEMO_DIR/pillar]}
EOF
printf "base:\n  '*':\n    - nova\n" > "$DEMO_DIR/pillar/top.sls"
if [ ! -f "$DEMO_DIR/pillar/password" ]; then
  (umask 077; head -c 60 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40 > "$DEMO_DIR/pillar/password")
fi

echo "== Podman's Docker Engine API"
test/image/podman-setup.sh
echo "== image: $DEFAULT_IMAGE"
if timeout 60 podman pull -q "$DEFAULT_IMAGE" >/dev/null 2>&1; then
  image=${DEFAULT_IMAGE%:*} tag=${DEFAULT_IMAGE##*:}
else
  echo "   cannot be pulled here (no registry is reachable): building the Kolla-compatible image offline"
  built=$(test/image/build-image.sh | tail -n1)
  image=${built%:*} tag=${built##*:}
fi
echo "$image $tag" > "$DEMO_DIR/pillar/image"
write_pillar "$image" "$tag" true

echo "== salt-call --local saltutil.sync_all"
"${SALT_CALL[@]}" saltutil.sync_all -l warning >/dev/null
echo "== salt-call --local state.apply nova_libvirt"
"${SALT_CALL[@]}" state.apply nova_libvirt -l warning --state-output=terse

virt_type=$(value nova_libvirt.virt_type)
cat > "$DEMO_DIR/guest.xml" <<EOF
<domain type='$virt_type'><name>demo-guest</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>
EOF
virsh_nova destroy demo-guest >/dev/null 2>&1 || true
virsh_nova undefine demo-guest >/dev/null 2>&1 || true
virsh_nova define "$DEMO_DIR/guest.xml" >/dev/null
virsh_nova start demo-guest >/dev/null

echo "== second apply: nothing changes, the container is not restarted"
"${SALT_CALL[@]}" state.apply nova_libvirt -l warning --state-output=terse | tail -6
echo
echo "== the container"
podman ps --filter name=nova_libvirt --format '{{.Names}}  {{.Image}}  {{.Status}}'
echo
echo "== what nova-compute gets"
echo "virt_type:       $virt_type ($(value nova_libvirt.settings 'r["virt_type_reason"]'))"
echo "connection_uri:  $(value nova_libvirt.settings 'r["connection_uri"]')"
echo "nova.conf:       $DEMO_DIR/kolla/nova-compute/nova.conf.d/libvirt.conf"
echo
echo "== salt-call nova_libvirt.list_domains (through the container's libvirtd, TCP + SASL, as nova-compute)"
"${SALT_CALL[@]}" nova_libvirt.list_domains --out=yaml
echo
echo "Undo: scripts/demo.sh clean"
