"""
Unit tests for the libvirt TLS checks (_modules/nova_libvirt_tls.py) and the
certificate generator (_runners/nova_libvirt.py).

Every defect is built into a real certificate with cryptography, so the checks
are exercised the way libvirt would meet them.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from salt.exceptions import CommandExecutionError, SaltInvocationError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(kind, name):
    path = ROOT / f"_{kind}" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"formula_{kind}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tls = _load("modules", "nova_libvirt_tls")
runner = _load("runners", "nova_libvirt")

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=timezone.utc)
SERVER = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
DEFAULT = object()


# --- a tiny certificate factory ---------------------------------------------


def new_key(kind="ec"):
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _usage(**flags):
    base = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    base.update(flags)
    return x509.KeyUsage(**base)


def make_cert(
    cn,
    key,
    issuer=None,
    *,
    ca=False,
    basic_constraints=True,
    key_usage=DEFAULT,
    key_usage_critical=True,
    eku=DEFAULT,
    eku_critical=False,
    dns=DEFAULT,
    ips=(),
    not_before=None,
    not_after=None,
    algorithm=DEFAULT,
):
    """Build a certificate. issuer is (cert, key) or None for self-signed."""
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=365))
    )
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    if key_usage is DEFAULT:
        key_usage = (
            _usage(key_cert_sign=True, crl_sign=True)
            if ca
            else _usage(digital_signature=True, key_encipherment=True)
        )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=key_usage_critical)
    if eku is DEFAULT:
        eku = None if ca else (SERVER, CLIENT)
    if eku is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(eku)), critical=eku_critical
        )
    if dns is DEFAULT:
        dns = () if ca else (cn,)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if algorithm is DEFAULT:
        algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def pem(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key, password=None, traditional=False):
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def key_body(pem_bytes):
    """The base64 lines of a PEM key: the secret part."""
    return [
        line
        for line in pem_bytes.decode().splitlines()
        if line and not line.startswith("-----") and ":" not in line
    ]


def origin(name, host="cmp1"):
    return f"salt://nova_libvirt_tls/{host}/{name}"


def files_of(**contents):
    """files_of(cacert=..., servercert=...) -> the dict validate() takes."""
    return {
        f"{name}.pem": {"content": content, "origin": origin(f"{name}.pem")}
        for name, content in contents.items()
    }


@pytest.fixture(scope="module")
def pki():
    """A CA, a server and a client pair, all valid at NOW."""
    ca_key = new_key()
    ca = make_cert("Test CA", ca_key, ca=True)
    server_key = new_key()
    server = make_cert(
        "cmp1.example.com", server_key, (ca, ca_key), dns=("cmp1.example.com", "cmp1")
    )
    client_key = new_key()
    client = make_cert("nova-compute", client_key, (ca, ca_key), dns=())
    return {
        "ca": ca,
        "ca_key": ca_key,
        "server": server,
        "server_key": server_key,
        "client": client,
        "client_key": client_key,
    }


def full_set(pki, **override):
    contents = {
        "cacert": pem(pki["ca"]),
        "servercert": pem(pki["server"]),
        "serverkey": key_pem(pki["server_key"]),
        "clientcert": pem(pki["client"]),
        "clientkey": key_pem(pki["client_key"]),
    }
    contents.update(override)
    return files_of(**{k: v for k, v in contents.items() if v is not None})


def check(files, **kwargs):
    kwargs.setdefault("now", NOW)
    return tls.validate(files, **kwargs)


def only_error(report, *needles):
    assert len(report["errors"]) == 1, report
    for needle in needles:
        assert needle in report["errors"][0], report
    return report["errors"][0]


# --- validate: the good cases -----------------------------------------------


def test_virtual():
    assert tls.__virtual__() == "nova_libvirt_tls"
    assert runner.__virtual__() == "nova_libvirt"


def test_virtual_without_cryptography(monkeypatch):
    monkeypatch.setattr(tls, "HAS_CRYPTOGRAPHY", False)
    monkeypatch.setattr(runner, "HAS_CRYPTOGRAPHY", False)
    for module in (tls, runner):
        loaded, reason = module.__virtual__()
        assert loaded is False and "cryptography" in reason


def test_valid_full_set(pki):
    report = check(full_set(pki), migration_hostname="cmp1.example.com")
    assert report == {"errors": [], "warnings": []}


def test_host_libvirt_needs_no_server_pair(pki):
    report = check(full_set(pki, servercert=None, serverkey=None))
    assert report == {"errors": [], "warnings": []}


def test_str_content_and_path_entries(pki, tmp_path):
    (tmp_path / "ca.pem").write_bytes(pem(pki["ca"]))
    files = {
        "cacert.pem": {"path": str(tmp_path / "ca.pem")},
        "clientcert.pem": {"content": pem(pki["client"]).decode(), "origin": "x"},
        "clientkey.pem": {"content": key_pem(pki["client_key"]).decode(), "origin": "y"},
    }
    assert check(files) == {"errors": [], "warnings": []}
    files["cacert.pem"] = {"path": str(tmp_path / "missing.pem")}
    with pytest.raises(CommandExecutionError, match="missing.pem"):
        check(files)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_rsa_and_ed25519_keys_accepted(pki, kind):
    key = new_key(kind)
    cert = make_cert("cmp1.example.com", key, (pki["ca"], pki["ca_key"]))
    report = check(
        full_set(pki, servercert=pem(cert), serverkey=key_pem(key)),
        migration_hostname="cmp1.example.com",
    )
    assert report == {"errors": [], "warnings": []}


def test_invalid_arguments():
    with pytest.raises(SaltInvocationError, match="Unknown libvirt TLS file"):
        tls.validate({"server.crt": {"content": "x", "origin": "o"}})
    with pytest.raises(SaltInvocationError):
        tls.validate(["cacert.pem"])
    with pytest.raises(SaltInvocationError, match="warn_days"):
        tls.validate({}, warn_days=-1)
    with pytest.raises(SaltInvocationError, match="ISO 8601"):
        tls.validate({}, now="yesterday")


def test_now_accepts_iso_string(pki):
    expired_key = new_key()
    cert = make_cert(
        "cmp1.example.com",
        expired_key,
        (pki["ca"], pki["ca_key"]),
        not_after=NOW + timedelta(days=100),
    )
    files = full_set(pki, servercert=pem(cert), serverkey=key_pem(expired_key))
    assert tls.validate(files, now="2030-06-01T12:00:00+00:00")["errors"] == []
    assert tls.validate(files, now="2031-06-01T12:00:00")["errors"]


# --- validate: one defect at a time -----------------------------------------


def test_expired_server_certificate(pki):
    key = new_key()
    cert = make_cert(
        "cmp1.example.com",
        key,
        (pki["ca"], pki["ca_key"]),
        not_before=NOW - timedelta(days=400),
        not_after=NOW - timedelta(days=1),
    )
    report = check(full_set(pki, servercert=pem(cert), serverkey=key_pem(key)))
    only_error(report, "servercert.pem", origin("servercert.pem"), "expired on 2030-05-31")


def test_not_yet_valid_client_certificate(pki):
    key = new_key()
    cert = make_cert(
        "nova-compute",
        key,
        (pki["ca"], pki["ca_key"]),
        not_before=NOW + timedelta(days=2),
        not_after=NOW + timedelta(days=300),
    )
    report = check(full_set(pki, clientcert=pem(cert), clientkey=key_pem(key)))
    only_error(report, "clientcert.pem", origin("clientcert.pem"), "not valid before 2030-06-03")


def test_expired_ca(pki):
    ca_key = new_key()
    ca = make_cert(
        "Old CA",
        ca_key,
        ca=True,
        not_before=NOW - timedelta(days=900),
        not_after=NOW - timedelta(days=10),
    )
    key = new_key()
    leaf = make_cert("cmp1.example.com", key, (ca, ca_key))
    report = check(
        files_of(cacert=pem(ca), clientcert=pem(leaf), clientkey=key_pem(key))
    )
    only_error(report, "cacert.pem", "CN=Old CA", "expired")


def test_key_does_not_match_certificate(pki):
    other = new_key()
    report = check(full_set(pki, serverkey=key_pem(other)))
    only_error(report, "serverkey.pem", "does not belong to servercert.pem", "public keys differ")


def test_issued_by_another_ca(pki):
    other_key = new_key()
    other_ca = make_cert("Other CA", other_key, ca=True)
    key = new_key()
    cert = make_cert("cmp1.example.com", key, (other_ca, other_key))
    report = check(full_set(pki, servercert=pem(cert), serverkey=key_pem(key)))
    only_error(report, "servercert.pem", "CN=Other CA", "not in cacert.pem", "CN=Test CA")


def test_issued_by_another_ca_with_the_same_name(pki):
    twin_key = new_key()
    twin_ca = make_cert("Test CA", twin_key, ca=True)
    key = new_key()
    cert = make_cert("cmp1.example.com", key, (twin_ca, twin_key))
    report = check(full_set(pki, servercert=pem(cert), serverkey=key_pem(key)))
    only_error(report, "servercert.pem", "signature does not verify")


def test_intermediate_in_cacert_is_accepted(pki):
    inter_key = new_key()
    inter = make_cert("Intermediate CA", inter_key, (pki["ca"], pki["ca_key"]), ca=True)
    key = new_key()
    cert = make_cert("cmp1.example.com", key, (inter, inter_key))
    files = full_set(
        pki, cacert=pem(pki["ca"], inter), servercert=pem(cert, inter), serverkey=key_pem(key)
    )
    assert check(files, migration_hostname="cmp1.example.com")["errors"] == []


def test_ca_certificate_used_as_server_certificate(pki):
    key = new_key()
    cert = make_cert(
        "cmp1.example.com",
        key,
        (pki["ca"], pki["ca_key"]),
        ca=True,
        dns=("cmp1.example.com",),
        key_usage=_usage(digital_signature=True, key_encipherment=True, key_cert_sign=True),
    )
    report = check(full_set(pki, servercert=pem(cert), serverkey=key_pem(key)))
    only_error(report, "servercert.pem", "is a CA certificate")


def test_leaf_certificate_in_ca_file(pki):
    report = check(full_set(pki, cacert=pem(pki["ca"], pki["client"])))
    only_error(report, "cacert.pem", "certificate #2", "CN=nova-compute", "is not a CA")


def test_ca_without_basic_constraints(pki):
    key = new_key()
    ca = make_cert("Bare CA", key, basic_constraints=False, key_usage=None, dns=())
    report = check(full_set(pki, cacert=pem(pki["ca"], ca)))
    only_error(report, "cacert.pem", "CN=Bare CA", "no basicConstraints")


def test_ca_without_key_cert_sign(pki):
    key = new_key()
    ca = make_cert("Weak CA", key, ca=True, key_usage=_usage(crl_sign=True))
    report = check(full_set(pki, cacert=pem(pki["ca"], ca)))
    only_error(report, "cacert.pem", "CN=Weak CA", "keyCertSign")


def test_more_than_16_ca_certificates(pki):
    extra_key = new_key()
    extra = [make_cert(f"Extra CA {i}", extra_key, ca=True) for i in range(16)]
    report = check(full_set(pki, cacert=pem(pki["ca"], *extra)))
    only_error(report, "cacert.pem", "holds 17 certificates", "at most 16")
    assert check(full_set(pki, cacert=pem(pki["ca"], *extra[:15])))["errors"] == []


def test_critical_eku_without_server_auth_is_an_error(pki):
    key = new_key()
    cert = make_cert(
        "cmp1.example.com", key, (pki["ca"], pki["ca_key"]), eku=(CLIENT,), eku_critical=True
    )
    report = check(full_set(pki, servercert=pem(cert), serverkey=key_pem(key)))
    only_error(report, "servercert.pem", "serverAuth", "critical")
    assert report["warnings"] == []


def test_non_critical_eku_without_server_auth_is_a_warning(pki):
    key = new_key()
    cert = make_cert("cmp1.example.com", key, (pki["ca"], pki["ca_key"]), eku=(CLIENT,))
    report = check(full_set(pki, servercert=pem(cert), serverkey=key_pem(key)))
    assert report["errors"] == []
    assert len(report["warnings"]) == 1 and "serverAuth" in report["warnings"][0]


def test_critical_eku_without_client_auth_is_an_error(pki):
    key = new_key()
    cert = make_cert("nova-compute", key, (pki["ca"], pki["ca_key"]), eku=(SERVER,), eku_critical=True)
    report = check(full_set(pki, clientcert=pem(cert), clientkey=key_pem(key)))
    only_error(report, "clientcert.pem", "clientAuth")


def test_key_usage_without_key_encipherment(pki):
    key = new_key()
    usage = _usage(digital_signature=True)
    critical = make_cert("cmp1.example.com", key, (pki["ca"], pki["ca_key"]), key_usage=usage)
    report = check(full_set(pki, servercert=pem(critical), serverkey=key_pem(key)))
    only_error(report, "servercert.pem", "keyEncipherment")
    lenient = make_cert(
        "cmp1.example.com", key, (pki["ca"], pki["ca_key"]), key_usage=usage, key_usage_critical=False
    )
    report = check(full_set(pki, servercert=pem(lenient), serverkey=key_pem(key)))
    assert report["errors"] == [] and "keyEncipherment" in report["warnings"][0]


def test_san_missing_the_migration_hostname(pki):
    report = check(full_set(pki), migration_hostname="cmp2.example.com")
    only_error(report, "servercert.pem", "cmp2.example.com", "cmp1.example.com, cmp1")


@pytest.mark.parametrize(
    "hostname, covered",
    [
        ("cmp7.example.com", True),
        ("CMP7.Example.COM.", True),
        ("example.com", False),
        ("a.cmp7.example.com", False),
        ("cmp7.example.org", False),
    ],
)
def test_wildcard_san_matches_one_label(pki, hostname, covered):
    key = new_key()
    cert = make_cert("wildcard", key, (pki["ca"], pki["ca_key"]), dns=("*.example.com",))
    report = check(
        full_set(pki, servercert=pem(cert), serverkey=key_pem(key)), migration_hostname=hostname
    )
    assert (report["errors"] == []) is covered, report


def test_ip_san_match(pki):
    key = new_key()
    cert = make_cert(
        "cmp1.example.com",
        key,
        (pki["ca"], pki["ca_key"]),
        ips=("10.0.0.11", "fd00::11"),
    )
    files = full_set(pki, servercert=pem(cert), serverkey=key_pem(key))
    assert check(files, migration_hostname="10.0.0.11")["errors"] == []
    assert check(files, migration_hostname="[fd00::11]")["errors"] == []
    only_error(check(files, migration_hostname="10.0.0.12"), "10.0.0.12", "10.0.0.11")


def test_cn_fallback_without_san_warns(pki):
    key = new_key()
    cert = make_cert("cmp1.example.com", key, (pki["ca"], pki["ca_key"]), dns=())
    files = full_set(pki, servercert=pem(cert), serverkey=key_pem(key))
    report = check(files, migration_hostname="cmp1.example.com")
    assert report["errors"] == []
    assert len(report["warnings"]) == 1 and "CN" in report["warnings"][0]
    only_error(check(files, migration_hostname="cmp2.example.com"), "cmp2.example.com")


def test_file_over_64_kib(pki):
    padded = pem(pki["ca"]) + b"# padding\n" * 7000
    assert len(padded) > 1 << 16
    report = check(full_set(pki, cacert=padded))
    only_error(report, "cacert.pem", f"{len(padded)} bytes", "65536")
    at_limit = pem(pki["ca"]) + b"#" * ((1 << 16) - len(pem(pki["ca"])) - 1) + b"\n"
    assert len(at_limit) == 1 << 16
    assert check(full_set(pki, cacert=at_limit))["errors"] == []


def test_garbage_pem(pki):
    report = check(
        full_set(pki, servercert=b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    )
    only_error(report, "servercert.pem", "no parseable PEM certificate")
    report = check(full_set(pki, clientkey=b"hello"))
    only_error(report, "clientkey.pem", "not a PEM private key")
    report = check(full_set(pki, clientkey=pem(pki["client"])))
    only_error(report, "clientkey.pem", "holds a certificate")
    report = check(full_set(pki, cacert=b""))
    only_error(report, "cacert.pem", "is empty")


@pytest.mark.parametrize("traditional", [False, True])
def test_encrypted_key(pki, traditional):
    encrypted = key_pem(pki["server_key"], password=b"secret", traditional=traditional)
    report = check(full_set(pki, serverkey=encrypted))
    only_error(report, "serverkey.pem", origin("serverkey.pem"), "encrypted", "libvirt cannot use it")


def test_private_key_inside_certificate_file(pki):
    report = check(full_set(pki, clientcert=pem(pki["client"]) + key_pem(pki["client_key"])))
    only_error(report, "clientcert.pem", "contains a private key block")


def test_certificate_without_key_and_key_without_certificate(pki):
    report = check(full_set(pki, serverkey=None, clientcert=None))
    assert len(report["errors"]) == 2, report
    assert any("servercert.pem" in e and "without serverkey.pem" in e for e in report["errors"])
    assert any("clientkey.pem" in e and "without clientcert.pem" in e for e in report["errors"])


def test_cacert_required(pki):
    report = check(full_set(pki, cacert=None))
    only_error(report, "cacert.pem: is missing", "servercert.pem", "clientkey.pem")


def test_near_expiry_warning(pki):
    key = new_key()
    cert = make_cert(
        "cmp1.example.com", key, (pki["ca"], pki["ca_key"]), not_after=NOW + timedelta(days=10)
    )
    files = full_set(pki, servercert=pem(cert), serverkey=key_pem(key))
    report = check(files)
    assert report["errors"] == []
    assert len(report["warnings"]) == 1
    assert "servercert.pem" in report["warnings"][0]
    assert "2030-06-11" in report["warnings"][0] and "10 days" in report["warnings"][0]
    assert check(files, warn_days=5)["warnings"] == []


def test_sha1_signature_warns(tmp_path):
    # cryptography refuses to sign with SHA-1, so let openssl make the relic.
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"),
            "-sha1", "-subj", "/CN=Old SHA1 CA", "-days", "3650",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ],
        check=True,
        capture_output=True,
    )
    report = tls.validate(files_of(cacert=(tmp_path / "c.pem").read_bytes()))
    assert report["errors"] == []
    assert len(report["warnings"]) == 1, report
    assert "SHA1" in report["warnings"][0] and "CN=Old SHA1 CA" in report["warnings"][0]


def test_every_problem_reported_at_once(pki):
    expired_key = new_key()
    expired = make_cert(
        "cmp1.example.com",
        expired_key,
        (pki["ca"], pki["ca_key"]),
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
        eku=(CLIENT,),
        eku_critical=True,
    )
    files = full_set(
        pki,
        cacert=pem(pki["ca"], pki["client"]),  # a leaf in the CA file
        servercert=pem(expired),  # expired, wrong EKU, wrong SAN, wrong key
        clientkey=key_pem(pki["client_key"], password=b"pw"),  # encrypted
    )
    report = check(files, migration_hostname="cmp9.example.com")
    joined = "\n".join(report["errors"])
    for needle in (
        "is not a CA",
        "expired on",
        "serverAuth",
        "cmp9.example.com",
        "does not belong to servercert.pem",
        "encrypted",
    ):
        assert needle in joined, joined
    assert len(report["errors"]) == 6


def test_no_key_material_in_any_message(pki):
    other = new_key("rsa")
    keys = {
        "server": key_pem(pki["server_key"]),
        "client": key_pem(pki["client_key"]),
        "other": key_pem(other),
        "traditional": key_pem(other, traditional=True),
    }
    outputs = [
        check(full_set(pki, serverkey=keys["other"]), migration_hostname="nope.example"),
        check(full_set(pki, servercert=keys["server"], clientcert=pem(pki["client"]) + keys["client"])),
        check(full_set(pki, clientkey=keys["traditional"], cacert=keys["other"])),
        check(full_set(pki, cacert=None, clientcert=None)),
        tls.describe(keys["server"]),
        tls.fingerprint(keys["other"]),
    ]
    for content in keys.values():
        with pytest.raises(SaltInvocationError) as excinfo:
            tls.validate({"server.key": {"content": content, "origin": "o"}})
        outputs.append(str(excinfo.value))
    with pytest.raises(CommandExecutionError) as excinfo:
        tls.fingerprint(keys["server"][:-40])
    outputs.append(str(excinfo.value))
    text = json.dumps(outputs)
    for content in keys.values():
        body = key_body(content)
        assert body
        for line in body:
            assert line not in text
        assert "".join(body)[:40] not in text.replace("\\n", "")


def test_fingerprint_matches_openssl(pki, tmp_path):
    path = tmp_path / "server.pem"
    path.write_bytes(pem(pki["server"]))
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip().split("=", 1)[1] == tls.fingerprint(pem(pki["server"]))
    assert tls.fingerprint(pem(pki["server"]).decode()) == tls.fingerprint(pem(pki["server"]))
    # A key is fingerprinted by its public half, equal to its certificate's key.
    assert tls.fingerprint(key_pem(pki["server_key"])) == tls.describe(
        key_pem(pki["server_key"])
    )["public_key_fingerprint"]
    with pytest.raises(CommandExecutionError, match="neither a PEM certificate"):
        tls.fingerprint("garbage")


def test_describe(pki):
    summary = tls.describe(pem(pki["server"], pki["ca"]))
    assert summary["subject"] == "CN=cmp1.example.com"
    assert summary["issuer"] == "CN=Test CA"
    assert summary["dns_names"] == ["cmp1.example.com", "cmp1"]
    assert summary["ca"] is False and summary["certificates"] == 2
    assert summary["not_after"].startswith("2031-06-01")
    assert summary["key"] == "EC secp256r1"
    assert tls.describe(pem(pki["ca"]))["ca"] is True
    assert tls.describe(key_pem(pki["server_key"]))["type"] == "private key"
    with pytest.raises(CommandExecutionError):
        tls.describe(b"nothing")


# --- generate_certificates ----------------------------------------------------


@pytest.fixture
def master(tmp_path, monkeypatch):
    """Runner dunders for a master whose file_roots is tmp_path/srv."""
    opts = {"file_roots": {"base": [str(tmp_path / "srv")]}, "pki_dir": str(tmp_path / "pki")}
    context = {}
    monkeypatch.setattr(runner, "__opts__", opts, raising=False)
    monkeypatch.setattr(runner, "__context__", context, raising=False)
    return {
        "opts": opts,
        "context": context,
        "dest": tmp_path / "srv" / "nova_libvirt_tls",
        "ca_key": tmp_path / "pki" / "nova_libvirt" / "ca.key",
    }


def read_set(directory, ca_dir=None):
    ca_dir = ca_dir or directory
    return {
        "cacert.pem": {"content": (ca_dir / "cacert.pem").read_bytes(), "origin": str(ca_dir)},
        **{
            name: {"content": (directory / name).read_bytes(), "origin": str(directory / name)}
            for name in ("servercert.pem", "serverkey.pem", "clientcert.pem", "clientkey.pem")
        },
    }


def snapshot(directory):
    return {
        str(p): (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def san_of(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        sorted(ext.get_values_for_type(x509.DNSName)),
        sorted(str(i) for i in ext.get_values_for_type(x509.IPAddress)),
    )


def openssl_verify(ca, cert, *extra):
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), *extra, str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


HOSTS = ["cmp2.example.com", "cmp1.example.com", "cmp3.example.com", "cmp1.example.com"]


def test_shared_mode_files_pass_validation(master):
    ret = runner.generate_certificates(hosts=",".join(HOSTS), key_type="ec")
    assert ret["result"] is True and ret["errors"] == [], ret
    dest = master["dest"]
    assert ret["dest"] == str(dest)
    assert sorted(ret["hosts"]) == ["cmp1.example.com", "cmp2.example.com", "cmp3.example.com"]
    files = read_set(dest)
    assert files["servercert.pem"]["content"] == files["clientcert.pem"]["content"]
    assert files["serverkey.pem"]["content"] == files["clientkey.pem"]["content"]
    for host in sorted(set(HOSTS)):
        assert tls.validate(files, migration_hostname=host) == {"errors": [], "warnings": []}
    assert tls.validate(files, migration_hostname="cmp4.example.com")["errors"]
    assert san_of(dest / "servercert.pem") == (sorted(set(HOSTS)), [])
    cert = x509.load_pem_x509_certificate(files["servercert.pem"]["content"])
    assert cert.subject.rfc4514_string() == "CN=cmp1.example.com,O=nova_libvirt"
    ca = x509.load_pem_x509_certificate(files["cacert.pem"]["content"])
    assert "CN=nova_libvirt test CA" in ca.subject.rfc4514_string()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).critical


def test_shared_mode_modes(master):
    runner.generate_certificates(hosts=HOSTS)
    dest = master["dest"]
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(master["ca_key"].parent) == 0o700
    assert mode(master["ca_key"]) == 0o600
    for name in ("serverkey.pem", "clientkey.pem"):
        assert mode(dest / name) == 0o600
    for name in ("cacert.pem", "servercert.pem", "clientcert.pem"):
        assert mode(dest / name) == 0o644
    assert not [p for p in dest.rglob("*.tmp")]


def test_generated_certificates_pass_openssl_verify(master):
    runner.generate_certificates(hosts=HOSTS, ip_sans=True)
    dest = master["dest"]
    for purpose in ("sslserver", "sslclient"):
        res = openssl_verify(
            dest / "cacert.pem",
            dest / "servercert.pem",
            "-purpose",
            purpose,
            "-verify_hostname",
            "cmp3.example.com",
        )
        assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    res = openssl_verify(dest / "cacert.pem", dest / "servercert.pem", "-verify_hostname", "cmp9.example.com")
    assert res.returncode != 0


def test_second_run_changes_nothing(master):
    first = runner.generate_certificates(hosts=HOSTS)
    assert len(first["changed"]) == 6  # ca.key, cacert.pem and four host files
    before = snapshot(master["dest"])
    second = runner.generate_certificates(hosts=list(reversed(HOSTS)))
    assert second["result"] is True
    assert second["changed"] == []
    assert len(second["unchanged"]) == 6
    assert snapshot(master["dest"]) == before


def test_adding_a_host_reissues_the_shared_certificate(master):
    runner.generate_certificates(hosts=HOSTS)
    dest = master["dest"]
    before = snapshot(dest)
    ret = runner.generate_certificates(hosts=HOSTS + ["cmp4.example.com"])
    assert sorted(ret["changed"]) == sorted([str(dest / "servercert.pem"), str(dest / "clientcert.pem")])
    after = snapshot(dest)
    for name in ("serverkey.pem", "clientkey.pem", "cacert.pem"):
        assert after[str(dest / name)] == before[str(dest / name)]
    assert "cmp4.example.com" in san_of(dest / "servercert.pem")[0]
    assert tls.validate(read_set(dest), migration_hostname="cmp4.example.com")["errors"] == []


def test_per_host_directories(master):
    hosts = ["cmp1.example.com", "cmp2.example.com", "10.0.0.13"]
    ret = runner.generate_certificates(hosts=hosts, per_host=True, key_type="ec")
    assert ret["result"] is True, ret
    dest = master["dest"]
    assert not (dest / "servercert.pem").exists()
    keys = set()
    for host in hosts:
        directory = dest / host
        assert ret["hosts"][host]["dir"] == str(directory)
        files = read_set(directory, ca_dir=dest)
        assert tls.validate(files, migration_hostname=host) == {"errors": [], "warnings": []}
        other = next(h for h in hosts if h != host)
        assert tls.validate(files, migration_hostname=other)["errors"]
        keys.add(files["serverkey.pem"]["content"])
        assert stat.S_IMODE((directory / "clientkey.pem").stat().st_mode) == 0o600
        res = openssl_verify(dest / "cacert.pem", directory / "clientcert.pem", "-purpose", "sslclient")
        assert res.returncode == 0, res.stdout + res.stderr
    assert len(keys) == 3
    assert san_of(dest / "10.0.0.13" / "servercert.pem") == ([], ["10.0.0.13"])
    before = snapshot(dest)
    assert runner.generate_certificates(hosts=hosts, per_host=True, key_type="ec")["changed"] == []
    assert snapshot(dest) == before


@pytest.mark.parametrize(
    "options, leaf_key, ca_key",
    [
        ({"key_type": "rsa"}, ("RSA", 2048), ("RSA", 4096)),
        ({"key_type": "rsa", "key_size": 3072}, ("RSA", 3072), ("RSA", 4096)),
        ({"key_type": "ec"}, ("EC", "secp384r1"), ("EC", "secp384r1")),
        ({"key_type": "ec", "curve": "secp256r1"}, ("EC", "secp256r1"), ("EC", "secp256r1")),
    ],
)
def test_key_types(master, options, leaf_key, ca_key):
    ret = runner.generate_certificates(hosts=["cmp1.example.com"], **options)
    assert ret["result"] is True, ret
    dest = master["dest"]

    def describe(path):
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if isinstance(key, rsa.RSAPrivateKey):
            return ("RSA", key.key_size)
        return ("EC", key.curve.name)

    assert describe(dest / "serverkey.pem") == leaf_key
    assert describe(master["ca_key"]) == ca_key
    assert tls.validate(read_set(dest), migration_hostname="cmp1.example.com") == {
        "errors": [],
        "warnings": [],
    }
    res = openssl_verify(dest / "cacert.pem", dest / "servercert.pem", "-purpose", "sslserver")
    assert res.returncode == 0, res.stdout + res.stderr


def test_changing_key_type_keeps_the_ca_and_replaces_the_key(master):
    runner.generate_certificates(hosts=HOSTS, key_type="rsa")
    dest = master["dest"]
    ca_before = (dest / "cacert.pem").read_bytes()
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec")
    assert str(dest / "serverkey.pem") in ret["changed"]
    assert (dest / "cacert.pem").read_bytes() == ca_before
    assert b"BEGIN PRIVATE KEY" in (dest / "serverkey.pem").read_bytes()
    key = serialization.load_pem_private_key((dest / "serverkey.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert tls.validate(read_set(dest))["errors"] == []


def test_ip_sans(master):
    ret = runner.generate_certificates(
        hosts="cmp1.example.com=10.0.0.11, cmp2.example.com=fd00::12", ip_sans=True
    )
    assert ret["result"] is True, ret
    # Runner returns travel through msgpack/JSON: plain types only.
    assert json.loads(json.dumps(ret))["hosts"]["cmp2.example.com"]["ip"] == ["fd00::12"]
    dest = master["dest"]
    assert san_of(dest / "servercert.pem") == (
        ["cmp1.example.com", "cmp2.example.com"],
        ["10.0.0.11", "fd00::12"],
    )
    files = read_set(dest)
    for host in ("10.0.0.11", "fd00::12", "cmp2.example.com"):
        assert tls.validate(files, migration_hostname=host)["errors"] == []
    res = openssl_verify(dest / "cacert.pem", dest / "servercert.pem", "-verify_ip", "10.0.0.11")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ip_entries_ignored_without_ip_sans(master):
    ret = runner.generate_certificates(hosts=["cmp1.example.com=10.0.0.11"])
    assert san_of(master["dest"] / "servercert.pem") == (["cmp1.example.com"], [])
    assert any("ip_sans=True" in w for w in ret["warnings"])


def test_renews_certificate_close_to_expiry_or_from_another_ca(master):
    runner.generate_certificates(hosts=HOSTS, key_type="ec")
    dest = master["dest"]
    ca_key = serialization.load_pem_private_key(master["ca_key"].read_bytes(), None)
    ca = x509.load_pem_x509_certificate((dest / "cacert.pem").read_bytes())
    key = serialization.load_pem_private_key((dest / "serverkey.pem").read_bytes(), None)
    original = x509.load_pem_x509_certificate((dest / "servercert.pem").read_bytes())
    now = datetime.now(timezone.utc)

    def replace_cert(cert):
        for name in ("servercert.pem", "clientcert.pem"):
            (dest / name).write_bytes(pem(cert))

    def rebuilt(issuer, **kw):
        builder = (
            x509.CertificateBuilder()
            .subject_name(original.subject)
            .issuer_name(issuer[0].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(kw.get("not_after", now + timedelta(days=300)))
        )
        for ext in original.extensions:
            if isinstance(ext.value, x509.AuthorityKeyIdentifier):
                continue
            builder = builder.add_extension(ext.value, ext.critical)
        return builder.sign(issuer[1], hashes.SHA384())

    # Sanity: an equivalent certificate from the same CA is kept.
    replace_cert(rebuilt((ca, ca_key)))
    assert runner.generate_certificates(hosts=HOSTS, key_type="ec")["changed"] == []

    replace_cert(rebuilt((ca, ca_key), not_after=now + timedelta(days=10)))
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec")
    assert str(dest / "servercert.pem") in ret["changed"]
    renewed = x509.load_pem_x509_certificate((dest / "servercert.pem").read_bytes())
    assert renewed.not_valid_after_utc - now > timedelta(days=400)

    twin_key = ec.generate_private_key(ec.SECP384R1())
    replace_cert(rebuilt((ca, twin_key)))  # same issuer name, wrong signature
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec")
    assert str(dest / "servercert.pem") in ret["changed"]
    assert tls.validate(read_set(dest))["errors"] == []


def test_ca_is_kept_unless_forced(master):
    runner.generate_certificates(hosts=HOSTS, key_type="ec")
    dest = master["dest"]
    ca_before = (dest / "cacert.pem").read_bytes()
    key_before = (dest / "serverkey.pem").read_bytes()
    runner.generate_certificates(hosts=HOSTS, key_type="ec", ca_days=10)
    assert (dest / "cacert.pem").read_bytes() == ca_before
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec", force=True)
    assert len(ret["changed"]) == 6
    assert (dest / "cacert.pem").read_bytes() != ca_before
    assert (dest / "serverkey.pem").read_bytes() != key_before
    assert tls.validate(read_set(dest))["errors"] == []


def test_ca_certificate_recreated_from_existing_key(master):
    runner.generate_certificates(hosts=HOSTS, key_type="ec")
    dest = master["dest"]
    server_before = (dest / "servercert.pem").read_bytes()
    (dest / "cacert.pem").unlink()
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec")
    assert ret["changed"] == [str(dest / "cacert.pem")]
    assert (dest / "servercert.pem").read_bytes() == server_before
    assert tls.validate(read_set(dest))["errors"] == []


def test_missing_ca_key_fails(master):
    runner.generate_certificates(hosts=HOSTS, key_type="ec")
    dest = master["dest"]
    master["ca_key"].unlink()
    before = snapshot(dest)
    ret = runner.generate_certificates(hosts=HOSTS + ["cmp9.example.com"], key_type="ec")
    assert ret["result"] is False
    assert master["context"]["retcode"] == 1
    assert "ca.key is missing" in ret["errors"][0] and "force=True" in ret["errors"][0]
    assert snapshot(dest) == before


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"hosts": ["../etc"]}, "not a valid host name"),
        ({"hosts": ["*.example.com"]}, "not a valid host name"),
        ({"hosts": ["cmp1=not-an-ip"]}, "not an IP address"),
        ({"hosts": "cmp1", "target": "cmp*"}, "exactly one of"),
        ({}, "exactly one of"),
        ({"hosts": "cmp1", "key_type": "dsa"}, "key_type"),
        ({"hosts": "cmp1", "key_size": 1024}, "at least 2048"),
        ({"hosts": "cmp1", "key_type": "ec", "curve": "brainpoolP256r1"}, "curve"),
        ({"hosts": " , "}, "No hosts"),
    ],
)
def test_invalid_arguments_fail_without_writing(master, kwargs, needle):
    ret = runner.generate_certificates(**kwargs)
    assert ret["result"] is False
    assert needle in "\n".join(ret["errors"]), ret
    assert master["context"]["retcode"] == 1
    assert not master["dest"].exists()


def test_ca_key_stays_outside_file_roots_unless_told(master, tmp_path):
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec")
    assert (tmp_path / "pki" / "nova_libvirt" / "ca.key").exists()
    assert not list(master["dest"].rglob("*.key"))
    assert not [w for w in ret["warnings"] if "any minion can fetch it" in w]
    exposed = str(master["dest"] / "private" / "ca.key")
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec", ca_key=exposed, force=True)
    warning = [w for w in ret["warnings"] if "any minion can fetch it" in w]
    assert len(warning) == 1 and "file_ignore_glob: ['*nova_libvirt_tls/private/*']" in warning[0]
    master["opts"]["file_ignore_glob"] = ["*nova_libvirt_tls/private/*"]
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec", ca_key=exposed)
    assert not [w for w in ret["warnings"] if "any minion can fetch it" in w]


def test_runner_returns_no_key_material(master):
    ret = runner.generate_certificates(hosts=HOSTS, per_host=True, key_type="ec")
    text = json.dumps(ret)
    dest = master["dest"]
    key_files = [master["ca_key"]] + [dest / h / "serverkey.pem" for h in set(HOSTS)]
    for path in key_files:
        for line in key_body(path.read_bytes()):
            assert line not in text


def test_unwritable_destination_is_reported(master, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        dest = blocker / "sub"
    else:  # pragma: no cover - depends on who runs the tests
        dest = tmp_path / "ro" / "sub"
        (tmp_path / "ro").mkdir(mode=0o500)
    ret = runner.generate_certificates(hosts=HOSTS, key_type="ec", dest=str(dest))
    assert ret["result"] is False and "Cannot write under" in ret["errors"][0]
    assert master["context"]["retcode"] == 1
    shutil.rmtree(tmp_path / "ro", ignore_errors=True)
