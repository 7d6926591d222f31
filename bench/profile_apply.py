"""
Where the time of a no-change ``state.apply nova_libvirt`` goes (host mode):
pyinstrument profiles of the formula's apply and of the floor SLS, split into
the formula's own code (its execution/state modules, synced into the minion's
extmods, and its SLS/Jinja templates, including the Salt functions they call)
and Salt itself; plus Salt's per-state durations of the same run.

    .venv/bin/python bench/profile_apply.py [host] [container]    # writes bench/profiles/

Also used by ``run.py --profile``.
"""

import collections
import json
import os
import pathlib
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BENCH, PYTHON, log, median, salt_json, timed, tmpdir  # noqa: E402
from noop_apply import SALT_CALL, Masterless, host_pillar  # noqa: E402

OUT = BENCH / "profiles"


def is_formula(path):
    path = path or ""
    name = os.path.basename(path)
    if "/extmods/" in path and name.startswith("nova_libvirt"):
        return True
    return "/nova_libvirt/" in path and (name.endswith(".sls") or name.endswith(".jinja"))


def is_salt(path):
    return "/site-packages/salt/" in (path or "")


def has_formula(frame):
    return is_formula(frame["file_path"]) or any(has_formula(c) for c in frame.get("children", []))


def walk(frame, outer=None, acc=None, inclusive=None, callees=None):
    """
    ``acc``: inclusive time of the outermost formula frames (the formula's whole share);
    ``inclusive``: inclusive time of every formula function; ``callees``: for each formula
    function, the Salt/library calls it makes (non-formula subtrees holding no formula code).
    """
    if acc is None:
        acc, inclusive, callees = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    nearest = outer
    if is_formula(frame["file_path"]):
        key = f"{os.path.basename(frame['file_path'])}:{frame['function']}"
        if outer is None:
            acc[key] += frame["time"]
        inclusive[key] += frame["time"]
        nearest = key
    elif outer is not None and not has_formula(frame):
        callees[outer][f"{frame['file_path_short']}:{frame['function']}"] += frame["time"]
        return acc, inclusive, callees
    for child in frame.get("children", []):
        walk(child, nearest, acc, inclusive, callees)
    return acc, inclusive, callees


def self_times(frame, acc=None):
    acc = acc if acc is not None else collections.Counter()
    own = frame["time"] - sum(c["time"] for c in frame.get("children", []))
    acc[(frame["file_path_short"], frame["function"])] += own
    for c in frame.get("children", []):
        self_times(c, acc)
    return acc


def analyse(path):
    data = json.loads(pathlib.Path(path).read_text())
    root = data["root_frame"]
    acc, inclusive, callees = walk(root)
    return {"duration": data["duration"], "formula": acc, "inclusive": inclusive, "callees": callees,
            "self": self_times(root)}


def state_durations(m, runs=3):
    per_state = collections.defaultdict(list)
    totals = []
    for _ in range(runs):
        r = m.apply("nova_libvirt", expect_changes=False)
        totals.append(r.seconds)
        for key, st in salt_json(r.stdout)[0]["local"].items():
            per_state[key.split("_|-")[1]].append(st.get("duration", 0.0))
    return median(totals), {k: median(v) for k, v in per_state.items()}


def main(mode="host"):
    """Profile the no-change apply in ``mode`` (host, or container with container_apply's isolation)."""
    OUT.mkdir(exist_ok=True)
    work = tmpdir("prof")
    cleanup = None
    if mode == "container":
        import container_apply  # pylint: disable=import-outside-toplevel

        reason = container_apply.wait_until_safe(180)
        if reason:
            print(f"container profile not taken: {reason}")
            return None
        kvm_gid = os.stat("/dev/kvm").st_gid if os.path.exists("/dev/kvm") else None
        udev_existed = container_apply.UDEV_RULE.exists()
        cleanup = lambda: container_apply.cleanup(kvm_gid, udev_existed)  # noqa: E731
    try:
        m = Masterless(work, minion_id=f"bench-prof-{mode}")
        m.set_pillar({})
        m.call("saltutil.sync_all")
        if mode == "container":
            (work / "host" / "run").mkdir(parents=True)
            m.set_pillar(container_apply.container_pillar(work / "host"))
        else:
            m.set_pillar(host_pillar(work / "host"))
        m.apply("nova_libvirt", expect_changes=True)
        total, states = state_durations(m)
        profiles = {}
        for sls in ("nova_libvirt", "floor"):
            runs = []
            for i in range(3):
                dest = OUT / f"{mode}-{sls}-{i}.json"
                r = timed([PYTHON, "-m", "pyinstrument", "-r", "json", "-o", str(dest), SALT_CALL,
                           *m.argv("state.apply", sls)[1:]])
                if r.returncode:
                    raise RuntimeError(f"pyinstrument failed: {r.stderr[-2000:]}")
                runs.append(analyse(dest))
                if i:
                    dest.unlink()
                else:
                    dest.rename(OUT / f"{mode}-{sls}.json")
            # Text rendering of one run for reading.
            timed([PYTHON, "-m", "pyinstrument", "-r", "text", "-o", str(OUT / f"{mode}-{sls}.txt"),
                   SALT_CALL, *m.argv("state.apply", sls)[1:]])
            profiles[sls] = runs
    finally:
        if cleanup:
            cleanup()
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"# Profile of the no-change apply ({mode} mode)", ""]
    dur = {k: median([r["duration"] for r in v]) for k, v in profiles.items()}
    lines.append(f"pyinstrument, median of 3: nova_libvirt {dur['nova_libvirt'] * 1000:.0f} ms, floor "
                 f"{dur['floor'] * 1000:.0f} ms, difference {(dur['nova_libvirt'] - dur['floor']) * 1000:.0f} ms "
                 f"(wall of the unprofiled runs: {total * 1000:.0f} ms).")
    lines += ["", "## The formula's own code (outermost formula frames, inclusive, median of 3)", "",
              "| frame | ms |", "|---|---|"]
    keys = set().union(*(r["formula"].keys() for r in profiles["nova_libvirt"]))
    formula_ms = {k: median([r["formula"].get(k, 0.0) for r in profiles["nova_libvirt"]]) * 1000 for k in keys}
    for k, v in sorted(formula_ms.items(), key=lambda kv: -kv[1]):
        if v >= 1:
            lines.append(f"| {k} | {v:.0f} |")
    lines.append(f"| **total formula code** | **{sum(formula_ms.values()):.0f}** |")
    lines += ["", "## Every formula function, inclusive (median of 3, ms; nested calls counted in each)", "",
              "| function | ms |", "|---|---|"]
    keys = set().union(*(r["inclusive"].keys() for r in profiles["nova_libvirt"]))
    inc = {k: median([r["inclusive"].get(k, 0.0) for r in profiles["nova_libvirt"]]) * 1000 for k in keys}
    for k, v in sorted(inc.items(), key=lambda kv: -kv[1]):
        if v >= 2:
            lines.append(f"| {k} | {v:.0f} |")
    lines += ["", "## What formula code calls (Salt/library subtrees without formula code; first run)", ""]
    first = profiles["nova_libvirt"][0]
    for top, calls in sorted(first["callees"].items(), key=lambda kv: -first["inclusive"][kv[0]]):
        items = [f"{name} {t * 1000:.0f} ms" for name, t in calls.most_common(6) if t * 1000 >= 2]
        if items:
            lines.append(f"- {top}: " + "; ".join(items))
    lines += ["", "## Salt's per-state durations in the same no-change apply (median of 3 runs, ms)", "",
              "| state | ms |", "|---|---|"]
    for k, v in sorted(states.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.1f} |")
    lines.append(f"| **sum of states** | **{sum(states.values()):.1f}** |")
    lines += ["", "## Largest self times: formula apply minus floor (median of 3, ms)", "", "| function | ms |",
              "|---|---|"]
    diff = collections.Counter()
    for key in set().union(*(r["self"].keys() for r in profiles["nova_libvirt"] + profiles["floor"])):
        a = median([r["self"].get(key, 0.0) for r in profiles["nova_libvirt"]])
        b = median([r["self"].get(key, 0.0) for r in profiles["floor"]])
        diff[key] = a - b
    for (path, fn), t in diff.most_common(15):
        if t * 1000 >= 3:
            lines.append(f"| {path}:{fn} | {t * 1000:.0f} |")
    text = "\n".join(lines) + "\n"
    (OUT / f"summary-{mode}.md").write_text(text)
    print(text)
    log(f"profiles written to {OUT}")
    return text


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["host"]:
        main(arg)
