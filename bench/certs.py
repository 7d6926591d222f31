"""
Benchmark 4: test certificates for 10, 100 and 1000 hosts.

The formula's runner ``generate_certificates(hosts=[...], dest=..., ca_key=...)``
in-process (imported with importlib, ``__opts__``/``__context__`` set as module
attributes as test/unit/test_tls_material.py does), shared mode and per_host
mode, with its defaults (RSA 2048 host keys, RSA 4096 CA), from an empty
directory each run (a new CA every time).

Baseline: the ``openssl`` command line doing the same: ``openssl req -x509``
for the CA (RSA 4096, CA:TRUE, keyCertSign), then ``openssl req -x509 -CA``
(OpenSSL 3) per key/certificate with the same subject, SANs, keyUsage and
extendedKeyUsage, the key and certificate copied to client*.pem as the runner
writes them; per-host jobs run ``nproc`` at a time (xargs -P), as the runner's
thread pool does.
"""

import importlib.util
import os
import shutil
import subprocess
import time

from common import ROOT, Row, fmt_s, log, median, tmpdir

OPENSSL_SCRIPT = r"""
set -eu
D=$1; HOSTS=$2; MODE=$3
openssl req -x509 -newkey rsa:4096 -nodes -keyout "$D/ca.key" -out "$D/cacert.pem" -days 1024 \
  -subj "/O=nova_libvirt/CN=nova_libvirt test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" \
  2>/dev/null
chmod 600 "$D/ca.key"
leaf() {  # leaf DIR CN SAN
  mkdir -p "$1"
  openssl req -x509 -CA "$D/cacert.pem" -CAkey "$D/ca.key" -newkey rsa:2048 -nodes \
    -keyout "$1/serverkey.pem" -out "$1/servercert.pem" -days 500 -subj "/O=nova_libvirt/CN=$2" \
    -addext "basicConstraints=critical,CA:FALSE" -addext "keyUsage=critical,digitalSignature,keyEncipherment" \
    -addext "extendedKeyUsage=serverAuth,clientAuth" -addext "subjectAltName=$3" 2>/dev/null
  cp -p "$1/serverkey.pem" "$1/clientkey.pem"
  cp -p "$1/servercert.pem" "$1/clientcert.pem"
}
if [ "$MODE" = shared ]; then
  SAN=$(sed 's/^/DNS:/' "$HOSTS" | paste -sd, -)
  leaf "$D" "$(head -n1 "$HOSTS")" "$SAN"
else
  export -f leaf; export D
  xargs -P "$(nproc)" -I{} bash -c 'leaf "$D/{}" "{}" "DNS:{}"' < "$HOSTS"
fi
"""


def load_runner(tmp):
    spec = importlib.util.spec_from_file_location("formula_runners_nova_libvirt", ROOT / "_runners" / "nova_libvirt.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    runner.__opts__ = {"file_roots": {"base": [str(tmp)]}, "pki_dir": str(tmp)}
    runner.__context__ = {}
    return runner


def hosts(n):
    return [f"cmp{i:04d}.bench.example.test" for i in range(n)]


def one_runner(runner, work, names, per_host):
    dest, key = work / "runner-out", work / "runner-pki" / "ca.key"
    t = time.perf_counter()
    ret = runner.generate_certificates(hosts=names, dest=str(dest), ca_key=str(key), per_host=per_host)
    seconds = time.perf_counter() - t
    if not ret["result"]:
        raise RuntimeError(f"generate_certificates failed: {ret['errors']}")
    files = sum(1 for p in dest.rglob("*.pem"))
    expected = 1 + 4 * (len(names) if per_host else 1)
    if files != expected:
        raise RuntimeError(f"runner wrote {files} files, expected {expected}")
    shutil.rmtree(dest)
    shutil.rmtree(key.parent)
    return seconds


def rerun_unchanged(runner, work, names, per_host):
    """Second run over the same directory: nothing to issue, everything to check."""
    dest, key = work / "rerun-out", work / "rerun-pki" / "ca.key"
    runner.generate_certificates(hosts=names, dest=str(dest), ca_key=str(key), per_host=per_host)
    t = time.perf_counter()
    ret = runner.generate_certificates(hosts=names, dest=str(dest), ca_key=str(key), per_host=per_host)
    seconds = time.perf_counter() - t
    if ret["changed"]:
        raise RuntimeError(f"second run changed {len(ret['changed'])} files")
    shutil.rmtree(dest)
    shutil.rmtree(key.parent)
    return seconds


def one_openssl(work, names, per_host):
    dest = work / "openssl-out"
    dest.mkdir()
    host_file = work / "hosts.txt"
    host_file.write_text("\n".join(names) + "\n")
    t = time.perf_counter()
    subprocess.run(["bash", "-c", OPENSSL_SCRIPT, "bench-openssl", str(dest), str(host_file),
                    "per_host" if per_host else "shared"], check=True, timeout=1800)
    seconds = time.perf_counter() - t
    files = sum(1 for p in dest.rglob("*.pem"))
    expected = 1 + 4 * (len(names) if per_host else 1)
    if files != expected:
        raise RuntimeError(f"openssl wrote {files} files, expected {expected}")
    # Same certificate content as the runner's (SANs, usages), checked on the first leaf.
    leaf = (dest / "servercert.pem") if not per_host else (dest / names[0] / "servercert.pem")
    subprocess.run(["openssl", "verify", "-CAfile", str(dest / "cacert.pem"), str(leaf)], check=True,
                   capture_output=True)
    shutil.rmtree(dest)
    return seconds


def run(quick=False, **_):
    work = tmpdir("certs")
    rows = []
    try:
        runner = load_runner(work)
        for per_host in (False, True):
            mode = "per_host" if per_host else "shared"
            for n in (10, 100, 1000):
                # openssl takes ~0.2 s of CPU per host key: fewer runs for the slow per-host cases.
                reps = 3 if quick else 5
                if per_host and n >= 100:
                    reps = 3 if n == 100 else 1
                if quick and per_host and n == 1000:
                    rows.append(Row("4 certificates", f"{mode}, {n} hosts", "0", "not measured", "openssl CLI", "—",
                                    None, "< 1.0x (faster)", None, "skipped by --quick (about 4 min)"))
                    continue
                names = hosts(n)
                r_times, o_times = [], []
                for rep in range(reps):
                    order = (True, False) if rep % 2 == 0 else (False, True)
                    for is_runner in order:
                        if is_runner:
                            r_times.append(one_runner(runner, work, names, per_host))
                        else:
                            o_times.append(one_openssl(work, names, per_host))
                r, o = median(r_times), median(o_times)
                log(f"certs {mode} {n}: runner {[round(x, 2) for x in r_times]} openssl {[round(x, 2) for x in o_times]}")
                note = "incl. a new RSA-4096 CA each run"
                if per_host:
                    note += f"; openssl {os.cpu_count()} at a time"
                rows.append(Row("4 certificates", f"{mode}, {n} hosts", str(reps), fmt_s(r), "openssl CLI", fmt_s(o),
                                r / o, "< 1.0x (faster)", r < o, note))
        n = 100 if quick else 1000
        again = median([rerun_unchanged(runner, work, hosts(n), True) for _ in range(1)])
        rows.append(Row("4 certificates", f"per_host, {n} hosts, second run (nothing to issue)", "1",
                        fmt_s(again), "—", "—", None, "(report)", None, "checks every existing certificate"))
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows
