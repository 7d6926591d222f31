"""
Generate test TLS certificates for libvirt
==========================================

:depends: cryptography

The Salt counterpart of ``kolla-ansible certificates`` for libvirt: a CA and
the certificates libvirtd and nova-compute need, written where the
``nova_libvirt`` formula looks for them (``salt://nova_libvirt_tls/<minion
id>/<file>``, then ``salt://nova_libvirt_tls/<file>``). Like Kolla's, the CA
is meant for development and test deployments.

Differences from Kolla:

* the certificates carry keyUsage (digitalSignature, keyEncipherment) and
  extendedKeyUsage (serverAuth, clientAuth), so libvirt's startup check passes
  without warnings;
* ``per_host=True`` issues one key and certificate per host instead of one
  shared pair;
* the host list can come from the minions themselves (``target=``), using the
  migration hostname and listen address the formula computes on each minion;
* running it again changes nothing unless the host list or options changed,
  or a certificate is close to expiry; adding a host reissues the shared
  certificate (the key is kept);
* RSA or EC keys.

Files written, with ``dest`` defaulting to ``<first file_roots:base
directory>/nova_libvirt_tls``:

.. code-block:: text

    <pki_dir>/nova_libvirt/ca.key  CA private key, on the master outside
                                 file_roots (0600, directory 0700)
    <dest>/cacert.pem            CA certificate        (0644)
    <dest>/servercert.pem        shared mode: one certificate for all hosts,
    <dest>/clientcert.pem          used as server and client certificate (0644)
    <dest>/serverkey.pem         shared mode: its key  (0600)
    <dest>/clientkey.pem
    <dest>/<host>/...            per_host mode: the same four files per host

.. warning::

    The Salt file server hands every file under ``file_roots`` to every
    authenticated minion, whatever its mode. Keep the CA key away from it,
    e.g. in the master configuration:

    .. code-block:: yaml

        file_ignore_glob:
          - '*nova_libvirt_tls/private/*'

    The CA key defaults to the master's pki_dir, outside file_roots; the
    runner warns when a ``ca_key`` given inside file_roots can be served. Host keys
    under ``salt://`` can be fetched by any minion as well; ship them through
    pillar (for example the ``file_tree`` ext_pillar) where that matters.

CLI Examples:

.. code-block:: bash

    # Kolla's behaviour: one shared certificate for these hosts
    salt-run nova_libvirt.generate_certificates hosts=cmp1.example.com,cmp2.example.com

    # Ask the compute minions for their migration hostname and address
    salt-run nova_libvirt.generate_certificates target='G@roles:compute' \\
        tgt_type=compound per_host=True ip_sans=True key_type=ec
"""

import fnmatch
import ipaddress
import logging
import os
import re
import tempfile
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

try:
    import cryptography.x509 as cx509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    HAS_CRYPTOGRAPHY = True
except ImportError:
    HAS_CRYPTOGRAPHY = False

from salt.exceptions import SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "nova_libvirt"

CA_CERT = "cacert.pem"
SERVER_CERT = "servercert.pem"
CLIENT_CERT = "clientcert.pem"
SERVER_KEY = "serverkey.pem"
CLIENT_KEY = "clientkey.pem"
CA_COMMON_NAME = "nova_libvirt test CA"
ORGANIZATION = "nova_libvirt"
CA_RSA_BITS = 4096
RENEW_BEFORE = timedelta(days=30)
# Tolerates a few minutes of clock skew between the master and the hosts
# without making a fresh certificate "not yet valid" there.
BACKDATE = timedelta(minutes=5)
# libvirt refuses certificate files over 64 KiB (virnettlscert.c).
MAX_FILE_SIZE = 1 << 16
CERT_MODE = 0o644
KEY_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
DIR_MODE = 0o755

_CURVES = {
    "secp256r1": "SECP256R1",
    "prime256v1": "SECP256R1",
    "p-256": "SECP256R1",
    "secp384r1": "SECP384R1",
    "p-384": "SECP384R1",
    "secp521r1": "SECP521R1",
    "p-521": "SECP521R1",
}
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")

Host = namedtuple("Host", "name dns ips")
Params = namedtuple(
    "Params", "key_type key_size curve days ca_days renew_before force"
)


def __virtual__():
    if not HAS_CRYPTOGRAPHY:
        return (
            False,
            "nova_libvirt runner: the Python package 'cryptography' is not "
            "importable by the master's Python; install it (salt-pip install "
            "cryptography)",
        )
    return __virtualname__


def generate_certificates(
    hosts=None,
    target=None,
    tgt_type="glob",
    dest=None,
    per_host=False,
    ip_sans=False,
    key_type="rsa",
    key_size=2048,
    curve="secp384r1",
    days=500,
    ca_days=1024,
    force=False,
    ca_key=None,
):
    """
    Create or update a test CA and libvirt TLS certificates for compute hosts.

    hosts
        Host names, as a list or a comma-separated string. An entry
        ``name=ip`` also gives the host's address (used with ``ip_sans``); an
        IP address on its own becomes an IP subjectAltName. With ``per_host``
        each name is also the directory name.

    target
        Instead of ``hosts``: the minions to ask for ``nova_libvirt.settings``.
        Each answers with its ``migration_hostname`` (the subjectAltName) and
        ``listen_address`` (added with ``ip_sans``). Minions that do not
        answer, or answer with an error, make the run fail before anything is
        written.

    tgt_type : glob
        How ``target`` is matched (glob, list, compound, ...).

    dest
        Output directory. Defaults to ``nova_libvirt_tls`` in the master's
        first ``file_roots:base`` directory.

    per_host : False
        One key and certificate per host in ``<dest>/<host or minion id>/``
        (subjectAltName: that host only). By default one key and certificate
        shared by all hosts is written to ``dest``, as Kolla does.

    ip_sans : False
        Add the hosts' IP addresses to the subjectAltName.

    key_type : rsa
        ``rsa`` or ``ec`` for the host keys, and for a new CA key (RSA 4096
        bits or EC on ``curve``).

    key_size : 2048
        RSA host key size in bits.

    curve : secp384r1
        EC curve: ``secp256r1``, ``secp384r1`` or ``secp521r1``.

    days : 500
        Validity of host certificates (capped at the CA's expiry).

    ca_days : 1024
        Validity of a new CA certificate.

    ca_key
        Where the CA's private key lives. Default: ``<master pki_dir>/nova_libvirt/ca.key``,
        outside ``file_roots``, so the file server can never hand it to a minion.

    force : False
        Create a new CA, new keys and new certificates even if valid ones
        exist. Every host then needs the new ``cacert.pem``.

    Returns ``{"result": bool, "dest": str, "changed": [paths], "unchanged":
    [paths], "hosts": {host: {"dir", "dns", "ip"}}, "ca": {...}, "errors":
    [str], "warnings": [str]}``. No key material is returned or logged.

    CLI Example:

    .. code-block:: bash

        salt-run nova_libvirt.generate_certificates hosts=cmp1,cmp2=10.0.0.12 ip_sans=True
        salt-run nova_libvirt.generate_certificates target='cmp*' per_host=True key_type=ec
    """
    ret = {
        "result": True,
        "dest": None,
        "changed": [],
        "unchanged": [],
        "hosts": {},
        "ca": {},
        "errors": [],
        "warnings": [],
    }
    try:
        params = _params(key_type, key_size, curve, days, ca_days, force)
        dest = _destination(dest)
        ret["dest"] = dest
        if (hosts is None) == (target is None):
            raise SaltInvocationError(
                "Give exactly one of hosts= (host names) or target= (minions to ask "
                "for their migration hostname)"
            )
        if hosts is not None:
            host_list = _hosts_from_list(hosts, ip_sans, ret["warnings"])
        else:
            host_list = _hosts_from_target(target, tgt_type, ip_sans, ret["errors"])
    except SaltInvocationError as exc:
        ret["errors"].append(str(exc))
    if ret["errors"]:
        return _failed(ret)
    if not host_list:
        ret["errors"].append("No hosts given; nothing to issue certificates for")
        return _failed(ret)

    ca_key_path = ca_key or os.path.join(__opts__["pki_dir"], "nova_libvirt", "ca.key")
    ret["warnings"].extend(_exposure_warnings(ca_key_path))
    now = datetime.now(timezone.utc)
    try:
        ca_key, ca_cert = _ensure_ca(dest, ca_key_path, params, now, ret)
        if ca_key is None:
            return _failed(ret)
        ret["ca"] = {
            "path": os.path.join(dest, CA_CERT),
            "subject": ca_cert.subject.rfc4514_string(),
            "fingerprint": _hex(ca_cert.fingerprint(hashes.SHA256())),
            "not_after": ca_cert.not_valid_after_utc.isoformat(),
        }

        if per_host:
            jobs = [(os.path.join(dest, h.name), h.dns, h.ips) for h in host_list]
        else:
            dns = sorted({name for h in host_list for name in h.dns})
            ips = sorted({ip for h in host_list for ip in h.ips}, key=_ip_sort_key)
            jobs = [(dest, tuple(dns), tuple(ips))]

        def run(job):
            return _ensure_bundle(*job, ca_key=ca_key, ca_cert=ca_cert, params=params, now=now)

        if len(jobs) > 1:
            # Key generation releases the GIL, so threads use all cores.
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                outcomes = list(pool.map(run, jobs))
        else:
            outcomes = [run(job) for job in jobs]
    except OSError as exc:
        ret["errors"].append(
            f"Cannot write under {dest}: {exc.strerror or exc} ({exc.filename}); "
            "check the directory exists and is writable by the master's user"
        )
        return _failed(ret)

    for outcome in outcomes:
        ret["changed"].extend(outcome["changed"])
        ret["unchanged"].extend(outcome["unchanged"])
        ret["errors"].extend(outcome["errors"])
        ret["warnings"].extend(outcome["warnings"])
    for host in host_list:
        ret["hosts"][host.name] = {
            "dir": os.path.join(dest, host.name) if per_host else dest,
            "dns": list(host.dns),
            "ip": [str(ip) for ip in host.ips],
        }
    if ret["errors"]:
        return _failed(ret)
    return ret


# --- arguments and hosts ----------------------------------------------------


def _params(key_type, key_size, curve, days, ca_days, force):
    key_type = str(key_type).lower()
    if key_type not in ("rsa", "ec"):
        raise SaltInvocationError(f"key_type must be 'rsa' or 'ec', got {key_type!r}")
    try:
        key_size = int(key_size)
        days = int(days)
        ca_days = int(ca_days)
    except (TypeError, ValueError):
        raise SaltInvocationError(
            "key_size, days and ca_days must be whole numbers"
        ) from None
    if key_type == "rsa" and key_size < 2048:
        raise SaltInvocationError(
            "key_size must be at least 2048 bits (GnuTLS rejects smaller RSA "
            f"keys), got {key_size}"
        )
    curve_name = _CURVES.get(str(curve).lower())
    if curve_name is None:
        raise SaltInvocationError(
            f"curve must be one of secp256r1, secp384r1, secp521r1, got {curve!r}"
        )
    if days < 1 or ca_days < 1:
        raise SaltInvocationError("days and ca_days must be at least 1")
    # With short test validities a fixed 30-day renewal window would reissue
    # on every run; renew in the last half of the validity instead.
    renew_before = min(RENEW_BEFORE, timedelta(days=days) / 2)
    return Params(
        key_type,
        key_size,
        getattr(ec, curve_name)(),
        days,
        ca_days,
        renew_before,
        bool(force),
    )


def _destination(dest):
    if dest:
        return os.path.abspath(os.path.expanduser(str(dest)))
    roots = (__opts__.get("file_roots") or {}).get("base") or []
    if not roots:
        raise SaltInvocationError(
            "The master has no file_roots:base directory to write to; pass dest=<directory>"
        )
    return os.path.join(os.path.abspath(roots[0]), "nova_libvirt_tls")


def _hosts_from_list(hosts, ip_sans, warnings):
    if isinstance(hosts, str):
        items = hosts.split(",")
    elif isinstance(hosts, (list, tuple)):
        items = list(hosts)
    else:
        raise SaltInvocationError(
            f"hosts must be a list or a comma-separated string, got {type(hosts).__name__}"
        )
    merged = {}
    ignored_ips = []
    for item in items:
        if not isinstance(item, str):
            raise SaltInvocationError(f"hosts entries must be strings, got {item!r}")
        item = item.strip()
        if not item:
            continue
        name, _, address = item.partition("=")
        dns, ips = _classify(name.strip(), f"hosts entry {item!r}")
        if address.strip():
            ip = _parse_ip(address.strip(), f"hosts entry {item!r}")
            if ip_sans:
                ips = ips + (ip,)
            else:
                ignored_ips.append(item)
        key = dns[0] if dns else str(ips[0])
        old = merged.get(key, Host(key, (), ()))
        merged[key] = Host(key, _uniq(old.dns + dns), _uniq(old.ips + ips))
    if ignored_ips:
        warnings.append(
            "IP addresses in hosts entries were not added to the certificates "
            f"({', '.join(ignored_ips)}); pass ip_sans=True to add them"
        )
    return [merged[key] for key in sorted(merged)]


def _hosts_from_target(target, tgt_type, ip_sans, errors):
    import salt.client  # pylint: disable=import-outside-toplevel

    timeout = __opts__.get("timeout") or 5
    client = salt.client.LocalClient(mopts=__opts__)
    returns = client.cmd(
        target,
        "nova_libvirt.settings",
        tgt_type=tgt_type,
        timeout=timeout,
        full_return=True,
    )
    if not returns:
        errors.append(
            f"Target {target!r} (tgt_type={tgt_type}) matched no minions or none "
            f"answered; check with: salt-run manage.up tgt={target!r} tgt_type={tgt_type}"
        )
        return []
    host_list = []
    for minion_id in sorted(returns):
        data = returns[minion_id]
        retcode = 0
        if isinstance(data, dict) and "ret" in data and "migration_hostname" not in data:
            retcode = data.get("retcode") or 0
            data = data["ret"]
        if data is False or data is None:
            errors.append(
                f"Minion {minion_id} did not answer nova_libvirt.settings within "
                f"{timeout} s; check it is up (salt {minion_id} test.ping) or run "
                "again with a longer timeout (salt-run -t 60 ...)"
            )
            continue
        if isinstance(data, str) or not isinstance(data, dict) or retcode:
            detail = str(data).strip().splitlines()[0][:300] if str(data).strip() else ""
            errors.append(
                f"Minion {minion_id}: nova_libvirt.settings failed ({detail}); "
                f"sync the formula's modules (salt {minion_id} saltutil.sync_modules) "
                f"and check its pillar (salt {minion_id} nova_libvirt.settings)"
            )
            continue
        if os.sep in minion_id or minion_id in ("", ".", ".."):
            errors.append(
                f"Minion id {minion_id!r} cannot be used as a directory name under dest"
            )
            continue
        hostname = str(data.get("migration_hostname") or "").strip()
        if not hostname:
            errors.append(
                f"Minion {minion_id}: nova_libvirt.settings returned no "
                "migration_hostname; set it in the minion's pillar"
            )
            continue
        try:
            dns, ips = _classify(hostname, f"migration_hostname of minion {minion_id}")
        except SaltInvocationError as exc:
            errors.append(str(exc))
            continue
        listen = str(data.get("listen_address") or "").strip()
        if ip_sans and listen:
            try:
                address = ipaddress.ip_address(listen)
            except ValueError:
                address = None
            # A wildcard or loopback listen address says nothing about how
            # peers reach the host.
            if address is not None and not (address.is_unspecified or address.is_loopback):
                ips = _uniq(ips + (address,))
        host_list.append(Host(minion_id, dns, ips))
    return host_list


def _classify(name, what):
    """Split a host name into (dns names, ip addresses)."""
    candidate = name.strip().strip("[]")
    try:
        return (), (ipaddress.ip_address(candidate),)
    except ValueError:
        pass
    normalised = name.strip().rstrip(".").lower()
    if not _HOSTNAME_RE.match(normalised):
        raise SaltInvocationError(
            f"{what}: {name!r} is not a valid host name (letters, digits, '-' and "
            "'.' only; no wildcards or paths)"
        )
    return (normalised,), ()


def _parse_ip(value, what):
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise SaltInvocationError(f"{what}: {value!r} is not an IP address") from None


def _uniq(items):
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return tuple(seen)


def _ip_sort_key(address):
    return (address.version, int(address))


def _exposure_warnings(key_path):
    regexes = __opts__.get("file_ignore_regex") or []
    globs = __opts__.get("file_ignore_glob") or []
    warnings = []
    for env, roots in (__opts__.get("file_roots") or {}).items():
        for root in roots or []:
            root = os.path.abspath(root)
            if os.path.commonpath([root, key_path]) != root:
                continue
            rel = os.path.relpath(key_path, root)
            # The file server checks the full path when serving and the
            # relative path when listing; both must be excluded.
            ignored = all(
                any(re.search(rx, path) for rx in regexes)
                or any(fnmatch.fnmatch(path, gl) for gl in globs)
                for path in (key_path, rel)
            )
            if not ignored:
                rel_dir = os.path.dirname(rel).replace(os.sep, "/")
                warnings.append(
                    f"The CA key {key_path} is inside the file server root {root} "
                    f"(saltenv {env}): any minion can fetch it as salt://{rel}. Add "
                    f"to the master configuration: file_ignore_glob: ['*{rel_dir}/*'] "
                    "(or pass a dest outside file_roots and copy the public files)"
                )
    return warnings


def _failed(ret):
    ret["result"] = False
    __context__["retcode"] = 1
    return ret


# --- CA ---------------------------------------------------------------------


def _ensure_ca(dest, key_path, params, now, ret):
    cert_path = os.path.join(dest, CA_CERT)
    _ensure_dir(dest, DIR_MODE)
    _ensure_dir(os.path.dirname(key_path), PRIVATE_DIR_MODE, enforce=True)
    key_pem = _read(key_path)
    cert_pem = _read(cert_path)

    if params.force or (key_pem is None and cert_pem is None):
        key = _new_key(params, ca=True)
        cert = _issue_ca(key, params, now)
        _record(ret, key_path, _write(key_path, _key_pem(key), KEY_MODE))
        _record(ret, cert_path, _write(cert_path, _cert_pem(cert), CERT_MODE))
        return key, cert

    renew = (
        f"pass force=True to create a new CA (this reissues every certificate, "
        f"and every host needs the new {CA_CERT})"
    )
    if key_pem is None:
        ret["errors"].append(
            f"{cert_path} exists but its key {key_path} is missing, so nothing can "
            f"be signed; restore the key, or {renew}"
        )
        return None, None
    key = _load_key(key_pem)
    if key is None:
        ret["errors"].append(
            f"{key_path} is not an unencrypted PEM private key; restore it, or {renew}"
        )
        return None, None
    if cert_pem is None:
        # Same key and subject: certificates issued before still verify.
        cert = _issue_ca(key, params, now)
        _record(ret, key_path, _write(key_path, key_pem, KEY_MODE))
        _record(ret, cert_path, _write(cert_path, _cert_pem(cert), CERT_MODE))
        return key, cert
    cert = _load_cert(cert_pem)
    if cert is None:
        ret["errors"].append(
            f"{cert_path} holds no PEM certificate; restore it, or {renew}"
        )
        return None, None
    if _spki(cert.public_key()) != _spki(key.public_key()):
        ret["errors"].append(
            f"{cert_path} does not belong to {key_path} (their public keys differ); "
            f"restore the matching pair, or {renew}"
        )
        return None, None
    if cert.not_valid_after_utc <= now:
        ret["errors"].append(
            f"The CA certificate {cert_path} expired on {_fmt(cert.not_valid_after_utc)}; {renew}"
        )
        return None, None
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        ret["warnings"].append(
            f"The CA certificate {cert_path} expires on {_fmt(cert.not_valid_after_utc)}; "
            f"host certificates cannot outlive it. Plan a CA change: {renew}"
        )
    _record(ret, key_path, _write(key_path, key_pem, KEY_MODE))
    _record(ret, cert_path, _write(cert_path, cert_pem, CERT_MODE))
    return key, cert


def _issue_ca(key, params, now):
    name = cx509.Name(
        [
            # O matches the host certificates: virt-pki-validate compares them.
            cx509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            cx509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    builder = (
        cx509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(cx509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=params.ca_days))
        .add_extension(cx509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(
            cx509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    return builder.sign(key, _hash_for(key))


# --- host bundles -----------------------------------------------------------


def _ensure_bundle(directory, dns, ips, ca_key, ca_cert, params, now):
    """Keep or (re)issue one key/certificate pair and write the four files."""
    outcome = {"changed": [], "unchanged": [], "errors": [], "warnings": []}
    paths = {
        n: os.path.join(directory, n)
        for n in (SERVER_CERT, CLIENT_CERT, SERVER_KEY, CLIENT_KEY)
    }
    _ensure_dir(directory, DIR_MODE)

    key_pem = None if params.force else _read(paths[SERVER_KEY])
    key = _load_key(key_pem) if key_pem is not None else None
    if key is None or not _key_fits(key, params):
        key = _new_key(params)
        key_pem = _key_pem(key)
        cert_pem = None
    else:
        cert_pem = None if params.force else _read(paths[SERVER_CERT])

    subject = _leaf_subject(dns, ips)
    cert = _load_cert(cert_pem) if cert_pem is not None else None
    if cert is None or not _cert_current(cert, key, ca_cert, subject, dns, ips, params, now):
        not_after = now + timedelta(days=params.days)
        if not_after > ca_cert.not_valid_after_utc:
            not_after = ca_cert.not_valid_after_utc
            outcome["warnings"].append(
                f"{paths[SERVER_CERT]}: validity cut to the CA's expiry "
                f"{_fmt(not_after)}; the CA needs renewing (force=True) before then"
            )
        cert = _issue_leaf(key, ca_key, ca_cert, subject, dns, ips, now, not_after)
        cert_pem = _cert_pem(cert)

    if len(cert_pem) > MAX_FILE_SIZE:
        outcome["errors"].append(
            f"{paths[SERVER_CERT]}: the certificate for {len(dns) + len(ips)} names is "
            f"{len(cert_pem)} bytes, over libvirt's {MAX_FILE_SIZE}-byte file limit; "
            "use per_host=True. Nothing was written for it"
        )
        return outcome

    for name, data, mode in (
        (SERVER_KEY, key_pem, KEY_MODE),
        (CLIENT_KEY, key_pem, KEY_MODE),
        (SERVER_CERT, cert_pem, CERT_MODE),
        (CLIENT_CERT, cert_pem, CERT_MODE),
    ):
        changed = _write(paths[name], data, mode)
        outcome["changed" if changed else "unchanged"].append(paths[name])
    return outcome


def _cert_current(cert, key, ca_cert, subject, dns, ips, params, now):
    """Whether an existing certificate can be kept as it is."""
    if cert.subject != subject or cert.issuer != ca_cert.subject:
        return False
    if _spki(cert.public_key()) != _spki(key.public_key()):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    if cert.not_valid_before_utc > now or cert.not_valid_after_utc - now < params.renew_before:
        return False
    try:
        san = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
        usage = cert.extensions.get_extension_for_class(cx509.ExtendedKeyUsage).value
        constraints = cert.extensions.get_extension_for_class(cx509.BasicConstraints).value
    except cx509.ExtensionNotFound:
        return False
    if constraints.ca or not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    } <= set(usage):
        return False
    have_dns = {name.lower() for name in san.get_values_for_type(cx509.DNSName)}
    have_ips = set(san.get_values_for_type(cx509.IPAddress))
    return have_dns == set(dns) and have_ips == set(ips)


def _leaf_subject(dns, ips):
    names = [name for name in dns if len(name) <= 64] + [str(ip) for ip in ips]
    # A CN is limited to 64 characters; long names live only in the SAN.
    common_name = names[0] if names else ORGANIZATION
    return cx509.Name(
        [
            cx509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            cx509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue_leaf(key, ca_key, ca_cert, subject, dns, ips, now, not_after):
    try:
        ski = ca_cert.extensions.get_extension_for_class(cx509.SubjectKeyIdentifier)
        aki = cx509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
    except cx509.ExtensionNotFound:
        aki = cx509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        cx509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(cx509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(cx509.BasicConstraints(ca=False, path_length=None), critical=True)
        # libvirt wants both bits on every server/client certificate, EC included.
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=True), critical=True
        )
        # One certificate serves libvirtd and, for migration, the client side.
        .add_extension(
            cx509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            cx509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(aki, critical=False)
        .add_extension(
            cx509.SubjectAlternativeName(
                [cx509.DNSName(name) for name in dns]
                + [cx509.IPAddress(ip) for ip in ips]
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, _hash_for(ca_key))


# --- keys, files, small helpers ---------------------------------------------


def _key_usage(
    digital_signature=False, key_encipherment=False, key_cert_sign=False, crl_sign=False
):
    return cx509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _new_key(params, ca=False):
    if params.key_type == "ec":
        return ec.generate_private_key(params.curve)
    return rsa.generate_private_key(65537, CA_RSA_BITS if ca else params.key_size)


def _key_fits(key, params):
    if params.key_type == "ec":
        return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == params.curve.name
    return isinstance(key, rsa.RSAPrivateKey) and key.key_size == params.key_size


def _hash_for(key):
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def _load_key(pem):
    try:
        # Skipping the slow RSA consistency check is safe here: the key is
        # only kept if its public half matches the certificate.
        return serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return None


def _load_cert(pem):
    try:
        return cx509.load_pem_x509_certificates(pem)[0]
    except (ValueError, IndexError):
        return None


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _ensure_dir(path, mode, enforce=False):
    os.makedirs(path, mode=mode, exist_ok=True)
    if enforce and (os.stat(path).st_mode & 0o777) != mode:
        os.chmod(path, mode)


def _write(path, data, mode):
    """Write atomically; return whether content or mode changed."""
    current = _read(path)
    if current == data:
        if (os.stat(path).st_mode & 0o777) == mode:
            return False
        os.chmod(path, mode)
        return True
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # Set the final mode before any byte of a key is written.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def _record(ret, path, changed):
    ret["changed" if changed else "unchanged"].append(path)




def _fmt(moment):
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _hex(digest):
    return digest.hex(":").upper()
