"""
Shared helpers of the benchmarks: the formula copied into a state tree, timed
child processes (wall time and peak RSS from wait4), medians, result rows.

Not a test module: pytest never collects bench/ (testpaths = ["test"]) and no
file here is named test_*.py.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
FORMULA_DIRS = ("nova_libvirt", "_modules", "_states", "_runners")
PASSWORD = "bench-Zx9-correct-horse-battery-staple-0123456789"
# Every daemon/port of the benchmarks lives in 16700-16799 (the tests use 165xx/166xx).
PORTS = {"host_libvirtd": 16700, "master_publish": 16701, "master_ret": 16702, "container": 16750}


def tmpdir(tag):
    """A fresh directory /tmp/bench-<tag>-XXXX (short: AF_UNIX paths are limited to 108 bytes)."""
    return pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{tag}-", dir="/tmp"))


def copy_formula(dest):
    """The formula's Salt parts as they sit at the root of a file_roots entry (a snapshot: the
    formula may be edited while the benchmarks run)."""
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FORMULA_DIRS:
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dest / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def median(values):
    return statistics.median(values) if values else float("nan")


@dataclasses.dataclass
class Timed:
    seconds: float
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str


def timed(argv, env=None, cwd=None, timeout=600, stdin=subprocess.DEVNULL):
    """Run ``argv``; wall time, and peak RSS of the child (and of its waited-for descendants) from wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, stdin=stdin, start_new_session=True)
        killer = threading.Timer(timeout, lambda: _kill_group(proc.pid))
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill_group(proc.pid)  # interrupted: leave no child behind
            os.waitpid(proc.pid, 0)
            raise
        finally:
            killer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Timed(seconds, usage.ru_maxrss, proc.returncode, out.read().decode(errors="replace"),
                     err.read().decode(errors="replace"))


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def salt_json(stdout):
    """The return of ``salt-call --out=json``/``salt --out=json`` (several JSON documents for salt)."""
    decoder, docs, text = json.JSONDecoder(), [], stdout.strip()
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def state_changes(state_ret):
    """{state id: changes} for the states that changed something, and the failed ones."""
    changed = {k.split("_|-")[1]: v["changes"] for k, v in state_ret.items() if v.get("changes")}
    failed = {k.split("_|-")[1]: v.get("comment") for k, v in state_ret.items() if v.get("result") is False}
    return changed, failed


@dataclasses.dataclass
class Row:
    bench: str
    case: str
    runs: str
    value: str                # the formula's figure (median)
    baseline: str             # what it is compared against
    baseline_value: str
    ratio: float | None       # value / baseline (time, RSS), or as stated in the target
    target: str
    met: bool | None          # None: no target for this row
    note: str = ""

    def cells(self):
        ratio = "—" if self.ratio is None else f"{self.ratio:.2f}x"
        met = "—" if self.met is None else ("met" if self.met else "**MISSED**")
        return [self.bench, self.case, self.runs, self.value, self.baseline, self.baseline_value, ratio, self.target,
                met, self.note]


HEADER = ["bench", "case", "runs", "formula (median)", "baseline", "baseline (median)", "ratio", "target", "met",
          "note"]


def fmt_s(seconds):
    if seconds != seconds:  # nan
        return "n/a"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def markdown_table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row.cells()) + " |")
    return "\n".join(lines)


def text_table(rows):
    table = [HEADER] + [[str(c) for c in row.cells()] for row in rows]
    widths = [min(max(len(r[i]) for r in table), 48) for i in range(len(HEADER))]
    out = []
    for n, r in enumerate(table):
        out.append("  ".join(c[:48].ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
