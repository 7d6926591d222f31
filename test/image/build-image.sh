#!/bin/bash
# Build OFFLINE (no registry) a Kolla-compatible nova-libvirt test image and
# cache it in Podman's local storage.
#
#   test/image/build-image.sh [IMAGE_NAME]     (default localhost/kolla/nova-libvirt:test)
#
# The image is tagged localhost/nova-libvirt-test:<first 12 hex of sha256 of
# this file>; if that tag exists the build is skipped and only IMAGE_NAME is
# (re)tagged.  Logs go to stderr; the last stdout line is the image name.
#
# Contents: Debian bookworm from debootstrap (the mirror of
# /etc/apt/sources.list.d/debian.sources), libvirt 9.0 + QEMU 7.2, and Kolla's
# start scripts taken from the `kolla` wheel on PyPI (KOLLA_VERSION below),
# installed as Kolla's Dockerfiles do (docker/base, docker/nova/nova-libvirt):
#   /usr/local/bin/kolla_set_configs, kolla_start, kolla_copy_cacerts,
#   kolla_install_projects, kolla_patch, kolla_extend_start,
#   kolla_nova_libvirt_start, healthcheck_*;  /etc/sudoers;
#   all users/groups of kolla/common/users.py with Kolla's fixed IDs
#   (kolla 42400, qemu 42427, nova 42436; nova in groups kolla,qemu,
#   home /var/lib/nova); /var/log/kolla root:kolla 2775.
#   ENTRYPOINT ["dumb-init","--single-child","--"]  CMD ["kolla_start"]
#
# Env: KOLLA_VERSION (default 23.0.0), DEBIAN_MIRROR (default: URIs: line),
#      NOVA_LIBVIRT_CACHE (default /var/cache/nova-libvirt-test),
#      FORCE_BUILD=1 (ignore the cache tag), PIP (pip command to use).
set -euo pipefail

IMAGE=${1:-localhost/kolla/nova-libvirt:test}
KOLLA_VERSION=${KOLLA_VERSION:-23.0.0}
CACHE=${NOVA_LIBVIRT_CACHE:-/var/cache/nova-libvirt-test}
SUITE=bookworm
PACKAGES=libvirt-daemon-system,dbus,libpam-systemd,libvirt-clients,qemu-system-x86,qemu-utils,sasl2-bin,libsasl2-modules,python3,python3-yaml,sudo,dumb-init,ca-certificates,procps,iproute2,kmod

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SELF")
HASH=$(sha256sum "$SELF" | cut -c1-12)
CACHE_TAG=localhost/nova-libvirt-test:$HASH

log() { echo "build-image: $*" >&2; }
die() { echo "build-image: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
for c in podman debootstrap tar sha256sum; do
    command -v "$c" >/dev/null || die "$c not installed"
done

mkdir -p "$CACHE"
# one build at a time (parallel CI jobs on one machine)
exec 9>"$CACHE/lock"
flock 9

if [ -z "${FORCE_BUILD:-}" ] && podman image exists "$CACHE_TAG"; then
    log "cached image $CACHE_TAG found, skipping build"
    podman tag "$CACHE_TAG" "$IMAGE" >&2
    echo "$IMAGE"
    exit 0
fi

START=$(date +%s)
WORK=$CACHE/build-$HASH
ROOTFS=$WORK/rootfs
KOLLA_DIR=$CACHE/kolla-$KOLLA_VERSION

safe_rm_rootfs() {
    [ -d "$ROOTFS" ] || return 0
    # never rm -rf through a mounted /proc, /sys or /dev left by debootstrap
    local m
    for m in $(awk -v r="$ROOTFS" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" || die "cannot unmount $m"
    done
    rm -rf "$ROOTFS"
}
trap 'rc=$?; [ $rc -ne 0 ] && { log "failed (rc=$rc), cleaning $ROOTFS"; safe_rm_rootfs; }; exit $rc' EXIT

# leftovers of failed builds of other script versions (their rootfs is gone)
for d in "$CACHE"/build-*; do
    [ -d "$d" ] && [ "$d" != "$WORK" ] && [ ! -d "$d/rootfs" ] && rm -rf "$d"
done

# ---------------------------------------------------------------- kolla wheel
if [ ! -f "$KOLLA_DIR/.extracted" ]; then
    if [ -n "${PIP:-}" ]; then
        read -r -a pipcmd <<<"$PIP"
    elif [ -x "$HERE/../../.venv/bin/pip" ]; then
        pipcmd=("$HERE/../../.venv/bin/pip")
    elif python3 -m pip --version >/dev/null 2>&1; then
        pipcmd=(python3 -m pip)
    else
        die "no pip found (set PIP=...)"
    fi
    rm -rf "$KOLLA_DIR"
    mkdir -p "$KOLLA_DIR/dl"
    log "downloading kolla==$KOLLA_VERSION from PyPI"
    "${pipcmd[@]}" download --no-deps --only-binary=:all: --dest "$KOLLA_DIR/dl" \
        "kolla==$KOLLA_VERSION" >&2 || die "pip download kolla==$KOLLA_VERSION failed"
    whl=$(ls "$KOLLA_DIR"/dl/kolla-*.whl | head -n1)
    python3 - "$whl" "$KOLLA_DIR" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if n.startswith(("kolla/docker/base/", "kolla/docker/nova/nova-libvirt/")) \
            or n == "kolla/common/users.py":
        z.extract(n, sys.argv[2])
EOF
    touch "$KOLLA_DIR/.extracted"
fi
KB=$KOLLA_DIR/kolla/docker/base
KN=$KOLLA_DIR/kolla/docker/nova/nova-libvirt
for f in "$KB"/set_configs.py "$KB"/start.sh "$KB"/copy_cacerts.sh "$KB"/install_projects.sh \
         "$KB"/sudoers "$KN"/extend_start.sh "$KN"/kolla_nova_libvirt_start.sh \
         "$KOLLA_DIR"/kolla/common/users.py; do
    [ -f "$f" ] || die "kolla wheel lacks $f"
done

# ---------------------------------------------------------------- debootstrap
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
safe_rm_rootfs
mkdir -p "$ROOTFS" "$CACHE/debs"
log "debootstrap $SUITE from $MIRROR into $ROOTFS (log $WORK/debootstrap.log)"
if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$PACKAGES" \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
T1=$(date +%s)
log "debootstrap done in $((T1 - START)) s"

# ---------------------------------------------------------------- kolla layer
# users and groups exactly as kolla/docker/base/Dockerfile.j2 creates them
python3 - "$KOLLA_DIR/kolla/common/users.py" >"$WORK/users.tsv" <<'EOF'
import sys
ns = {}
exec(open(sys.argv[1]).read(), ns)
for key, u in sorted(ns["USERS"].items()):
    name = key[:-len("-user")]
    print(name, u.get("group", name), u["uid"], u["gid"], sep="\t")
EOF
# Kolla creates these before any package; here Debian packages came first and
# may already own a name with another ID (e.g. group libvirt): renumber it to
# Kolla's ID and re-own its files (keeping setuid/setgid bits).
renumber() {  # renumber uid|gid OLD NEW
    python3 - "$ROOTFS" "$@" <<'PYEOF'
import os, stat, sys
root, kind, old, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dev = os.lstat(root).st_dev
for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == dev]
    for n in [d] + [os.path.join(d, f) for f in files + dirs]:
        st = os.lstat(n)
        if (st.st_uid if kind == "uid" else st.st_gid) != old:
            continue
        os.lchown(n, new if kind == "uid" else -1, new if kind == "gid" else -1)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(n, stat.S_IMODE(st.st_mode))
PYEOF
}
while IFS=$'\t' read -r -u 3 name group uid gid; do
    cur=$(chroot "$ROOTFS" getent group "$group" | cut -d: -f3 || true)
    if [ -z "$cur" ]; then
        chroot "$ROOTFS" groupadd --gid "$gid" "$group"
    elif [ "$cur" != "$gid" ]; then
        log "renumbering existing group $group $cur -> $gid"
        chroot "$ROOTFS" groupmod --gid "$gid" "$group"
        renumber gid "$cur" "$gid"
    fi
    cur=$(chroot "$ROOTFS" getent passwd "$name" | cut -d: -f3 || true)
    if [ -z "$cur" ]; then
        chroot "$ROOTFS" useradd -l -M --shell /usr/sbin/nologin \
            --uid "$uid" --gid "$gid" "$name"
    else
        if [ "$cur" != "$uid" ]; then
            log "renumbering existing user $name $cur -> $uid"
            chroot "$ROOTFS" usermod --uid "$uid" "$name"
            renumber uid "$cur" "$uid"
        fi
        chroot "$ROOTFS" usermod --gid "$gid" "$name"
    fi
done 3<"$WORK/users.tsv"

install -m 0755 "$KB/set_configs.py"     "$ROOTFS/usr/local/bin/kolla_set_configs"
install -m 0755 "$KB/start.sh"           "$ROOTFS/usr/local/bin/kolla_start"
install -m 0755 "$KB/copy_cacerts.sh"    "$ROOTFS/usr/local/bin/kolla_copy_cacerts"
install -m 0755 "$KB/install_projects.sh" "$ROOTFS/usr/local/bin/kolla_install_projects"
[ -f "$KB/kolla_patch.sh" ] && install -m 0755 "$KB/kolla_patch.sh" "$ROOTFS/usr/local/bin/kolla_patch"
for h in "$KB"/healthcheck_*; do
    [ -f "$h" ] && install -m 0755 "$h" "$ROOTFS/usr/local/bin/$(basename "$h")"
done
install -m 0440 "$KB/sudoers"            "$ROOTFS/etc/sudoers"
install -m 0644 "$KN/extend_start.sh"    "$ROOTFS/usr/local/bin/kolla_extend_start"
install -m 0744 "$KN/kolla_nova_libvirt_start.sh" "$ROOTFS/usr/local/bin/kolla_nova_libvirt_start"
if [ -f "$KB/kolla_bashrc" ]; then
    cat "$KB/kolla_bashrc" >>"$ROOTFS/etc/bash.bashrc"
    cat "$KB/kolla_bashrc" >>"$ROOTFS/root/.bashrc"
fi

# macros.configure_user(name='nova', groups='qemu')
chroot "$ROOTFS" usermod --append --home /var/lib/nova --groups kolla nova
chroot "$ROOTFS" usermod --append --groups qemu nova
mkdir -p "$ROOTFS/var/lib/nova"
chroot "$ROOTFS" chown -R nova:nova /var/lib/nova

mkdir -p "$ROOTFS/var/log/kolla" "$ROOTFS/var/lib/kolla/config_files"
chroot "$ROOTFS" chown :kolla /var/log/kolla
chmod 2775 "$ROOTFS/var/log/kolla"
# nova-libvirt Dockerfile: no default NAT network
rm -f "$ROOTFS/etc/libvirt/qemu/networks/default.xml" \
      "$ROOTFS/etc/libvirt/qemu/networks/autostart/default.xml"
# base Dockerfile: kolla-ansible bind-mounts /etc/localtime
rm -f "$ROOTFS/etc/localtime"

# check the IDs that matter to the formula
check_id() {
    local got
    got=$(chroot "$ROOTFS" "$@") || die "lookup $* failed"
    echo "$got"
}
[ "$(check_id id -u nova):$(check_id id -g nova)" = "42436:42436" ] || die "nova is not 42436:42436"
[ "$(chroot "$ROOTFS" getent group qemu | cut -d: -f3)" = 42427 ] || die "qemu group is not 42427"
[ "$(chroot "$ROOTFS" getent group kolla | cut -d: -f3)" = 42400 ] || die "kolla group is not 42400"
chroot "$ROOTFS" id -nG nova | tr ' ' '\n' | grep -qx qemu || die "nova not in group qemu"
chroot "$ROOTFS" id -nG nova | tr ' ' '\n' | grep -qx kolla || die "nova not in group kolla"

# slim down
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*

# ---------------------------------------------------------------- import
log "importing into podman as $CACHE_TAG"
tar --numeric-owner -C "$ROOTFS" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV DEBIAN_FRONTEND=noninteractive' \
    --change 'ENV KOLLA_BASE_DISTRO=debian' \
    --change "ENV KOLLA_BASE_ARCH=$(uname -m)" \
    --change 'ENV KOLLA_CONFIG_STRATEGY=COPY_ALWAYS' \
    --change 'ENV PS1="$(tput bold)($(printenv KOLLA_SERVICE_NAME))$(tput sgr0)[$(id -un)@$(hostname -s) $(pwd)]$ "' \
    --change "LABEL kolla_version=$KOLLA_VERSION" \
    --change 'LABEL name=nova-libvirt' \
    --change "LABEL nova_libvirt_test.build_hash=$HASH" \
    --change 'ENTRYPOINT ["dumb-init", "--single-child", "--"]' \
    --change 'CMD ["kolla_start"]' \
    - "$CACHE_TAG" >&2
podman tag "$CACHE_TAG" "$IMAGE" >&2
T2=$(date +%s)
log "import done in $((T2 - T1)) s"

# drop older cached builds of this script
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/nova-libvirt-test:' | grep -vx "$CACHE_TAG" || true); do
    podman rmi "$old" >/dev/null 2>&1 || true
done
safe_rm_rootfs
rm -rf "$WORK"
trap - EXIT
log "built $IMAGE ($CACHE_TAG) in $((T2 - START)) s"
echo "$IMAGE"
