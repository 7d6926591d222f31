#!/bin/bash
# Configure Podman for these test machines and start its Docker-Engine-API
# service on unix:///run/podman/podman.sock.  Idempotent: safe to run again.
#
#   test/image/podman-setup.sh            # configure + start (or reuse) service
#
# Env: PODMAN_SOCK (default /run/podman/podman.sock),
#      PODMAN_SERVICE_LOG (default /var/log/podman-service.log),
#      PODMAN_WAIT (seconds to wait for the socket, default 30).
#
# Settings (see /work/shared/reference/machines.md):
#   [engine]     runtime = "runc"   (crun fails here: cgroups v1/hybrid)
#   [containers] default_ulimits = nofile/nproc 16384 (podman's default
#                1048576 cannot be set: the machine forbids raising rlimits)
set -euo pipefail

SOCK=${PODMAN_SOCK:-/run/podman/podman.sock}
LOG=${PODMAN_SERVICE_LOG:-/var/log/podman-service.log}
WAIT=${PODMAN_WAIT:-30}
CONF=${PODMAN_CONTAINERS_CONF:-/etc/containers/containers.conf}

die() { echo "podman-setup: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
command -v podman >/dev/null || die "podman not installed (apt-get install podman runc)"
command -v runc >/dev/null || die "runc not installed (apt-get install runc)"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3) || die "python3 needed"

# --- 1. containers.conf: set keys in their sections, keep everything else ---
mkdir -p "$(dirname "$CONF")"
touch "$CONF"
"$PY" - "$CONF" <<'EOF'
import re, sys
path = sys.argv[1]
want = {
    "engine": {"runtime": '"runc"'},
    "containers": {"default_ulimits": '["nofile=16384:16384", "nproc=16384:16384"]'},
}
lines = open(path).read().splitlines()
out, section, done = [], None, set()
sec_re = re.compile(r'^\s*\[([^\]\[]+)\]\s*(#.*)?$')

def flush(sec):
    # append keys of `sec` that were not present
    for k, v in want.get(sec, {}).items():
        if (sec, k) not in done:
            out.append(f"{k} = {v}")
            done.add((sec, k))

i = 0
while i < len(lines):
    line = lines[i]
    m = sec_re.match(line)
    if m:
        # drop trailing blank lines of previous section before appending keys
        trail = []
        while out and out[-1].strip() == "":
            trail.append(out.pop())
        flush(section)
        out.extend(trail)
        section = m.group(1).strip()
        out.append(line)
        i += 1
        continue
    km = re.match(r'^\s*([A-Za-z0-9_]+)\s*=', line)
    if km and section in want and km.group(1) in want[section]:
        key = km.group(1)
        # skip a possibly multi-line array value
        val = line.split("=", 1)[1]
        depth = val.count("[") - val.count("]")
        while depth > 0 and i + 1 < len(lines):
            i += 1
            depth += lines[i].count("[") - lines[i].count("]")
        if (section, key) not in done:
            out.append(f"{key} = {want[section][key]}")
            done.add((section, key))
        i += 1
        continue
    out.append(line)
    i += 1
flush(section)
for sec, kv in want.items():
    if any((sec, k) not in done for k in kv):
        if out and out[-1].strip():
            out.append("")
        out.append(f"[{sec}]")
        flush(sec)
new = "\n".join(out) + "\n"
if new != open(path).read():
    open(path, "w").write(new)
    print(f"podman-setup: updated {path}")
EOF

# --- 2. the API service ---
ping() {
    curl -fsS --max-time 3 --unix-socket "$SOCK" http://d/_ping 2>/dev/null | grep -q OK
}

if ping; then
    echo "podman-setup: service already answers on unix://$SOCK"
    exit 0
fi

mkdir -p "$(dirname "$SOCK")" || die "cannot create $(dirname "$SOCK")"
# a stale socket file from a dead service would make podman fail to bind
[ -S "$SOCK" ] && rm -f "$SOCK"
mkdir -p "$(dirname "$LOG")"
setsid podman system service --time=0 "unix://$SOCK" \
    </dev/null >>"$LOG" 2>&1 &
pid=$!
echo "podman-setup: started podman system service (pid $pid), log $LOG"

why="did not answer on unix://$SOCK within ${WAIT}s"
for _ in $(seq 1 "$WAIT"); do
    if ping; then
        echo "podman-setup: service answers on unix://$SOCK"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        why="exited before answering on unix://$SOCK"
        break
    fi
    sleep 1
done
echo "--- last lines of $LOG ---" >&2
tail -n 20 "$LOG" >&2 || true
kill "$pid" 2>/dev/null || true
die "podman API service $why"
