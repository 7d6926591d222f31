"""
Benchmark 1, container mode: ``salt-call --local state.apply nova_libvirt`` with
Kolla's container (Podman, the offline test image), no-change, against the
floor SLS with the same pillar.

Isolation (another engineer's tests run libvirtd and nova_libvirt containers
on this machine): only when no other nova_libvirt* container exists and
``pgrep -x libvirtd`` finds nothing (waited for, bounded); container
``nova_libvirt_bench``, volumes ``bench_*``, libvirtd on 127.0.0.1:16750,
``container:run_dir`` a private directory (the container's /run: its sockets
and pid files never reach the host's /run). ``virt_type: qemu``, so the
formula's kvm fix-ups (/dev/kvm's group, the udev rule) are not applied; the
group of /dev/kvm and the udev rule are restored anyway if they changed.
Everything is removed afterwards.
"""

import os
import pathlib
import shutil
import subprocess
import time

from common import PASSWORD, PORTS, Row, fmt_s, log, median, tmpdir
from noop_apply import Masterless

NAME = "nova_libvirt_bench"
IMAGE, TAG = "localhost/kolla/nova-libvirt", "test"
ENGINE_URL = "unix:///run/podman/podman.sock"
VOLUMES = {
    "bench_libvirtd": "/var/lib/libvirt",
    "bench_nova_libvirt_qemu": "/etc/libvirt/qemu",
    "bench_nova_libvirt_secrets": "/etc/libvirt/secrets",
    "bench_kolla_logs": "/var/log/kolla",
    "bench_nova_compute": "/var/lib/nova",
}
UDEV_RULE = pathlib.Path("/etc/udev/rules.d/99-kolla-kvm.rules")


def _out(argv):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout.strip()


def why_not():
    """The reason not to run now, or None."""
    if not shutil.which("podman"):
        return "podman is not installed"
    rc, names = _out(["podman", "ps", "-a", "--format", "{{.Names}}"])
    if rc:
        return "podman ps failed"
    others = [n for n in names.split() if n.startswith("nova_libvirt") and n != NAME]
    if others:
        return f"other nova_libvirt containers exist ({', '.join(others)})"
    rc, pids = _out(["pgrep", "-x", "libvirtd"])
    if pids:
        return f"a libvirtd runs (pgrep -x libvirtd: {pids.split()})"
    if _out(["podman", "image", "exists", f"{IMAGE}:{TAG}"])[0]:
        return f"image {IMAGE}:{TAG} not built (test/image/build-image.sh)"
    if not os.path.exists(ENGINE_URL[len("unix://"):]):
        return "Podman's API socket is not there (test/image/podman-setup.sh)"
    for volume in VOLUMES:
        if _out(["podman", "volume", "exists", volume])[0] == 0:
            return f"volume {volume} exists (a previous run?)"
    return None


def wait_until_safe(seconds):
    deadline = time.monotonic() + seconds
    reason = why_not()
    while reason and time.monotonic() < deadline:
        time.sleep(5)
        reason = why_not()
    return reason


def container_pillar(base):
    return {
        "virt_type": "qemu",
        "config_dir": str(base / "kolla"),
        "listen_address": "127.0.0.1",
        "port": PORTS["container"],
        "sasl": {"password": PASSWORD},
        "qemu": {"max_files": 16000, "max_processes": 16000},
        "container": {"engine": "podman", "engine_url": ENGINE_URL, "image": IMAGE, "tag": TAG, "name": NAME,
                      "volumes": VOLUMES, "run_dir": str(base / "run"),
                      # Kolla's 64 MiB memlock is above this machine's hard limit.
                      "ulimits": {}},
    }


def container_pids():
    rc, cid = _out(["podman", "inspect", "--format", "{{.Id}}", NAME])
    if rc or not cid:
        return []
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if cid in (proc / "cgroup").read_text():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def cleanup(kvm_gid_before, udev_existed):
    pids = container_pids()
    subprocess.run(["podman", "rm", "-f", "-t", "5", NAME], capture_output=True, timeout=120)
    for pid in pids:  # with pid host a runtime may leave the container's processes behind
        try:
            os.kill(pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
    for volume in VOLUMES:
        subprocess.run(["podman", "volume", "rm", "-f", volume], capture_output=True, timeout=120)
    if kvm_gid_before is not None and os.path.exists("/dev/kvm") and os.stat("/dev/kvm").st_gid != kvm_gid_before:
        subprocess.run(["chgrp", "kvm", "/dev/kvm"], check=False)
    if not udev_existed and UDEV_RULE.exists():
        UDEV_RULE.unlink()


def run(quick=False, **_):
    reps = 3 if quick else 5
    label = "container mode (Podman), no-change"
    reason = wait_until_safe(30 if quick else 180)
    if reason:
        return [Row("1 no-change apply", label, "0", "not measured", "floor.sls (1 test.nop)", "—", None, "<= 1.5x",
                    None, f"not measured: {reason}")]
    kvm_gid = os.stat("/dev/kvm").st_gid if os.path.exists("/dev/kvm") else None
    udev_existed = UDEV_RULE.exists()
    work = tmpdir("ctr")
    rows = []
    try:
        m = Masterless(work, minion_id="bench-ctr")
        m.set_pillar({})
        if m.call("saltutil.sync_all").returncode:
            raise RuntimeError("sync_all failed")
        base = work / "host"
        (base / "run").mkdir(parents=True)
        m.set_pillar(container_pillar(base))
        first = m.apply("nova_libvirt", expect_changes=True)
        log(f"container: first apply {first.seconds:.1f} s ({first.states} states)")
        noop, floors = [], []
        for i in range(reps + 1):
            f = m.apply("floor", expect_changes=False)
            r = m.apply("nova_libvirt", expect_changes=False)
            if i:
                noop.append(r)
                floors.append(f)
        log(f"container: no-change {[round(r.seconds, 2) for r in noop]} floor {[round(f.seconds, 2) for f in floors]}")
        t, tf = median([r.seconds for r in noop]), median([f.seconds for f in floors])
        rows.append(Row("1 no-change apply", f"{label}, {noop[-1].states} states", str(reps), fmt_s(t),
                        "floor.sls (1 test.nop)", fmt_s(tf), t / tf, "<= 1.5x", t / tf <= 1.5,
                        "virt_type qemu; private run_dir; container nova_libvirt_bench"))
        rows.append(Row("1 no-change apply", "container mode, first apply (creates the container)", "1",
                        fmt_s(first.seconds), "floor.sls (1 test.nop)", fmt_s(tf), first.seconds / tf, "(report)", None,
                        "includes libvirtd start and the SASL user"))
        rss, rss_f = median([r.maxrss_kib for r in noop]), median([f.maxrss_kib for f in floors])
        rows.append(Row("5 memory", "peak RSS of salt-call, no-change apply (container mode)", str(reps),
                        f"{rss / 1024:.1f} MiB", "floor.sls (1 test.nop)", f"{rss_f / 1024:.1f} MiB", rss / rss_f,
                        "<= 1.3x", rss / rss_f <= 1.3, "wait4 ru_maxrss"))
    finally:
        cleanup(kvm_gid, udev_existed)
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows
