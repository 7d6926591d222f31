#!/usr/bin/env bash
# `make demo`: apply the formula masterless on this machine and show what a
# nova-compute operator cares about: the connection URI nova-compute will use
# and the domains listed through it, with a real guest running.
#
# Mode: the host libvirtd, managed by the formula (no init system here, so
# this script starts libvirtd from the files the formula rendered).
# Everything lives under $DEMO_DIR (default /var/tmp/nova_libvirt-demo);
# undo with: scripts/demo.sh clean
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO_DIR=${DEMO_DIR:-/var/tmp/nova_libvirt-demo}
SALT_CALL=("$ROOT/.venv/bin/salt-call" -c "$DEMO_DIR/etc" --local)

# value FUNCTION [PYTHON-EXPRESSION on `r`]: one value out of a salt-call return.
value() {
  "${SALT_CALL[@]}" "$1" --out=json | python3 -c "import json,sys; r=next(iter(json.load(sys.stdin).values())); print(${2:-r})"
}

stop_libvirtd() {
  if [ -f "$DEMO_DIR/libvirtd.pid" ] && kill -0 "$(cat "$DEMO_DIR/libvirtd.pid")" 2>/dev/null; then
    virsh -q -c qemu:///system destroy demo-guest >/dev/null 2>&1 || true
    virsh -q -c qemu:///system undefine demo-guest >/dev/null 2>&1 || true
    kill "$(cat "$DEMO_DIR/libvirtd.pid")"
    sleep 1
  fi
}

if [ "${1:-}" = clean ]; then
  stop_libvirtd
  rm -rf "$DEMO_DIR"
  echo "demo: removed $DEMO_DIR"
  exit 0
fi

mkdir -p "$DEMO_DIR"/{etc,pillar,srv}
chmod 700 "$DEMO_DIR"
for part in nova_libvirt _modules _states _runners; do
  [ -d "$part" ] && rm -rf "$DEMO_DIR/srv/$part" && cp -r "$part" "$DEMO_DIR/srv/"
done
cat > "$DEMO_DIR/etc/minion" <<EOF
id: demo-compute
file_client: local
root_dir: $DEMO_DIR/root
file_roots: {base: [$DEMO_DIR/srv]}
pillar_roots: {base: [$DEMO_DIR/pillar]}
EOF
if [ ! -f "$DEMO_DIR/pillar/password" ]; then
  (umask 077; head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40 > "$DEMO_DIR/pillar/password")
fi
printf "base:\n  '*':\n    - nova\n" > "$DEMO_DIR/pillar/top.sls"
(umask 077; cat > "$DEMO_DIR/pillar/nova.sls" <<EOF
nova_libvirt:
  virt_type: auto
  config_dir: $DEMO_DIR/kolla
  listen_address: 127.0.0.1
  container: {enabled: false}
  host:
    manage_daemon: true
    libvirtd_conf: $DEMO_DIR/libvirt/libvirtd.conf
    sasl_conf: $DEMO_DIR/sasl2/libvirt.conf
    service: null
  sasl:
    password: $(cat "$DEMO_DIR/pillar/password")
    sasldb_path: $DEMO_DIR/libvirt/passwd.db
  libvirtd: {log_dir: $DEMO_DIR/log}
EOF
)

echo "== salt-call --local saltutil.sync_all"
"${SALT_CALL[@]}" saltutil.sync_all -l warning >/dev/null
echo "== salt-call --local state.apply nova_libvirt"
"${SALT_CALL[@]}" state.apply nova_libvirt -l warning --state-output=terse

stop_libvirtd
virtlogd -d 2>/dev/null || true
SASL_CONF_PATH="$DEMO_DIR/sasl2" libvirtd -d -f "$DEMO_DIR/libvirt/libvirtd.conf" -p "$DEMO_DIR/libvirtd.pid" --listen
for _ in $(seq 50); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done

virt_type=$(value nova_libvirt.virt_type)
cat > "$DEMO_DIR/guest.xml" <<EOF
<domain type='$virt_type'><name>demo-guest</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>
EOF
virsh -q -c qemu:///system define "$DEMO_DIR/guest.xml" >/dev/null
virsh -q -c qemu:///system start demo-guest >/dev/null

echo "== second apply (expect no changes)"
"${SALT_CALL[@]}" state.apply nova_libvirt -l warning --state-output=terse | tail -4
echo
echo "== what nova-compute gets"
echo "virt_type:       $virt_type ($(value nova_libvirt.settings 'r["virt_type_reason"]'))"
echo "connection_uri:  $(value nova_libvirt.settings 'r["connection_uri"]')"
echo "nova.conf:       $DEMO_DIR/kolla/nova-compute/nova.conf.d/libvirt.conf"
echo "== salt-call nova_libvirt.list_domains (over TCP with SASL, as nova-compute)"
"${SALT_CALL[@]}" nova_libvirt.list_domains --out=yaml
echo
echo "Undo: scripts/demo.sh clean"
