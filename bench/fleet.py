"""
Benchmark 2: a fleet. One salt-master and 8 salt-minions of our own, all on
127.0.0.1 (publish 16701, ret 16702, everything under /tmp/bench-fleet-*),
each minion with its own config_dir and TLS on (shared certificate from
``salt-run nova_libvirt.generate_certificates`` into the master's file_roots).

For 1, 4 and 8 targeted minions: the wall time of
``salt -L <ids> state.apply nova_libvirt.config`` (the CLI included), converging
(config dirs emptied first) and no-change; throughput = minion applies per
second. On a no-change run at 8 minions the master's file-server requests are
counted by type, path and minion (fleet_master.py wraps the file server).
"""

import collections
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import yaml

from common import (BENCH, PASSWORD, PORTS, PYTHON, VENV_BIN, Row, copy_formula, fmt_s, log, median, salt_json,
                    state_changes, timed, tmpdir)

SIZES = (1, 4, 8)
TLS_FILES = ("cacert.pem", "servercert.pem", "serverkey.pem", "clientcert.pem", "clientkey.pem")


class Fleet:
    def __init__(self, work, n_minions=8):
        self.work = pathlib.Path(work)
        self.ids = [f"bench-m{i}" for i in range(1, n_minions + 1)]
        self.procs = []
        self.fs_log = self.work / "fsreq.log"
        self.tree = copy_formula(self.work / "srv")
        self.tls_dir = self.work / "tls-root" / "nova_libvirt_tls"
        self.tls_dir.mkdir(parents=True)
        self.pillar = self.work / "pillar"
        self.pillar.mkdir()
        self.master_etc = self.work / "master" / "etc"
        self.master_etc.mkdir(parents=True)
        (self.master_etc / "master").write_text(yaml.safe_dump({
            "id": "bench-master",
            "root_dir": str(self.work / "master" / "root"),
            "interface": "127.0.0.1",
            "publish_port": PORTS["master_publish"],
            "ret_port": PORTS["master_ret"],
            "auto_accept": True,
            "user": "root",
            "file_roots": {"base": [str(self.tree), str(self.tls_dir.parent)]},
            "pillar_roots": {"base": [str(self.pillar)]},
            "log_file": str(self.work / "master" / "master.log"),
            "log_level_logfile": "info",
            "timeout": 60,
        }))
        top = {"base": {}}
        for mid in self.ids:
            top["base"][mid] = [mid.replace("-", "_")]
            pillar = {
                "virt_type": "auto",
                "config_dir": str(self.work / mid / "kolla"),
                "listen_address": "127.0.0.1",
                "migration_hostname": f"{mid}.bench.test",
                "sasl": {"password": PASSWORD},
                "tls": {"enabled": True},
            }
            (self.pillar / f"{mid.replace('-', '_')}.sls").write_text(yaml.safe_dump({"nova_libvirt": pillar}))
            etc = self.work / mid / "etc"
            etc.mkdir(parents=True)
            (etc / "minion").write_text(yaml.safe_dump({
                "id": mid,
                "master": "127.0.0.1",
                "master_port": PORTS["master_ret"],
                "publish_port": PORTS["master_publish"],
                "root_dir": str(self.work / mid / "root"),
                "log_file": str(self.work / mid / "minion.log"),
                "log_level_logfile": "warning",
                "acceptance_wait_time": 1,
            }))
        (self.pillar / "top.sls").write_text(yaml.safe_dump(top))

    # -- processes
    def _spawn(self, argv, name, env=None):
        out = open(self.work / f"{name}.out", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env)
        self.procs.append((name, proc, out))
        return proc

    def start(self):
        for port in (PORTS["master_publish"], PORTS["master_ret"]):
            if subprocess.run(["sh", "-c", f"ss -ltn | grep -q ':{port} '"]).returncode == 0:
                raise RuntimeError(f"port {port} is in use: another benchmark run?")
        env = dict(os.environ, BENCH_FS_LOG=str(self.fs_log), PYTHONPATH=str(BENCH))
        self._spawn([PYTHON, str(BENCH / "fleet_master.py"), "-c", str(self.master_etc), "-l", "quiet"], "master", env)
        time.sleep(2)
        for mid in self.ids:
            self._spawn([str(VENV_BIN / "salt-minion"), "-c", str(self.work / mid / "etc"), "-l", "quiet"], mid)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for name, proc, _ in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {(self.work / f'{name}.out').read_text()[-2000:]}")
            r = self.salt("*", "test.ping", timeout=20)
            answered = {k for d in salt_json(r.stdout) if isinstance(d, dict) for k, v in d.items() if v is True}
            if answered >= set(self.ids):
                return
            time.sleep(1)
        raise RuntimeError(f"minions did not all answer within 180 s (answered: {sorted(answered)})")

    def stop(self):
        """Stop every daemon started here, by process group (each was started in a session of its own)."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for name, proc, out in self.procs:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 30
            for name, proc, out in self.procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                # Salt daemons fork workers into the same process group: make sure none is left.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                out.close()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    # -- commands
    def salt(self, tgt, *args, timeout=300, list_target=False):
        argv = [str(VENV_BIN / "salt"), "-c", str(self.master_etc), "--out=json", "--static", "-t", str(timeout)]
        if list_target:
            argv.append("-L")
        return timed([*argv, tgt, *args], timeout=timeout + 60)

    def salt_run(self, *args):
        r = timed([str(VENV_BIN / "salt-run"), "-c", str(self.master_etc), "--out=json", *args], timeout=600)
        if r.returncode:
            raise RuntimeError(f"salt-run {args} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r

    def apply(self, ids, expect_changes):
        r = self.salt(",".join(ids), "state.apply", "nova_libvirt.config", list_target=True)
        docs = [d for d in salt_json(r.stdout) if isinstance(d, dict)]
        merged = {k: v for d in docs for k, v in d.items()}
        missing = set(ids) - set(merged)
        if missing or r.returncode:
            raise RuntimeError(f"state.apply: rc {r.returncode}, no return from {sorted(missing)}:\n{r.stdout[-2000:]}")
        for mid in ids:
            if not isinstance(merged[mid], dict):
                raise RuntimeError(f"{mid}: {merged[mid]}")
            changed, failed = state_changes(merged[mid])
            if failed:
                raise RuntimeError(f"{mid}: failed states {failed}")
            if expect_changes is False and changed:
                raise RuntimeError(f"{mid}: expected no change, got {sorted(changed)}")
            if expect_changes is True and "nova_libvirt-tls-files-managed" not in changed:
                raise RuntimeError(f"{mid}: the converging run did not write the TLS files")
        return r.seconds

    def wipe_config(self, ids):
        for mid in ids:
            shutil.rmtree(self.work / mid / "kolla", ignore_errors=True)

    def fs_requests_during(self, fn):
        before = self.fs_log.stat().st_size if self.fs_log.exists() else 0
        result = fn()
        with open(self.fs_log, "rb") as fh:
            fh.seek(before)
            records = [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
        return result, records


def tls_summary(records, ids):
    """Per TLS file and minion: hash checks and content transfers; totals by request type."""
    by_type = collections.Counter(r["cmd"] for r in records)
    hashes, serves = collections.Counter(), collections.Counter()
    for r in records:
        path = r.get("path") or ""
        if path.startswith("nova_libvirt_tls/") and path.rsplit("/", 1)[-1] in TLS_FILES:
            if r["cmd"] in ("_file_hash", "_file_hash_and_stat"):
                hashes[(path, r.get("id"))] += 1
            elif r["cmd"] == "_serve_file":
                serves[(path, r.get("id"))] += 1
    tls_paths = {p for p, _ in hashes} | {p for p, _ in serves}
    max_hash = max(hashes.values(), default=0)
    return {
        "by_type": dict(by_type),
        "per_minion": {k: round(v / len(ids), 1) for k, v in by_type.items()},
        "tls_serves": sum(serves.values()),
        "tls_hash_max_per_file_minion": max_hash,
        "tls_files": len(tls_paths),
        "ids_seen": sorted({r.get("id") for r in records if r.get("id")}),
    }


def run(quick=False, **_):
    reps = 3 if quick else 5
    work = tmpdir("fleet")
    fleet = Fleet(work)
    rows = []
    try:
        fleet.start()
        log("fleet: master and 8 minions answer")
        r = fleet.salt("*", "saltutil.sync_all")
        if r.returncode:
            raise RuntimeError(f"sync_all: {r.stdout[-2000:]}")
        fleet.salt_run("saltutil.sync_all")
        hosts = ",".join(f"{mid}.bench.test" for mid in fleet.ids)
        gen = salt_json(fleet.salt_run("nova_libvirt.generate_certificates", f"hosts={hosts}",
                                       f"dest={fleet.tls_dir}").stdout)[0]
        if not gen.get("result"):
            raise RuntimeError(f"generate_certificates: {gen.get('errors')}")
        # The master caches its file lists (fileserver_list_cache_time): make it see the new files now.
        fleet.salt_run("fileserver.clear_file_list_cache")
        fleet.salt_run("fileserver.update")
        # Warm-up: every minion converges once (file caches, module loading).
        fleet.apply(fleet.ids, expect_changes=True)
        results = {}
        for n in SIZES:
            ids = fleet.ids[:n]
            conv, noop = [], []
            for _ in range(reps):
                fleet.wipe_config(ids)
                conv.append(fleet.apply(ids, expect_changes=True))
                noop.append(fleet.apply(ids, expect_changes=False))
            results[n] = (median(conv), median(noop))
            log(f"fleet {n}: converging {[round(x, 2) for x in conv]} no-change {[round(x, 2) for x in noop]}")
        # File-server requests of one no-change run and one converging run of the whole fleet.
        _, noop_records = fleet.fs_requests_during(lambda: fleet.apply(fleet.ids, expect_changes=False))
        fleet.wipe_config(fleet.ids)
        _, conv_records = fleet.fs_requests_during(lambda: fleet.apply(fleet.ids, expect_changes=True))
        noop_fs, conv_fs = tls_summary(noop_records, fleet.ids), tls_summary(conv_records, fleet.ids)
        log(f"fleet file server, no-change run: {noop_fs}")
        log(f"fleet file server, converging run: {conv_fs}")

        for kind, idx in (("no-change", 1), ("converging", 0)):
            t1 = results[1][idx]
            for n in SIZES:
                t = results[n][idx]
                tput, tput1 = n / t, 1 / t1
                ratio = tput / tput1
                target = ">= 1.8x (8 vs 1)" if n == 8 else "(report)"
                met = ratio >= 1.8 if n == 8 else None
                rows.append(Row("2 fleet", f"{n} minion(s), {kind} state.apply nova_libvirt.config + TLS", str(reps),
                                f"{fmt_s(t)} = {tput:.2f} applies/s", "throughput at 1 minion", f"{tput1:.2f} applies/s",
                                ratio, target, met, "ratio = throughput / throughput at 1; wall incl. the salt CLI"))
        ok = noop_fs["tls_serves"] == 0 and noop_fs["tls_hash_max_per_file_minion"] <= 1
        rows.append(Row("2 fleet", "8 minions, no-change run: TLS content transferred again", "1",
                        f"{noop_fs['tls_serves']} serve_file; max {noop_fs['tls_hash_max_per_file_minion']} hash "
                        f"check per TLS file per minion", "—", "—", None, "0 transfers, <= 1 hash check", ok,
                        "requests per minion: " + ", ".join(f"{k} {v}" for k, v in sorted(noop_fs["per_minion"].items()))))
        rows.append(Row("2 fleet", "8 minions, converging run: file-server requests", "1",
                        f"{conv_fs['tls_serves']} TLS serve_file for {conv_fs['tls_files']} TLS files", "—", "—", None,
                        "(report)", None,
                        "requests per minion: " + ", ".join(f"{k} {v}" for k, v in sorted(conv_fs["per_minion"].items()))))
    finally:
        fleet.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.exit(print("run through bench/run.py --only fleet"))
