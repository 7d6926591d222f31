"""
Check libvirt TLS material before it is installed
=================================================

:depends: cryptography

libvirtd runs a sanity check over its certificates when it starts
(``src/rpc/virnettlscert.c``) and refuses to start, or refuses TLS connections,
when that check fails. nova-compute then cannot reach libvirt and live
migration fails with errors such as "Failed to verify peer's certificate".
This module runs the same checks on the content Salt is about to install, so
that a bad file fails the state with a message naming the file, where it came
from and what to do, instead of breaking a running compute host.

The files are the ones Kolla Ansible and libvirt use:

==================  ================================================
``cacert.pem``      CA certificate(s), ``/etc/pki/CA/cacert.pem``
``servercert.pem``  libvirtd's certificate (containerised libvirt)
``serverkey.pem``   libvirtd's private key
``clientcert.pem``  client certificate (nova-compute, migration)
``clientkey.pem``   client private key
==================  ================================================

No function returns, logs or puts into a message any private key material:
keys are only ever described by the SHA-256 fingerprint of their public half.

Python use, e.g. from a state module:

.. code-block:: python

    report = __salt__["nova_libvirt_tls.validate"](
        {
            "cacert.pem": {
                "content": ca_pem,
                "origin": "salt://nova_libvirt_tls/cacert.pem",
            },
            "servercert.pem": {
                "content": cert_pem,
                "origin": "salt://nova_libvirt_tls/cmp1/servercert.pem",
            },
            "serverkey.pem": {
                "content": key_pem,
                "origin": "pillar:nova_libvirt:tls:files:serverkey.pem",
            },
        },
        migration_hostname="cmp1.example.com",
    )
    if report["errors"]:
        ...

CLI use, checking the files already installed on a compute host:

.. code-block:: bash

    salt cmp1 nova_libvirt_tls.validate \\
        '{"cacert.pem": {"path": "/etc/pki/CA/cacert.pem"},
          "clientcert.pem": {"path": "/etc/pki/libvirt/clientcert.pem"},
          "clientkey.pem": {"path": "/etc/pki/libvirt/private/clientkey.pem"}}'
    salt cmp1 nova_libvirt_tls.describe "$(cat servercert.pem)"
"""

import binascii
import ipaddress
import logging
from datetime import datetime, timedelta, timezone

try:
    import cryptography.x509 as cx509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    HAS_CRYPTOGRAPHY = True
except ImportError:
    HAS_CRYPTOGRAPHY = False

from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "nova_libvirt_tls"

# libvirt reads certificate files with virFileReadAll(file, 1 << 16, ...)
# and fails on anything longer; the CA file may hold at most 16 certificates.
MAX_FILE_SIZE = 1 << 16
MAX_CA_CERTS = 16

CA_FILE = "cacert.pem"
FILE_ORDER = (
    "cacert.pem",
    "servercert.pem",
    "serverkey.pem",
    "clientcert.pem",
    "clientkey.pem",
)
CERT_FILES = ("cacert.pem", "servercert.pem", "clientcert.pem")
KEY_FOR_CERT = {"servercert.pem": "serverkey.pem", "clientcert.pem": "clientkey.pem"}
CERT_FOR_KEY = {key: cert for cert, key in KEY_FOR_CERT.items()}

# Refuse to read absurdly large files given by path; anything above
# MAX_FILE_SIZE is reported as an error anyway.
_READ_LIMIT = 4 * MAX_FILE_SIZE


def __virtual__():
    if not HAS_CRYPTOGRAPHY:
        return (
            False,
            "nova_libvirt_tls: the Python package 'cryptography' is not importable "
            "by Salt's Python; install it (salt-pip install cryptography)",
        )
    return __virtualname__


def validate(files, migration_hostname=None, warn_days=30, now=None):
    """
    Check libvirt TLS files the way libvirtd checks them when it starts, and
    report every problem at once.

    files
        A dict mapping file names (``cacert.pem``, ``servercert.pem``,
        ``serverkey.pem``, ``clientcert.pem``, ``clientkey.pem``) to
        ``{"content": <PEM str or bytes>, "origin": <where it came from>}``.
        Instead of ``content`` an entry may give ``path``, a file on the
        minion; ``origin`` then defaults to that path. Only the files given are
        checked (a host libvirt daemon gets no server pair), but a certificate
        without its key, a key without its certificate, or any file without
        ``cacert.pem`` is an error.

    migration_hostname
        The name (or IP address) peers use to reach this libvirtd. When given,
        ``servercert.pem`` must cover it in its subjectAltName.

    warn_days : 30
        Warn when fewer than this many days remain before a certificate
        expires.

    now
        The time to check validity against (a timezone-aware ``datetime``, a
        naive one taken as UTC, or an ISO 8601 string). Defaults to the
        current time.

    Returns ``{"errors": [str, ...], "warnings": [str, ...]}``. Every message
    starts with the file name and its origin. Errors are conditions under
    which libvirt refuses the file; warnings are conditions libvirt logs, or
    that will become errors soon.

    CLI Example:

    .. code-block:: bash

        salt cmp1 nova_libvirt_tls.validate \\
            '{"cacert.pem": {"path": "/etc/pki/CA/cacert.pem"},
              "servercert.pem": {"path": "/etc/pki/libvirt/servercert.pem"},
              "serverkey.pem": {"path": "/etc/pki/libvirt/private/serverkey.pem"}}' \\
            migration_hostname=cmp1.example.com
    """
    entries = _normalise_files(files)
    now = _as_utc(now)
    try:
        warn_days = int(warn_days)
    except (TypeError, ValueError):
        raise SaltInvocationError(
            f"warn_days must be a number of days, got {warn_days!r}"
        )
    if warn_days < 0:
        raise SaltInvocationError(f"warn_days must not be negative, got {warn_days}")

    errors = []
    warnings = []
    if not entries:
        warnings.append(
            "No TLS files were given, nothing was checked; expected some of "
            + ", ".join(FILE_ORDER)
        )
        return {"errors": errors, "warnings": warnings}

    where = {name: f"{name} (from {origin})" for name, (_, origin) in entries.items()}
    certs = {}
    keys = {}
    for name in FILE_ORDER:
        if name not in entries:
            continue
        data = entries[name][0]
        if len(data) > MAX_FILE_SIZE:
            errors.append(
                f"{where[name]}: is {len(data)} bytes; libvirt reads at most "
                f"{MAX_FILE_SIZE} bytes (64 KiB) and fails to load it. Remove "
                "unrelated certificates or comments from the file"
            )
        if name in CERT_FILES:
            certs[name] = _load_certificates(name, where[name], data, errors)
        else:
            keys[name] = _load_private_key(where[name], data, errors)

    _check_presence(entries, where, errors)

    ca_certs = certs.get(CA_FILE) or []
    if ca_certs:
        _check_ca_file(where[CA_FILE], ca_certs, now, warn_days, errors, warnings)

    for cert_name in ("servercert.pem", "clientcert.pem"):
        chain = certs.get(cert_name)
        if not chain:
            continue
        leaf = chain[0]
        server = cert_name == "servercert.pem"
        _check_leaf(where[cert_name], leaf, server, now, warn_days, errors, warnings)
        if ca_certs:
            _check_issued_by(where[cert_name], where[CA_FILE], leaf, ca_certs, errors)
        key = keys.get(KEY_FOR_CERT[cert_name])
        if key is not None:
            _check_key_matches(
                where[KEY_FOR_CERT[cert_name]], where[cert_name], key, leaf, errors
            )
        if server and migration_hostname:
            _check_hostname(
                where[cert_name], leaf, str(migration_hostname), errors, warnings
            )

    return {"errors": errors, "warnings": warnings}


def fingerprint(content):
    """
    Return the SHA-256 fingerprint of a PEM certificate, as colon-separated
    upper-case hex (the format of ``openssl x509 -noout -fingerprint -sha256``).
    With several certificates in ``content`` the first one is used.

    Given an unencrypted PEM private key instead, return the SHA-256
    fingerprint of its public key (DER SubjectPublicKeyInfo, like
    ``openssl pkey -pubout -outform DER | sha256sum``), so a key change can be
    reported without revealing the key.

    CLI Example:

    .. code-block:: bash

        salt cmp1 nova_libvirt_tls.fingerprint "$(cat /etc/pki/libvirt/servercert.pem)"
    """
    data = _to_bytes(content, "content")
    cert = _first_certificate(data)
    if cert is not None:
        return _hex(cert.fingerprint(hashes.SHA256()))
    key = _private_key_or_none(data)
    if key is not None:
        return _public_key_fingerprint(key.public_key())
    raise CommandExecutionError(
        "fingerprint: the content is neither a PEM certificate nor an unencrypted "
        "PEM private key"
    )


def describe(content):
    """
    Return a summary of a PEM certificate that is safe to show in state
    comments: subject, issuer, serial, validity, subjectAltName entries,
    whether it is a CA, key type, fingerprint and how many certificates the
    content holds (only the first is described).

    Given an unencrypted PEM private key, return only its type and the
    fingerprint of its public key.

    CLI Example:

    .. code-block:: bash

        salt cmp1 nova_libvirt_tls.describe "$(cat /etc/pki/CA/cacert.pem)"
    """
    data = _to_bytes(content, "content")
    try:
        certs = cx509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if certs:
        cert = certs[0]
        dns, ips = _san_values(cert)
        return {
            "type": "certificate",
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "dns_names": dns,
            "ip_addresses": ips,
            "ca": _is_ca(cert) is True,
            "key": _key_description(cert.public_key()),
            "fingerprint": _hex(cert.fingerprint(hashes.SHA256())),
            "certificates": len(certs),
        }
    key = _private_key_or_none(data)
    if key is not None:
        return {
            "type": "private key",
            "key": _key_description(key.public_key()),
            "public_key_fingerprint": _public_key_fingerprint(key.public_key()),
        }
    raise CommandExecutionError(
        "describe: the content is neither a PEM certificate nor an unencrypted "
        "PEM private key"
    )


# --- input handling ---------------------------------------------------------


def _normalise_files(files):
    if not isinstance(files, dict):
        raise SaltInvocationError(
            "files must be a dict of file name -> {'content': ..., 'origin': ...}, "
            f"got {type(files).__name__}"
        )
    entries = {}
    for name, spec in files.items():
        if name not in FILE_ORDER:
            raise SaltInvocationError(
                f"Unknown libvirt TLS file name {name!r}; expected one of "
                + ", ".join(FILE_ORDER)
            )
        if isinstance(spec, (str, bytes)):
            spec = {"content": spec}
        if not isinstance(spec, dict):
            raise SaltInvocationError(
                f"files[{name!r}] must be a dict with 'content' (or 'path') and 'origin'"
            )
        if "content" in spec:
            data = _to_bytes(spec["content"], f"files[{name!r}]['content']")
            origin = spec.get("origin") or "unknown origin"
        elif "path" in spec:
            path = spec["path"]
            origin = spec.get("origin") or path
            data = _read_file(name, path)
        else:
            raise SaltInvocationError(
                f"files[{name!r}] has neither 'content' nor 'path'"
            )
        entries[name] = (data, str(origin))
    return entries


def _read_file(name, path):
    try:
        with open(path, "rb") as fh:
            return fh.read(_READ_LIMIT + 1)
    except OSError as exc:
        raise CommandExecutionError(
            f"{name}: cannot read {path}: {exc.strerror or exc}"
        ) from None


def _to_bytes(content, what):
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    raise SaltInvocationError(
        f"{what} must be a PEM string or bytes, got {type(content).__name__}"
    )


def _as_utc(now):
    if now is None:
        return datetime.now(timezone.utc)
    if isinstance(now, str):
        try:
            now = datetime.fromisoformat(now)
        except ValueError:
            raise SaltInvocationError(
                f"now must be an ISO 8601 date/time such as 2030-01-31T12:00:00Z, got {now!r}"
            ) from None
    if not isinstance(now, datetime):
        raise SaltInvocationError(
            f"now must be a datetime or an ISO 8601 string, got {type(now).__name__}"
        )
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


# --- parsing ----------------------------------------------------------------


def _load_certificates(name, where, data, errors):
    if not data.strip():
        errors.append(f"{where}: is empty; expected a PEM certificate")
        return None
    if b"PRIVATE KEY-----" in data:
        # Certificates are installed world-readable; a key pasted into one
        # would leak, and gnutls would ignore it anyway.
        errors.append(
            f"{where}: contains a private key block; certificate files are "
            "installed world-readable, so remove the key from this file and "
            "ship it as the matching *key.pem"
        )
    try:
        certs = cx509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        expected = (
            "one or more CA certificates"
            if name == CA_FILE
            else "the certificate (first) followed by optional intermediates"
        )
        errors.append(
            f"{where}: contains no parseable PEM certificate "
            f"('-----BEGIN CERTIFICATE-----' block); expected {expected}"
        )
        return None
    return certs


def _load_private_key(where, data, errors):
    if not data.strip():
        errors.append(f"{where}: is empty; expected an unencrypted PEM private key")
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given".
        errors.append(_encrypted_key_message(where))
        return None
    except (ValueError, UnsupportedAlgorithm):
        # The parser's own message is not reused: never risk echoing input.
        if b"-----BEGIN CERTIFICATE-----" in data:
            hint = "it holds a certificate, not a private key"
        elif b"-----BEGIN PUBLIC KEY-----" in data:
            hint = "it holds a public key, not a private key"
        else:
            hint = "it is not a PEM private key or is corrupt"
        errors.append(
            f"{where}: cannot be loaded ({hint}); expected an unencrypted PEM "
            "private key ('-----BEGIN PRIVATE KEY-----', RSA or EC)"
        )
        return None
    if not isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    ):
        errors.append(
            f"{where}: is a {type(key).__name__.replace('PrivateKey', '')} key; "
            "libvirt TLS needs an RSA, EC or Ed25519 key"
        )
        return None
    return key


def _encrypted_key_message(where):
    return (
        f"{where}: is an encrypted (passphrase-protected) private key; libvirt "
        "cannot use it because it has no way to ask for the passphrase. Store "
        "it unencrypted (openssl pkey -in key.pem -out plain-key.pem) and "
        "protect it with file permissions (0600) or pillar instead"
    )


def _first_certificate(data):
    try:
        return cx509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        return None


def _private_key_or_none(data):
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return None


# --- checks -----------------------------------------------------------------


def _check_presence(entries, where, errors):
    for cert_name, key_name in KEY_FOR_CERT.items():
        if cert_name in entries and key_name not in entries:
            errors.append(
                f"{where[cert_name]}: is given without {key_name}; libvirt loads "
                f"the certificate and its key together. Provide {key_name} or "
                f"drop {cert_name}"
            )
        if key_name in entries and cert_name not in entries:
            errors.append(
                f"{where[key_name]}: is given without {cert_name}; libvirt loads "
                f"the certificate and its key together. Provide {cert_name} or "
                f"drop {key_name}"
            )
    others = [name for name in FILE_ORDER if name in entries and name != CA_FILE]
    if others and CA_FILE not in entries:
        errors.append(
            f"{CA_FILE}: is missing but {', '.join(others)} "
            f"{'is' if len(others) == 1 else 'are'} given; libvirt verifies "
            f"certificates against {CA_FILE} and does not start without it. "
            f"Provide {CA_FILE} (the CA that signed them)"
        )


def _check_ca_file(where, ca_certs, now, warn_days, errors, warnings):
    if len(ca_certs) > MAX_CA_CERTS:
        errors.append(
            f"{where}: holds {len(ca_certs)} certificates; libvirt accepts at most "
            f"{MAX_CA_CERTS} in the CA file. Keep only the CAs that issue "
            "libvirt certificates"
        )
    for index, cert in enumerate(ca_certs):
        label = where if len(ca_certs) == 1 else f"{where} certificate #{index + 1}"
        label = f"{label} [{_subject(cert)}]"
        ca_flag = _is_ca(cert)
        if ca_flag is None:
            errors.append(
                f"{label}: has no basicConstraints extension; libvirt requires "
                "CA:TRUE on every certificate in the CA file"
            )
        elif not ca_flag:
            errors.append(
                f"{label}: is not a CA (basicConstraints CA:FALSE), it looks like "
                "a server or client certificate; the CA file must hold only CA "
                "certificates"
            )
        usage = _extension(cert, cx509.KeyUsage)
        # For a non-CA the basicConstraints error above already says it all.
        if ca_flag and usage is not None and not usage.value.key_cert_sign:
            errors.append(
                f"{label}: its keyUsage does not permit certificate signing "
                "(keyCertSign); a CA certificate needs it"
            )
        _check_times(label, cert, now, warn_days, errors, warnings)
        _check_signature_hash(label, cert, warnings)


def _check_leaf(where, cert, server, now, warn_days, errors, warnings):
    role = "server" if server else "client"
    label = f"{where} [{_subject(cert)}]"
    if _is_ca(cert):
        errors.append(
            f"{label}: is a CA certificate (basicConstraints CA:TRUE); libvirt "
            f"refuses a CA as {role} certificate. Issue a {role} certificate "
            "signed by the CA instead"
        )
    _check_times(label, cert, now, warn_days, errors, warnings)
    _check_signature_hash(label, cert, warnings)

    usage = _extension(cert, cx509.KeyUsage)
    if usage is not None:
        missing = [
            flag
            for flag, present in (
                ("digitalSignature", usage.value.digital_signature),
                ("keyEncipherment", usage.value.key_encipherment),
            )
            if not present
        ]
        if missing:
            msg = (
                f"{label}: its keyUsage lacks {' and '.join(missing)}, which libvirt "
                f"requires for a {role} certificate"
            )
            if usage.critical:
                errors.append(msg + " (the extension is critical)")
            else:
                warnings.append(
                    msg + "; libvirt only warns because the extension is not critical"
                )

    purposes = _extension(cert, cx509.ExtendedKeyUsage)
    if purposes is not None:
        wanted = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        allowed = wanted in purposes.value or (
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes.value
        )
        if not allowed:
            name = "serverAuth" if server else "clientAuth"
            msg = (
                f"{label}: its extendedKeyUsage does not allow use as a TLS {role} "
                f"(missing {name})"
            )
            if purposes.critical:
                errors.append(msg + "; libvirt refuses it because the extension is critical")
            else:
                warnings.append(
                    msg + "; libvirt only warns because the extension is not critical"
                )

    public_key = cert.public_key()
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
        warnings.append(
            f"{label}: has an RSA key of {public_key.key_size} bits; current GnuTLS "
            "security levels reject keys under 2048 bits"
        )


def _check_times(label, cert, now, warn_days, errors, warnings):
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    if not_after <= now:
        errors.append(
            f"{label}: expired on {_fmt(not_after)}; libvirt refuses expired "
            "certificates. Issue a new one"
        )
    elif not_before > now:
        errors.append(
            f"{label}: is not valid before {_fmt(not_before)} (now is {_fmt(now)}); "
            "libvirt refuses certificates that are not yet active. Check the "
            "clocks of the issuing host and this host"
        )
    elif not_after - now < timedelta(days=warn_days):
        days_left = (not_after - now).days
        warnings.append(
            f"{label}: expires on {_fmt(not_after)} ({days_left} days left, fewer "
            f"than {warn_days}); renew it before then, libvirt refuses expired "
            "certificates"
        )


def _check_signature_hash(label, cert, warnings):
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return
    if isinstance(algorithm, (hashes.SHA1, hashes.MD5)):
        warnings.append(
            f"{label}: is signed with {algorithm.name.upper()}; current GnuTLS "
            "versions distrust such signatures. Reissue it with SHA-256"
        )


def _check_issued_by(where, ca_where, leaf, ca_certs, errors):
    label = f"{where} [{_subject(leaf)}]"
    candidates = [ca for ca in ca_certs if ca.subject == leaf.issuer]
    if not candidates:
        known = "; ".join(_subject(ca) for ca in ca_certs)
        errors.append(
            f"{label}: was issued by '{leaf.issuer.rfc4514_string()}', which is not "
            f"in {ca_where} (it holds: {known}); libvirt verifies the certificate "
            "directly against the CA file. Use the cacert.pem of the CA that "
            "issued it (put an intermediate CA in cacert.pem too)"
        )
        return
    for ca in candidates:
        try:
            leaf.verify_directly_issued_by(ca)
            return
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
    errors.append(
        f"{label}: its signature does not verify against the CA "
        f"'{leaf.issuer.rfc4514_string()}' in {ca_where}; it was signed by a "
        "different CA with the same name (was the CA regenerated?). Reissue it "
        "with the current CA or ship the matching cacert.pem"
    )


def _check_key_matches(key_where, cert_where, key, cert, errors):
    key_fp = _public_key_fingerprint(key.public_key())
    cert_fp = _public_key_fingerprint(cert.public_key())
    if key_fp != cert_fp:
        errors.append(
            f"{key_where}: does not belong to {cert_where}: the public keys differ "
            f"(key {key_fp[:23]}..., certificate {cert_fp[:23]}...). Ship the key "
            "the certificate was issued for, or reissue the certificate"
        )


def _check_hostname(where, cert, hostname, errors, warnings):
    label = f"{where} [{_subject(cert)}]"
    host = hostname.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    dns, ips = _san_values(cert)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None

    if address is not None:
        if str(address) in ips:
            return
        errors.append(
            f"{label}: does not cover the migration address {hostname}: its IP "
            f"subjectAltName entries are [{', '.join(ips) or 'none'}]. Peers "
            "connecting to this address will reject the certificate; reissue "
            f"it with IP:{address} in subjectAltName"
        )
        return

    if dns:
        if any(_dns_match(pattern, host) for pattern in dns):
            return
        errors.append(
            f"{label}: does not cover the migration hostname {hostname}: its DNS "
            f"subjectAltName entries are [{', '.join(dns)}]. Peers connecting "
            f"to qemu+tls://{hostname}/system will fail with 'Certificate owner "
            f"does not match the hostname'; reissue it with DNS:{host} in "
            "subjectAltName"
        )
        return

    common_names = [
        attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    if any(_dns_match(str(cn), host) for cn in common_names):
        warnings.append(
            f"{label}: has no DNS subjectAltName; {hostname} matched only the "
            "subject CN, which libvirt says it may stop accepting. Reissue it "
            f"with DNS:{host} in subjectAltName"
        )
        return
    errors.append(
        f"{label}: does not cover the migration hostname {hostname}: it has no DNS "
        f"subjectAltName and its CN is [{', '.join(map(str, common_names)) or 'none'}]; "
        f"reissue it with DNS:{host} in subjectAltName"
    )


def _dns_match(pattern, host):
    pattern = pattern.strip().rstrip(".").lower()
    if pattern.startswith("*."):
        # A wildcard stands for exactly one whole left-most label.
        suffix = pattern[1:]
        if not host.endswith(suffix):
            return False
        label = host[: -len(suffix)]
        return bool(label) and "." not in label
    return pattern == host


# --- small helpers ----------------------------------------------------------


def _extension(cert, ext_type):
    try:
        return cert.extensions.get_extension_for_class(ext_type)
    except cx509.ExtensionNotFound:
        return None


def _is_ca(cert):
    """True/False from basicConstraints, None when the extension is absent."""
    ext = _extension(cert, cx509.BasicConstraints)
    if ext is None:
        return None
    return bool(ext.value.ca)


def _san_values(cert):
    ext = _extension(cert, cx509.SubjectAlternativeName)
    if ext is None:
        return [], []
    dns = [str(name) for name in ext.value.get_values_for_type(cx509.DNSName)]
    ips = [str(ip) for ip in ext.value.get_values_for_type(cx509.IPAddress)]
    return dns, ips




def _subject(cert):
    return cert.subject.rfc4514_string() or "empty subject"


def _fmt(moment):
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _hex(digest):
    return binascii.hexlify(digest, ":").decode().upper()


def _public_key_fingerprint(public_key):
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return _hex(digest.finalize())


def _key_description(public_key):
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__.replace("PublicKey", "")
