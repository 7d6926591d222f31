#!/usr/bin/env python3
"""
The nova_libvirt formula's benchmarks (issue 6). Prints a table and writes
bench/RESULTS.md (every benchmark's latest rows are kept in bench/results.json,
so ``--only NAME`` refreshes that benchmark's rows and leaves the others).

    .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--profile]

NAME: noop (1 host mode + 5 memory), container (1 container mode), fleet (2),
listing (3), certs (4). Run as root (unshare, libvirtd, podman).
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BENCH, ROOT, Row, log, markdown_table, text_table  # noqa: E402

BENCHMARKS = {
    "noop": ("noop_apply", "1. no-change apply, host mode, and 5. peak RSS"),
    "container": ("container_apply", "1. no-change apply, container mode"),
    "fleet": ("fleet", "2. fleet: 1, 4, 8 minions, TLS, file-server requests"),
    "listing": ("listing", "3. nova_libvirt.list_domains, 10/100/1000 domains"),
    "certs": ("certs", "4. test certificates, 10/100/1000 hosts"),
}
ALIASES = {"memory": "noop", "host": "noop", "domains": "listing", "certificates": "certs", "tls": "certs"}
RESULTS_JSON = BENCH / "results.json"
RESULTS_MD = BENCH / "RESULTS.md"


def environment():
    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    import salt.version  # pylint: disable=import-outside-toplevel

    head = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "--", "nova_libvirt", "_modules", "_states",
                            "_runners"]).returncode
    return {
        "formula": f"{head}{' + uncommitted changes' if dirty else ''}",
        "salt": salt.version.__version__,
        "python": platform.python_version(),
        "libvirt": out(["libvirtd", "--version"]),
        "openssl": out(["openssl", "version"]),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def load_results():
    try:
        return json.loads(RESULTS_JSON.read_text())
    except (OSError, ValueError):
        return {}


def write_markdown(results):
    lines = [
        "# nova_libvirt benchmarks",
        "",
        "Written by `bench/run.py` (see `bench/README.md`). Each figure is the median of the runs given in `runs`;",
        "each ratio is against a baseline measured in the same run, interleaved with it. Times are wall-clock.",
        "",
    ]
    rows = []
    for name in BENCHMARKS:
        if name in results:
            rows += [Row(**r) for r in results[name]["rows"]]
    lines += [markdown_table(rows), "", "## Runs", ""]
    for name, (_, title) in BENCHMARKS.items():
        if name not in results:
            lines.append(f"- **{name}** ({title}): not run yet")
            continue
        r = results[name]
        env = r["env"]
        lines.append(
            f"- **{name}** ({title}): {r['when']}, {'--quick' if r['quick'] else 'full'} run, {r['seconds']:.0f} s; "
            f"formula {env['formula']}, Salt {env['salt']}, Python {env['python']}, {env['libvirt']}, "
            f"{env['openssl']}, {env['cpus']} CPUs, load at start {env['load']}"
            + (f" (a later run did not measure it: {r['skipped']})" if r.get("skipped") else "")
        )
    notes = BENCH / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    RESULTS_MD.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs; skips the 1000-host per-host openssl case")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)}); may be repeated or comma-separated")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the formula's no-change apply (pyinstrument) into bench/profiles/")
    args = parser.parse_args()
    # SIGTERM/SIGHUP unwind like Ctrl-C: every benchmark's finally stops what it started.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmarks use unshare, libvirtd and podman")
    selected = list(BENCHMARKS)
    if args.only:
        selected = []
        for item in ",".join(args.only).split(","):
            name = ALIASES.get(item.strip(), item.strip())
            if name not in BENCHMARKS:
                sys.exit(f"unknown benchmark {item!r}; expected one of {', '.join(BENCHMARKS)}")
            selected.append(name)

    results = load_results()
    env = environment()
    all_rows = []
    for name in selected:
        module_name, title = BENCHMARKS[name]
        log(f"== {name}: {title}")
        start = time.monotonic()
        try:
            module = __import__(module_name)
            rows = module.run(quick=args.quick)
        except Exception as exc:  # pylint: disable=broad-except
            traceback.print_exc()
            rows = [Row(title.split(".")[0], name, "0", "not measured", "—", "—", None, "—", None,
                        f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")]
        seconds = time.monotonic() - start
        previous = results.get(name)
        if all(r.value == "not measured" for r in rows) and previous and any(
                r["value"] != "not measured" for r in previous["rows"]):
            # Keep the last real figures; say why this run has none.
            previous["skipped"] = f"{time.strftime('%Y-%m-%d %H:%M')}: {rows[0].note}"
            log(f"{name}: {rows[0].note}; keeping the rows of {previous['when']}")
            RESULTS_JSON.write_text(json.dumps(results, indent=1))
            write_markdown(results)
            all_rows += rows
            continue
        results[name] = {"rows": [r.__dict__ for r in rows], "quick": args.quick, "seconds": seconds,
                         "when": time.strftime("%Y-%m-%d %H:%M"), "env": env}
        RESULTS_JSON.write_text(json.dumps(results, indent=1))
        write_markdown(results)
        all_rows += rows
        log(f"== {name} done in {seconds:.0f} s")

    if args.profile:
        import profile_apply  # pylint: disable=import-outside-toplevel

        profile_apply.main("host")
        profile_apply.main("container")
        write_markdown(results)

    print()
    print(text_table(all_rows))
    print(f"\nwritten: {RESULTS_MD}")
    missed = [r for r in all_rows if r.met is False]
    if missed:
        print(f"targets missed: {len(missed)} (see the table; --profile for the apply's profile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
