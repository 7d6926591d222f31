"""
libvirt TLS files for the ``nova_libvirt`` formula: found per minion or
shared, validated before anything is written, put where Kolla puts them.

.. code-block:: yaml

    nova_libvirt-config-tls-managed:
      nova_libvirt_tls.managed:
        - name: tls

    nova_libvirt-tls-daemon-updated:
      nova_libvirt_tls.daemon_updated:
        - name: tls
        - onchanges:
          - nova_libvirt_tls: nova_libvirt-config-tls-managed

Each of ``cacert.pem``, ``servercert.pem``, ``serverkey.pem``,
``clientcert.pem``, ``clientkey.pem`` is taken, separately, from the first
place that has it (Kolla's per-host-then-shared order; a host may mix both):

1. pillar ``nova_libvirt:tls:files:<file>`` (pillar reaches only the minions
   it targets: the place for per-host private keys, e.g. with the
   ``file_tree`` ext_pillar);
2. ``<tls:source>/<minion id>/<file>``;
3. ``<tls:source>/<file>``.

``tls:source`` is a ``salt://`` URL (default ``salt://nova_libvirt_tls``) or a
directory on the minion. The Salt file server hands every file to every
minion, so a per-minion key served from it is readable by any minion; the
state says so in its comment.

Everything is checked first (``nova_libvirt_tls.validate``: PEM, key matches
certificate, chain to the CA, CA flags, SAN covers ``migration_hostname``,
validity, key usage, size); on any problem nothing is written. Changes are
reported per destination by fingerprint, never with key material.

With ``tls:manage_certs: false`` nothing is written: the files in place are
checked and problems reported.
"""

import hashlib
import logging
import os
import pwd

import salt.utils.files
from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "nova_libvirt_tls"



def __virtual__():
    for needed in ("nova_libvirt.settings", "nova_libvirt_tls.validate"):
        if needed not in __salt__:
            return (False, f"{needed} is not available: run saltutil.sync_all (and install cryptography)")
    return __virtualname__


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _read_local(path):
    try:
        with salt.utils.files.fopen(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _find_sources(cfg, names):
    """
    ``{file: {"origin", "content", "from_file_server"}}`` and the files found
    nowhere. A salt:// source costs one listing and, per file, one hash check;
    content is transferred only when it differs from every local copy.
    """
    source = cfg["tls"]["source"].rstrip("/")
    minion = __grains__["id"]
    found, missing = {}, []
    listing = None
    if source.startswith("salt://"):
        prefix = source[len("salt://") :]
        listing = set(__salt__["cp.list_master"](prefix=prefix + "/"))
    local_copies = {}
    for entry in cfg["tls_plan"]:
        local_copies.setdefault(entry["file"], []).append(entry["dest"])
    for name in names:
        if name in cfg["tls"]["files"]:
            found[name] = {
                "origin": f"pillar:nova_libvirt:tls:files:{name}",
                "content": cfg["tls"]["files"][name].encode(),
                "from_file_server": False,
            }
            continue
        candidates = [f"{source}/{minion}/{name}", f"{source}/{name}"]
        if listing is not None:
            url = next((c for c in candidates if c[len("salt://") :] in listing), None)
            if url is None:
                missing.append((name, candidates))
                continue
            found[name] = {"origin": url, "content": _fetch(url, local_copies.get(name, [])),
                           "from_file_server": url == candidates[0]}
        else:
            path = next((c for c in candidates if os.path.isfile(c)), None)
            if path is None:
                missing.append((name, candidates))
                continue
            found[name] = {"origin": path, "content": _read_local(path), "from_file_server": False}
    return found, missing


def _fetch(url, local_paths):
    remote = __salt__["cp.hash_file"](url)
    for path in local_paths:
        data = _read_local(path)
        if data is not None and remote and remote.get("hsum") == hashlib.new(remote["hash_type"], data).hexdigest():
            return data
    content = __salt__["cp.get_file_str"](url)
    cached = __salt__["cp.is_cached"](url)
    if cached:
        # The minion's file cache would otherwise keep a copy of private keys.
        os.unlink(cached)
    if content is False or content is None:
        raise CommandExecutionError(f"{url} could not be fetched from the file server")
    return content.encode() if isinstance(content, str) else content


def _validate(files, cfg):
    report = __salt__["nova_libvirt_tls.validate"](
        {name: {"content": f["content"], "origin": f["origin"]} for name, f in files.items()},
        migration_hostname=cfg["migration_hostname"],
        warn_days=cfg["tls"]["warn_days"],
    )
    return report["errors"], report["warnings"]


def _diff(entry, content):
    """What writing ``content`` to ``entry['dest']`` would change, without content."""
    path = entry["dest"]
    changes = __salt__["nova_libvirt.metadata_changes"](path, int(entry["mode"], 8), uid=_uid(entry["owner"]))
    if changes is None:
        return {"new": _describe(entry["file"], content)}
    current = _read_local(path)
    if current != content:
        changes.update(old=_describe(entry["file"], current), new=_describe(entry["file"], content))
    return changes


def _uid(owner):
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        return 0


def _describe(name, content):
    """A non-secret identity of a file: the certificate's or public key's fingerprint."""
    try:
        return "sha256 fingerprint " + __salt__["nova_libvirt_tls.fingerprint"](content)
    except (CommandExecutionError, SaltInvocationError, ValueError):
        return f"{name}, {len(content)} bytes, sha256 of file {_sha256(content)[:16]}"


def managed(name):
    """
    Put the TLS files where this minion's libvirt and nova-compute read them,
    after validating all of them together.

    name
        A label for the state; the files and destinations come from the
        formula's settings (``nova_libvirt.settings``).
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    try:
        cfg = __salt__["nova_libvirt.settings"](reveal_secrets=True)
        if not cfg["tls"]["enabled"]:
            ret["comment"] = "TLS is disabled (nova_libvirt:tls:enabled: false)."
            return ret
        plan = cfg["tls_plan"]
        names = list(dict.fromkeys(entry["file"] for entry in plan))
        if not cfg["tls"]["manage_certs"]:
            return _check_in_place(ret, cfg, plan)

        files, missing = _find_sources(cfg, names)
        errors = [f"{file}: not found in {' or '.join(places)}" for file, places in missing]
        problems, warnings = _validate(files, cfg) if not missing else ([], [])
        errors += problems
        if errors:
            ret.update(result=False, comment="TLS files not valid; nothing was written:\n" + "\n".join(errors))
            return ret
        for file, found in files.items():
            if found["from_file_server"] and file.endswith("key.pem"):
                warnings.append(
                    f"{file} for {__grains__['id']} comes from the Salt file server ({found['origin']}), which "
                    "serves it to every minion: put per-host keys in pillar (nova_libvirt:tls:files, e.g. "
                    "the file_tree ext_pillar) instead"
                )

        changes = {}
        for entry in plan:
            diff = _diff(entry, files[entry["file"]]["content"])
            if diff:
                changes[entry["dest"]] = diff
        notes = "\n".join(f"Warning: {w}" for w in warnings)
        if not changes:
            ret["comment"] = "\n".join(filter(None, ["The TLS files are in the correct state.", notes]))
            return ret
        if __opts__["test"]:
            ret.update(
                result=None,
                changes=changes,
                comment="\n".join(filter(None, [f"{len(changes)} TLS file(s) would be written.", notes])),
            )
            return ret
        for entry in plan:
            if entry["dest"] in changes:
                __salt__["nova_libvirt.write_secret_file"](
                    entry["dest"], files[entry["file"]]["content"], owner=entry["owner"], mode=int(entry["mode"], 8)
                )
        if any(not entry["daemon"] and entry["dest"] in changes for entry in plan):
            changes["nova-compute"] = "client certificates changed: restart nova-compute to use them"
        ret.update(
            changes=changes,
            comment="\n".join(filter(None, [f"{len([c for c in changes if c.startswith('/')])} TLS file(s) written.", notes])),
        )
    except (CommandExecutionError, SaltInvocationError, OSError) as exc:
        ret.update(result=False, changes={}, comment=str(exc))
    return ret


def _check_in_place(ret, cfg, plan):
    """manage_certs off: check each destination set as it stands; write nothing."""
    problems, notes = [], []
    for group in (False, True):
        entries = [e for e in plan if e["daemon"] is group]
        if not entries:
            continue
        present = {}
        for entry in entries:
            content = _read_local(entry["dest"])
            if content is None:
                problems.append(f"{entry['file']}: missing at {entry['dest']}")
            else:
                present[entry["file"]] = {"content": content, "origin": entry["dest"]}
        if present:
            errors, warnings = _validate(present, cfg)
            problems += errors
            notes += warnings
    if problems:
        ret.update(
            result=False,
            comment="TLS files are managed outside the formula (tls:manage_certs: false) and have problems:\n"
            + "\n".join(problems),
        )
    else:
        ret["comment"] = "\n".join(
            ["TLS files are managed outside the formula; the files in place are valid."] + [f"Warning: {w}" for w in notes]
        )
    return ret


def daemon_updated(name):
    """
    Make the running libvirtd present the server certificate installed for it,
    without a restart (``nova_libvirt.reload_tls``: ``virt-admin
    server-update-tls``), so guests and connections keep running. It compares
    what the TLS port presents with the installed file on every run, so it
    also catches certificates replaced outside the formula
    (``tls:manage_certs: false``), which Kolla cannot.

    name
        A label for the state.
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    try:
        status = __salt__["nova_libvirt.tls_status"]()
        if status["served"] is None:
            ret["comment"] = "No libvirtd answers on the TLS port: it reads the TLS files when it starts."
            return ret
        if status["current"]:
            ret["comment"] = "libvirtd presents the installed server certificate."
            return ret
        changes = {"libvirtd": {"old": status["served"], "new": status["installed"]}}
        if __opts__["test"]:
            ret.update(result=None, changes=changes, comment="libvirtd would be told to reload its TLS files.")
            return ret
        outcome = __salt__["nova_libvirt.reload_tls"]()
        ret.update(changes={"libvirtd": outcome}, comment=outcome)
    except CommandExecutionError as exc:
        ret.update(result=False, changes={}, comment=str(exc))
    return ret
