"""
Benchmark 3: ``nova_libvirt.list_domains`` in-process, against a private
libvirtd with 10, 100 and 1000 defined (not running) domains, versus the
minimum a libvirt-python client needs for the same data:

* ``listAllDomains`` + per domain name/UUIDString/ID and ``state()`` (an RPC each);
* ``getAllDomainStats(VIR_DOMAIN_STATS_STATE)`` (one RPC) + name/UUIDString/ID.

Both baselines open and close their own connection, as ``list_domains`` does.

Isolation: the outer part re-runs this file as
``unshare -m sh -c 'mount tmpfs on /run/libvirt, /etc/libvirt/qemu, ...; exec python listing.py --inner'``;
the inner part starts libvirtd (``-p`` a private pid file, no TCP) inside that
mount namespace, defines the domains there, measures, and stops it. Nothing
of it is visible on the host: its sockets, domain XML, state and caches are
on tmpfs mounts that only that namespace sees.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import ctypes
import shutil
import signal
import subprocess
import sys
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import PYTHON, ROOT, Row, fmt_s, log, median, tmpdir  # noqa: E402

URI = "qemu:///system"
PRIVATE_TMPFS = ("/run/libvirt", "/etc/libvirt/qemu", "/var/lib/libvirt", "/var/cache/libvirt")
STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
               7: "pmsuspended"}


# ----------------------------------------------------------------------------- outer (host namespace)


def run(quick=False, **_):
    counts = [10, 100, 1000]
    reps = 5 if quick else 11  # cheap (under 0.5 s a run at 1000 domains): more runs, steadier medians
    work = tmpdir("list")
    out = work / "result.json"
    # /etc/libvirt as a private copy (libvirtd may create files there), then the
    # mandatory private tmpfs mounts; /var/run is a symlink to /run on Debian.
    script = "\n".join([
        "set -eu",
        f'W="{work}"',
        'cp -a /etc/libvirt "$W/etc-libvirt"',
        'mount --bind "$W/etc-libvirt" /etc/libvirt',
        *[f"mount -t tmpfs -o mode=0755 bench-list {d}" for d in PRIVATE_TMPFS],
        '[ "$(readlink -f /var/run/libvirt)" = /run/libvirt ] || mount -t tmpfs -o mode=0755 bench-list /var/run/libvirt',
        f'exec {PYTHON} "{pathlib.Path(__file__).resolve()}" --inner --work "$W" --counts {",".join(map(str, counts))} '
        f"--reps {reps}",
    ])
    try:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=1200)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # libvirtd dies with it (PR_SET_PDEATHSIG)
            proc.wait()
            raise
        print(output, end="", flush=True)
        if proc.returncode or not out.exists():
            raise RuntimeError(f"listing benchmark failed ({proc.returncode}):\n{output[-3000:]}")
        data = json.loads(out.read_text())
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows_from(data, reps)


def rows_from(data, reps):
    rows = []
    per_domain = {}
    for n, res in sorted(data["results"].items(), key=lambda kv: int(kv[0])):
        n = int(n)
        f, b_state, b_stats = (median(res[k]) for k in ("formula", "min_state", "min_stats"))
        rpc = data.get("rpcs", {}).get(str(n), {})
        rpc_note = (f"RPCs per call: formula {rpc.get('formula', '?')}, state() way {rpc.get('min_state', '?')}, "
                    f"stats way {rpc.get('min_stats', '?')}") if rpc else "RPC count unavailable"
        per_domain[n] = f / n
        rows.append(Row("3 list_domains", f"{n} defined domains vs listAllDomains + state() each", str(reps),
                        fmt_s(f), "listAllDomains + N x state()", fmt_s(b_state), f / b_state, "<= 1.2x",
                        f / b_state <= 1.2, rpc_note))
        rows.append(Row("3 list_domains", f"{n} defined domains vs one getAllDomainStats", str(reps), fmt_s(f),
                        "getAllDomainStats(STATE)", fmt_s(b_stats), f / b_stats, "<= 1.2x", f / b_stats <= 1.2,
                        f"{f / n * 1e6:.0f} us/domain"))
    ns = sorted(per_domain)
    if len(ns) >= 2:
        # Linear growth: time per domain at the largest count over that at 100 (1.0 = linear).
        ref = 100 if 100 in per_domain else ns[0]
        growth = per_domain[ns[-1]] / per_domain[ref]
        rows.append(Row("3 list_domains", f"growth {ref} -> {ns[-1]} domains (time per domain)", str(reps),
                        f"{per_domain[ns[-1]] * 1e6:.0f} us/domain", f"same at {ref}",
                        f"{per_domain[ref] * 1e6:.0f} us/domain", growth, "<= 1.2x (linear)", growth <= 1.2,
                        "10 domains: fixed connection cost dominates"))
    return rows


# ----------------------------------------------------------------------------- inner (private namespace)


def domain_xml(i):
    return (f"<domain type='qemu'><name>bench-dom-{i:04d}</name><uuid>{uuid.uuid4()}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>")


def load_formula_module():
    """_modules/nova_libvirt.py as the tests import it, with the dunders a minion would give it."""
    spec = importlib.util.spec_from_file_location("formula_modules_nova_libvirt", ROOT / "_modules" / "nova_libvirt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    defaults = (ROOT / "nova_libvirt" / "defaults.yaml").read_text()
    mod.__salt__ = {"cp.get_file_str": lambda url: defaults, "network.default_route": lambda family: []}
    mod.__grains__ = {"nodename": "bench-list", "osarch": "x86_64", "ip4_interfaces": {"lo": ["127.0.0.1"]},
                      "virtual": "physical"}
    mod.__pillar__ = {"nova_libvirt": {"virt_type": "auto", "listen_address": "127.0.0.1",
                                       "sasl": {"password": "bench-password-0123456789"}}}
    mod.__context__ = {}
    mod.__opts__ = {"test": False}
    return mod


def min_state(libvirt):
    conn = libvirt.open(URI)
    try:
        out = []
        for dom in conn.listAllDomains(0):
            dom_id = dom.ID()
            state = dom.state()[0]
            out.append({"name": dom.name(), "uuid": dom.UUIDString(), "id": dom_id if dom_id >= 0 else None,
                        "state": STATE_NAMES.get(state, "unknown"), "active": dom_id >= 0})
        return out
    finally:
        conn.close()


def min_stats(libvirt):
    conn = libvirt.open(URI)
    try:
        out = []
        for dom, rec in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0):
            dom_id = dom.ID()
            out.append({"name": dom.name(), "uuid": dom.UUIDString(), "id": dom_id if dom_id >= 0 else None,
                        "state": STATE_NAMES.get(rec.get("state.state"), "unknown"), "active": dom_id >= 0})
        return out
    finally:
        conn.close()


def variants(libvirt, mod):
    return {
        "formula": lambda: mod.list_domains(uri=URI),
        "min_state": lambda: min_state(libvirt),
        "min_stats": lambda: min_stats(libvirt),
    }


def _die_with_parent():
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_libvirtd(work):
    conf = work / "libvirtd.conf"
    conf.write_text(f'log_level = 3\nlog_outputs = "3:file:{work}/libvirtd.log"\n')
    log_file = open(work / "libvirtd.stderr", "ab")  # noqa: SIM115 - closed by the caller's exit
    proc = subprocess.Popen(["libvirtd", "-f", str(conf), "-p", str(work / "libvirtd.pid")], stdout=log_file,
                            stderr=log_file, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 90
    import libvirt  # pylint: disable=import-outside-toplevel

    libvirt.registerErrorHandler(lambda *_: None, None)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"libvirtd exited {proc.returncode}: {(work / 'libvirtd.stderr').read_text()[-2000:]}")
        try:
            libvirt.open(URI).close()
            return proc
        except libvirt.libvirtError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("libvirtd did not answer within 90 s")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inner(work, counts, reps):
    work = pathlib.Path(work)
    # Refuse to run where the isolation is not in place.
    mounts = open("/proc/self/mountinfo").read()
    for d in ("/run/libvirt", "/etc/libvirt/qemu", "/var/lib/libvirt", "/var/cache/libvirt"):
        if f" {d} " not in mounts:
            raise SystemExit(f"{d} is not a private mount here: refusing to start libvirtd")
    proc = start_libvirtd(work)
    try:
        import libvirt  # pylint: disable=import-outside-toplevel

        mod = load_formula_module()
        conn = libvirt.open(URI)
        results, rpcs, defined = {}, {}, 0
        try:
            for n in counts:
                t0 = time.monotonic()
                while defined < n:
                    conn.defineXML(domain_xml(defined))
                    defined += 1
                log(f"list: {n} domains defined ({time.monotonic() - t0:.1f} s)")
                fns = variants(libvirt, mod)
                expected = sorted(fns["min_state"](), key=lambda d: d["name"])
                for name, fn in fns.items():  # warm-up and same-data check
                    got = sorted(fn(), key=lambda d: d["name"])
                    if got != expected or len(got) != n:
                        raise RuntimeError(f"{name} returned other data than the baseline at {n} domains")
                times = {k: [] for k in fns}
                for rep in range(reps):
                    order = list(fns) if rep % 2 == 0 else list(reversed(list(fns)))
                    for name in order:
                        t = time.perf_counter()
                        fns[name]()
                        times[name].append(time.perf_counter() - t)
                results[n] = times
                rpcs[n] = count_rpcs(work, n)
                log(f"list {n}: " + ", ".join(f"{k} {median(v) * 1000:.1f} ms" for k, v in times.items())
                    + f"; RPCs {rpcs[n]}")
        finally:
            for dom in conn.listAllDomains(0):
                dom.undefine()
            conn.close()
    finally:
        stop(proc)
    (work / "result.json").write_text(json.dumps({"results": results, "rpcs": rpcs}))


def count_rpcs(work, n):
    """RPCs per call, from libvirt's client-side debug log (RPC_CLIENT_MSG_TX_QUEUE), in a child process."""
    logf = work / f"client-{n}.log"
    env = dict(os.environ, LIBVIRT_DEBUG="1", LIBVIRT_LOG_FILTERS="1:rpc", LIBVIRT_LOG_OUTPUTS=f"1:file:{logf}")
    r = subprocess.run([PYTHON, __file__, "--count-rpcs", "--work", str(logf)], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        return {"error": r.stderr[-300:]}
    return json.loads(r.stdout)


def count_rpcs_child(logf):
    import libvirt  # pylint: disable=import-outside-toplevel

    mod = load_formula_module()
    logf = pathlib.Path(logf)
    counts = {}
    for name, fn in variants(libvirt, mod).items():
        fn()  # warm-up (the formula's settings are computed once)
        before = logf.stat().st_size
        fn()
        with open(logf, "rb") as fh:
            fh.seek(before)
            counts[name] = fh.read().count(b"RPC_CLIENT_MSG_TX_QUEUE")
    print(json.dumps(counts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", action="store_true")
    parser.add_argument("--count-rpcs", action="store_true")
    parser.add_argument("--work")
    parser.add_argument("--counts", default="10,100,1000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.inner:
        inner(args.work, [int(c) for c in args.counts.split(",")], args.reps)
    elif args.count_rpcs:
        count_rpcs_child(args.work)
    else:
        print("\n".join(str(r) for r in run()))
