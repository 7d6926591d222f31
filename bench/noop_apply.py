"""
Benchmarks 1 and 5: ``salt-call --local state.apply nova_libvirt`` in host mode
(container disabled, host daemon managed at paths in a temp dir, no service:
no daemon is needed) against Salt's floor, the same command applying
``floor.sls`` (one ``test.nop``) from the same state tree with the same pillar.

Reports the first (converging) apply, the no-change apply (wall time) and the
peak RSS of the salt-call process of the no-change apply.
"""

import json
import os
import pathlib
import shutil

import yaml

from common import (PASSWORD, PORTS, VENV_BIN, Row, copy_formula, fmt_s, log, median, salt_json,
                    state_changes, timed, tmpdir)

SALT_CALL = str(VENV_BIN / "salt-call")
FLOOR_SLS = "bench-floor-nop:\n  test.nop: []\n"


def host_pillar(base):
    """test/functional/test_host_libvirt.py's host_pillar, at paths below ``base``."""
    return {
        "virt_type": "auto",
        "config_dir": str(base / "kolla"),
        "listen_address": "127.0.0.1",
        "port": PORTS["host_libvirtd"],
        "container": {"enabled": False},
        "host": {
            "manage_daemon": True,
            "libvirtd_conf": str(base / "etc" / "libvirtd.conf"),
            "sasl_conf": str(base / "sasl2" / "libvirt.conf"),
            "service": None,
        },
        "sasl": {"password": PASSWORD, "sasldb_path": str(base / "sasl" / "passwd.db")},
        "libvirtd": {"log_dir": str(base / "log")},
    }


class Masterless:
    """A salt-call --local minion of its own under /tmp/bench-noop-*."""

    def __init__(self, work, minion_id="bench-noop", extra_opts=None):
        self.work = pathlib.Path(work)
        self.tree = copy_formula(self.work / "srv")
        (self.tree / "floor.sls").write_text(FLOOR_SLS)
        self.pillar_dir = self.work / "pillar"
        self.pillar_dir.mkdir(exist_ok=True)
        (self.pillar_dir / "top.sls").write_text("base:\n  '*':\n    - nova\n")
        self.etc = self.work / "etc"
        self.etc.mkdir(exist_ok=True)
        opts = {
            "id": minion_id,
            "file_client": "local",
            "root_dir": str(self.work / "root"),
            "file_roots": {"base": [str(self.tree)]},
            "pillar_roots": {"base": [str(self.pillar_dir)]},
            "log_level_logfile": "warning",
        }
        opts.update(extra_opts or {})
        (self.etc / "minion").write_text(yaml.safe_dump(opts))

    def set_pillar(self, pillar):
        (self.pillar_dir / "nova.sls").write_text(yaml.safe_dump({"nova_libvirt": pillar}))

    def argv(self, *args):
        return [SALT_CALL, "-c", str(self.etc), "--local", "--out=json", "-l", "quiet", *args]

    def call(self, *args, timeout=600, env=None):
        return timed(self.argv(*args), timeout=timeout, env=env)

    def apply(self, sls, expect_changes=None, timeout=600, env=None):
        """state.apply; checks the run succeeded (and, when told, whether it changed something)."""
        ret = self.call("state.apply", sls, timeout=timeout, env=env)
        if ret.returncode != 0:
            raise RuntimeError(f"state.apply {sls} failed ({ret.returncode}):\n{ret.stdout[-3000:]}\n{ret.stderr[-3000:]}")
        data = salt_json(ret.stdout)[0]["local"]
        changed, failed = state_changes(data)
        if failed:
            raise RuntimeError(f"state.apply {sls}: failed states {failed}")
        if expect_changes is False and changed:
            raise RuntimeError(f"state.apply {sls}: expected no change, got {json.dumps(changed, default=str)[:2000]}")
        if expect_changes is True and not changed:
            raise RuntimeError(f"state.apply {sls}: expected the converging run to change something")
        ret.states = len(data)
        return ret


def run(quick=False, **_):
    reps = 3 if quick else 5
    work = tmpdir("noop")
    rows = []
    try:
        m = Masterless(work)
        m.set_pillar({})
        sync = m.call("saltutil.sync_all")
        if sync.returncode:
            raise RuntimeError(f"sync_all failed: {sync.stdout}{sync.stderr}")

        # First (converging) apply: a fresh host tree for every run.
        first, floors_first = [], []
        for i in range(reps + 1):
            base = work / f"host{i}"
            m.set_pillar(host_pillar(base))
            floor = m.apply("floor")
            r = m.apply("nova_libvirt", expect_changes=True)
            if i:  # run 0 warms caches (.pyc, page cache, the minion's file cache)
                first.append(r)
                floors_first.append(floor)
        n_states = first[-1].states

        # No-change apply on the last, converged tree; floor and formula alternate.
        noop, floors = [], []
        for i in range(reps + 1):
            floor = m.apply("floor", expect_changes=False)
            r = m.apply("nova_libvirt", expect_changes=False)
            if i:
                noop.append(r)
                floors.append(floor)
        log(f"noop: first {[round(r.seconds, 2) for r in first]} no-change {[round(r.seconds, 2) for r in noop]} "
            f"floor {[round(r.seconds, 2) for r in floors]}")

        floor_t = median([f.seconds for f in floors])
        floor_first_t = median([f.seconds for f in floors_first])
        first_t = median([r.seconds for r in first])
        noop_t = median([r.seconds for r in noop])
        rows.append(Row("1 no-change apply", f"host mode, {n_states} states, nothing changes", str(reps),
                        fmt_s(noop_t), "floor.sls (1 test.nop)", fmt_s(floor_t), noop_t / floor_t, "<= 1.5x",
                        noop_t / floor_t <= 1.5))
        rows.append(Row("1 no-change apply", "host mode, first (converging) apply", str(reps), fmt_s(first_t),
                        "floor.sls (1 test.nop)", fmt_s(floor_first_t), first_t / floor_first_t, "(report)", None,
                        "fresh host tree each run"))
        rss = median([r.maxrss_kib for r in noop])
        rss_floor = median([f.maxrss_kib for f in floors])
        rows.append(Row("5 memory", "peak RSS of salt-call, no-change apply (host mode)", str(reps),
                        f"{rss / 1024:.1f} MiB", "floor.sls (1 test.nop)", f"{rss_floor / 1024:.1f} MiB",
                        rss / rss_floor, "<= 1.3x", rss / rss_floor <= 1.3, "wait4 ru_maxrss"))
        rss_first = median([r.maxrss_kib for r in first])
        rows.append(Row("5 memory", "peak RSS of salt-call, first apply (host mode)", str(reps),
                        f"{rss_first / 1024:.1f} MiB", "floor.sls (1 test.nop)", f"{rss_floor / 1024:.1f} MiB",
                        rss_first / rss_floor, "(report)", None, "wait4 ru_maxrss"))
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows
