#!/bin/bash
# Smoke test of the nova-libvirt test image, started the Kolla way
# (kolla-ansible nova_libvirt container, SASL over TCP), then used from the
# HOST with virsh: define + start a tiny domain, check it runs, remove it.
# Everything it creates is removed at exit (container, volumes, temp files),
# and /dev/kvm's owner/mode are restored.
#
#   test/image/smoke.sh [IMAGE]          (default localhost/kolla/nova-libvirt:test)
#
# Needs: podman-setup.sh done (API socket), build-image.sh done, virsh on the host.
# Env knobs (defaults = what Kolla does):
#   SMOKE_ENGINE=api|cli   api: python docker client via the Podman Docker API
#                          socket (what salt's docker_container uses); cli: podman run
#   DOCKER_URL             default unix:///run/podman/podman.sock
#   PYTHON                 python with the `docker` package (default <repo>/.venv/bin/python)
#   SMOKE_PORT=16599       libvirtd TCP port (127.0.0.1)
#   SMOKE_CMD              config.json command (default /usr/local/bin/kolla_nova_libvirt_start;
#                          "/usr/sbin/libvirtd --listen" = without the virtlogd sidecar)
#   SMOKE_VIRT_TYPE=kvm    domain type (kvm|qemu)
#   SMOKE_KVM_GID=42427    group given to host /dev/kvm (mode 0660) while the test
#                          runs, like Kolla's udev rule; empty = leave /dev/kvm alone
#   SMOKE_RUN_DIR=auto     host dir mounted at /run (shared). auto: /run, unless a
#                          host libvirtd/virtlogd is running (they would share
#                          /run/libvirt state), then a private dir
#   SMOKE_CGROUPNS=host    cgroupns mode; empty = engine default (salt cannot set it)
#   SMOKE_QEMU_MAX_FILES/SMOKE_QEMU_MAX_PROCESSES  qemu.conf max_files/max_processes
#                          (default 16000: libvirt sets both soft+hard to max_files+1 /
#                          max_processes and cannot raise the container hard limit
#                          16384; Kolla 32768/131072 fail with "cannot limit ...")
#   SMOKE_KEEP=1           keep container/volumes for debugging (no cleanup)
set -euo pipefail

IMAGE=${1:-localhost/kolla/nova-libvirt:test}
NAME=nova_libvirt_smoke
PORT=${SMOKE_PORT:-16599}
ENGINE=${SMOKE_ENGINE:-api}
DOCKER_URL=${DOCKER_URL:-unix:///run/podman/podman.sock}
SMOKE_CMD=${SMOKE_CMD:-/usr/local/bin/kolla_nova_libvirt_start}
VIRT_TYPE=${SMOKE_VIRT_TYPE:-kvm}
KVM_GID=${SMOKE_KVM_GID-42427}
RUN_DIR=${SMOKE_RUN_DIR:-auto}
CGROUPNS=${SMOKE_CGROUPNS-host}
QEMU_MAX_FILES=${SMOKE_QEMU_MAX_FILES:-16000}
QEMU_MAX_PROCESSES=${SMOKE_QEMU_MAX_PROCESSES:-16000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$HERE/../../.venv/bin/python}
VOLUMES=(${NAME}_libvirtd ${NAME}_qemu ${NAME}_logs)
DOMAIN=nova-libvirt-smoke
SASL_USER=nova
SASL_PASS=$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)

log() { echo "smoke: $*" >&2; }
die() { echo "smoke: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
command -v virsh >/dev/null || die "virsh not on the host (apt-get install libvirt-clients)"
podman image exists "$IMAGE" || die "image $IMAGE missing: run test/image/build-image.sh"
if [ "$ENGINE" = api ]; then
    "$PYTHON" -c 'import docker' 2>/dev/null || die "$PYTHON has no docker module (set PYTHON=)"
    curl -fsS --max-time 3 --unix-socket "${DOCKER_URL#unix://}" http://d/_ping >/dev/null \
        || die "no Docker API at $DOCKER_URL: run test/image/podman-setup.sh"
fi

TMP=$(mktemp -d /tmp/nova-libvirt-smoke.XXXXXX)
CFG=$TMP/config
mkdir -p "$CFG"
chmod 0755 "$TMP" "$CFG"
KVM_SAVED=""
MADE_MODULES=""
nsinfo=""
PRIVATE_RUN=""
CONTAINER_PIDS=""

virsh_c() { LIBVIRT_AUTH_FILE=$TMP/auth.conf virsh -c "qemu+tcp://127.0.0.1:$PORT/system" "$@"; }

collect_pids() {   # all processes of the container (pid host: they are host pids)
    local cid cg
    cid=$(podman inspect --format '{{.Id}}' "$NAME" 2>/dev/null) || return 0
    cg=$(find /sys/fs/cgroup/pids -type d -name "*$cid*" 2>/dev/null | head -n1)
    [ -n "$cg" ] && CONTAINER_PIDS=$(cat "$cg"/cgroup.procs "$cg"/*/cgroup.procs 2>/dev/null | sort -u | tr '\n' ' ')
    return 0
}

cleanup() {
    local rc=$?
    set +e
    if [ $rc -ne 0 ]; then
        log "---- container log (tail) ----"
        podman logs --tail 30 "$NAME" >&2 2>&1
        log "---- libvirtd.log (tail) ----"
        podman exec "$NAME" tail -n 30 /var/log/kolla/libvirt/libvirtd.log >&2 2>/dev/null
        podman exec "$NAME" sh -c "tail -n 20 /var/log/libvirt/qemu/$DOMAIN.log" >&2 2>/dev/null
    fi
    if [ -n "${SMOKE_KEEP:-}" ]; then
        log "SMOKE_KEEP set: leaving $NAME, volumes and $TMP; /dev/kvm stays as is"
        exit $rc
    fi
    if podman container exists "$NAME" 2>/dev/null; then
        virsh_c destroy "$DOMAIN" >/dev/null 2>&1
        virsh_c undefine "$DOMAIN" >/dev/null 2>&1
        collect_pids
        podman rm -f -t 5 "$NAME" >/dev/null 2>&1
    fi
    # with pid host a runtime may leave the container's processes behind
    local p
    for p in $CONTAINER_PIDS; do
        if kill -0 "$p" 2>/dev/null; then
            log "killing leftover container process $p ($(tr '\0' ' ' </proc/$p/cmdline 2>/dev/null | cut -c1-60))"
            kill -9 "$p" 2>/dev/null
        fi
    done
    for v in "${VOLUMES[@]}"; do podman volume rm -f "$v" >/dev/null 2>&1; done
    if [ -n "$KVM_SAVED" ]; then
        chown "${KVM_SAVED%% *}" /dev/kvm; chmod "${KVM_SAVED##* }" /dev/kvm
    fi
    [ -n "$MADE_MODULES" ] && rmdir "$MADE_MODULES" 2>/dev/null
    [ -n "$PRIVATE_RUN" ] && rm -rf "$PRIVATE_RUN"
    rm -rf "$TMP"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------- leftovers
if podman container exists "$NAME"; then
    log "removing leftover container $NAME"
    podman rm -f -t 5 "$NAME" >/dev/null
fi
for v in "${VOLUMES[@]}"; do podman volume rm -f "$v" >/dev/null 2>&1 || true; done

# ------------------------------------------------------------- host prerequisites
# Kolla bind-mounts /lib/modules; podman (unlike docker) fails if it is missing
# ("statfs /lib/modules: no such file or directory"), and this VM has none.
if [ ! -e /lib/modules ]; then
    mkdir -p /lib/modules && MADE_MODULES=$(readlink -f /lib/modules)
fi
if [ -n "$KVM_GID" ] && [ -c /dev/kvm ]; then
    KVM_SAVED="$(stat -c '%u:%g %a' /dev/kvm)"
    chgrp "$KVM_GID" /dev/kvm && chmod 0660 /dev/kvm
    log "/dev/kvm -> group $KVM_GID mode 0660 (was $KVM_SAVED; restored at exit)"
fi
host_daemon_running() {
    local f pid
    for f in /run/libvirtd.pid /run/virtlogd.pid; do
        pid=$(cat "$f" 2>/dev/null) || continue
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return 0
    done
    return 1
}
if [ "$RUN_DIR" = auto ]; then
    if host_daemon_running; then
        PRIVATE_RUN=/var/lib/nova-libvirt-smoke-run
        rm -rf "$PRIVATE_RUN"; mkdir -p "$PRIVATE_RUN"
        RUN_DIR=$PRIVATE_RUN
        log "WARNING: a host libvirtd/virtlogd is running; it would share /run/libvirt with"
        log "         the container: mounting private $RUN_DIR at /run instead of /run"
    else
        RUN_DIR=/run
    fi
fi

# ------------------------------------------------------------- kolla config dir
cat >"$CFG/config.json" <<EOF
{
    "command": "$SMOKE_CMD",
    "config_files": [
        {"source": "/var/lib/kolla/config_files/libvirtd.conf", "dest": "/etc/libvirt/libvirtd.conf", "owner": "root", "perm": "0600"},
        {"source": "/var/lib/kolla/config_files/qemu.conf", "dest": "/etc/libvirt/qemu.conf", "owner": "root", "perm": "0600"},
        {"source": "/var/lib/kolla/config_files/sasl.conf", "dest": "/etc/sasl2/libvirt.conf", "owner": "root", "perm": "0600"},
        {"source": "/var/lib/kolla/config_files/auth.conf", "dest": "/root/.config/libvirt/auth.conf", "owner": "root", "perm": "0600"}
    ]
}
EOF
cat >"$CFG/libvirtd.conf" <<EOF
listen_tcp = 1
listen_tls = 0
auth_tcp = "sasl"
tcp_port = "$PORT"
ca_file = ""
log_level = 3
log_outputs = "3:file:/var/log/kolla/libvirt/libvirtd.log"
listen_addr = "127.0.0.1"
max_workers = 50
max_client_requests = 20
EOF
cat >"$CFG/qemu.conf" <<EOF
stdio_handler = "logd"

user = "nova"
group = "nova"

max_files =  $QEMU_MAX_FILES
max_processes =  $QEMU_MAX_PROCESSES
EOF
printf 'mech_list: DIGEST-MD5\nsasldb_path: /etc/libvirt/passwd.db\n' >"$CFG/sasl.conf"
printf '[credentials-default]\nauthname = %s\npassword = %s\n\n[auth-libvirt-default]\ncredentials = default\n' \
    "$SASL_USER" "$SASL_PASS" >"$CFG/auth.conf"
cp "$CFG/auth.conf" "$TMP/auth.conf"
chmod 0600 "$TMP/auth.conf"

# ------------------------------------------------------------- start container
BINDS=(
    "$CFG:/var/lib/kolla/config_files:ro"
    "/lib/modules:/lib/modules:ro"
    "$RUN_DIR:/run:shared"
    "/dev:/dev"
    "/sys/fs/cgroup:/sys/fs/cgroup"
    "${NAME}_logs:/var/log/kolla"
    "${NAME}_libvirtd:/var/lib/libvirt"
    "${NAME}_qemu:/etc/libvirt/qemu"
)
log "starting $NAME from $IMAGE via $ENGINE (run dir $RUN_DIR, cgroupns '${CGROUPNS:-default}')"
T0=$(date +%s)
if [ "$ENGINE" = api ]; then
    "$PYTHON" - "$DOCKER_URL" "$IMAGE" "$NAME" "$CGROUPNS" "${BINDS[@]}" <<'EOF'
import sys, docker
url, image, name, cgroupns, *binds = sys.argv[1:]
c = docker.DockerClient(base_url=url)
for b in binds:               # named volumes first, like docker_volume.present
    src = b.split(":")[0]
    if not src.startswith("/"):
        c.volumes.create(name=src)
# Same call shape as saltext-dockermod's docker_container.running: low-level
# create_container with Binds in host_config and the container paths in
# "volumes".  (docker-py's high-level volumes=["a:b:shared"] puts "b:shared"
# into Volumes, which Podman rejects: 'invalid container path "shared"'.)
hc_kw = dict(binds=binds, privileged=True, network_mode="host", pid_mode="host")
if cgroupns:
    hc_kw["cgroupns"] = cgroupns
api = c.api
cid = api.create_container(
    image, name=name, detach=True,
    environment={"KOLLA_CONFIG_STRATEGY": "COPY_ALWAYS",
                 "KOLLA_SERVICE_NAME": "nova-libvirt"},
    volumes=sorted({b.split(":")[1] for b in binds}),
    host_config=api.create_host_config(**hc_kw),
)["Id"]
api.start(cid)
ctr = c.containers.get(cid)
ctr.reload()
hc = ctr.attrs["HostConfig"]
print("smoke: container %s: Privileged=%s NetworkMode=%s PidMode=%s CgroupnsMode=%s"
      % (ctr.short_id, hc.get("Privileged"), hc.get("NetworkMode"), hc.get("PidMode"),
         hc.get("CgroupnsMode")), file=sys.stderr)
EOF
else
    args=(--name "$NAME" -d --privileged --network host --pid host
          -e KOLLA_CONFIG_STRATEGY=COPY_ALWAYS -e KOLLA_SERVICE_NAME=nova-libvirt)
    [ -n "$CGROUPNS" ] && args+=(--cgroupns "$CGROUPNS")
    for b in "${BINDS[@]}"; do args+=(-v "$b"); done
    podman run "${args[@]}" "$IMAGE" >/dev/null
fi

cpid=$(podman inspect --format '{{.State.Pid}}' "$NAME")
for ns in cgroup pid net mnt; do
    if [ "$(readlink "/proc/$cpid/ns/$ns")" = "$(readlink /proc/self/ns/$ns)" ]; then
        nsinfo+="$ns=host "
    else
        nsinfo+="$ns=private "
    fi
done
log "namespaces of the container: $nsinfo"

# ------------------------------------------------------------- wait like Kolla
# kolla-ansible: "Checking libvirt container is ready" = exec ls /run/libvirtd.pid;
# also wait for the TCP listener (the pid file may be stale on a shared /run)
ready=""
for _ in $(seq 1 60); do
    [ "$(podman inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ] \
        || die "container $NAME is not running"
    if podman exec "$NAME" ls /run/libvirtd.pid >/dev/null 2>&1 \
            && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        ready=1; break
    fi
    sleep 1
done
[ -n "$ready" ] || die "libvirtd in $NAME not listening on 127.0.0.1:$PORT after 60 s"
log "libvirtd ready after $(( $(date +%s) - T0 )) s"
podman exec "$NAME" pgrep -a 'virtlogd|libvirtd' >&2 || true

# ------------------------------------------------------------- SASL user (Kolla handler)
echo "$SASL_PASS" | podman exec -i "$NAME" saslpasswd2 -c -p -a libvirt "$SASL_USER"
podman exec "$NAME" sasldblistusers2 -f /etc/libvirt/passwd.db >&2

# a wrong password must be refused
printf '[credentials-default]\nauthname = %s\npassword = wrong\n\n[auth-libvirt-default]\ncredentials = default\n' \
    "$SASL_USER" >"$TMP/bad.conf"
if LIBVIRT_AUTH_FILE=$TMP/bad.conf virsh -c "qemu+tcp://127.0.0.1:$PORT/system" version >/dev/null 2>&1; then
    die "libvirtd accepted a wrong SASL password"
fi
log "wrong SASL password refused (ok)"

# ------------------------------------------------------------- use it from the host
virsh_c version >&2
cat >"$TMP/domain.xml" <<EOF
<domain type='$VIRT_TYPE'>
  <name>$DOMAIN</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><console type='pty'/><graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices>
</domain>
EOF
virsh_c define "$TMP/domain.xml" >&2
virsh_c start "$DOMAIN" >&2
sleep 2
virsh_c list --state-running --name | grep -qx "$DOMAIN" || die "$DOMAIN is not running"
virsh_c list --all >&2
qpid=$(pgrep -f "guest=$DOMAIN" | head -n1 || true)
[ -n "$qpid" ] && log "qemu pid $qpid runs as $(ps -o user=,group= -p "$qpid" | xargs) (host view)"
virsh_c destroy "$DOMAIN" >&2
virsh_c undefine "$DOMAIN" >&2
log "PASS: $VIRT_TYPE domain defined, started, listed running, destroyed over qemu+tcp+SASL ($(( $(date +%s) - T0 )) s)"
