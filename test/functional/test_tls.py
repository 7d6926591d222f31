"""
libvirt TLS with a real Salt master and two minions on 127.0.0.1.

- cmp-a: container-mode genconfig, its own server/client pair from the file
  server's per-minion directory, the shared CA;
- cmp-b: host mode with the host libvirtd managed, everything shared.

The certificates come from the formula's own runner
(``salt-run nova_libvirt.generate_certificates``); cmp-b's libvirtd runs from
the files the formula put in place, with TLS and SASL SCRAM-SHA-256.
"""

import datetime
import os
import shutil
import socket
import ssl
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import PASSWORD, Fleet, Libvirtd, domain_xml, minion_states, tree_snapshot

PORT = 16614


@pytest.fixture(scope="module")
def tls_env(salt_factories, state_tree, tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    tls_root = base / "tls-root"
    (tls_root / "nova_libvirt_tls").mkdir(parents=True)
    pillars = {
        "a": {
            "config_dir": str(base / "a" / "kolla"),
            "listen_address": "127.0.0.1",
            "migration_hostname": "cmp-a.example.test",
            "sasl": {"password": PASSWORD},
            "tls": {"enabled": True},
        },
        "b": {
            "config_dir": str(base / "b" / "kolla"),
            "listen_address": "127.0.0.1",
            "migration_hostname": "localhost",
            "port": PORT,
            "container": {"enabled": False},
            "host": {
                "manage_daemon": True,
                "libvirtd_conf": str(base / "b" / "etc" / "libvirtd.conf"),
                "sasl_conf": str(base / "b" / "sasl2" / "libvirt.conf"),
                "service": None,
                "pki_dir": str(base / "b" / "pki"),
            },
            "sasl": {"password": PASSWORD, "sasldb_path": str(base / "b" / "passwd.db")},
            "tls": {"enabled": True},
            "libvirtd": {"log_dir": str(base / "b" / "log")},
        },
    }
    with Fleet(salt_factories, state_tree, base, pillars, extra_file_roots=[tls_root]) as fleet:
        fleet.tls_dir = tls_root / "nova_libvirt_tls"
        yield fleet


@pytest.fixture(scope="module")
def certificates(tls_env):
    env = tls_env
    shared = env.run.run(
        "nova_libvirt.generate_certificates", "hosts=localhost,cmp-a.example.test", f"dest={env.tls_dir}"
    )
    assert shared.returncode == 0, shared.stdout + shared.stderr
    per_host = env.run.run(
        "nova_libvirt.generate_certificates", f"target={env.ids['a']}", "per_host=True", "key_type=ec", f"dest={env.tls_dir}"
    )
    assert per_host.returncode == 0, per_host.stdout + per_host.stderr
    assert (env.tls_dir / env.ids["a"] / "servercert.pem").exists()
    return env


@pytest.fixture(scope="module")
def applied(certificates):
    env = certificates
    ret_a = env.apply("a", "nova_libvirt.config")
    ret_b = env.apply("b")
    assert ret_a.returncode == 0, ret_a.stdout
    assert ret_b.returncode == 0, ret_b.stdout
    return env, ret_a, ret_b


@pytest.fixture(scope="module")
def tls_libvirtd(applied):
    env = applied[0]
    daemon = Libvirtd(
        env.base / "b" / "etc" / "libvirtd.conf", env.base / "b" / "sasl2", env.base / "b", pki_dir=env.base / "b" / "pki"
    )
    daemon.start()
    yield daemon
    daemon.stop()


def list_domains(env, key, *args):
    return env.call(key, "nova_libvirt.list_domains", *args)


def test_files_land_with_the_right_bytes_modes_and_places(applied):
    env, ret_a, ret_b = applied
    tls, a, b = env.tls_dir, env.base / "a" / "kolla", env.base / "b"
    per_host = tls / env.ids["a"]
    expected = {
        # cmp-a: per-host pair, shared CA; container: all five, nova-compute: CA and client pair
        a / "nova-libvirt" / "servercert.pem": per_host / "servercert.pem",
        a / "nova-libvirt" / "serverkey.pem": per_host / "serverkey.pem",
        a / "nova-libvirt" / "clientcert.pem": per_host / "clientcert.pem",
        a / "nova-libvirt" / "clientkey.pem": per_host / "clientkey.pem",
        a / "nova-libvirt" / "cacert.pem": tls / "cacert.pem",
        a / "nova-compute" / "cacert.pem": tls / "cacert.pem",
        a / "nova-compute" / "clientcert.pem": per_host / "clientcert.pem",
        a / "nova-compute" / "clientkey.pem": per_host / "clientkey.pem",
        # cmp-b: host daemon in libvirt's layout below pki_dir, everything shared
        b / "pki" / "libvirt" / "servercert.pem": tls / "servercert.pem",
        b / "pki" / "libvirt" / "private" / "serverkey.pem": tls / "serverkey.pem",
        b / "pki" / "CA" / "cacert.pem": tls / "cacert.pem",
        b / "kolla" / "nova-compute" / "clientkey.pem": tls / "clientkey.pem",
        b / "kolla" / "nova-compute" / "cacert.pem": tls / "cacert.pem",
    }
    for dest, source in expected.items():
        assert dest.read_bytes() == source.read_bytes(), dest
        mode = stat.S_IMODE(dest.stat().st_mode)
        if dest.name.endswith("key.pem") or "kolla" in dest.parts:
            assert mode == 0o600, dest
        else:
            assert mode == 0o644, dest
    assert not (b / "kolla" / "nova-compute" / "servercert.pem").exists()
    comment_a = minion_states(ret_a)["nova_libvirt-tls-files-managed"]["comment"]
    assert "comes from the Salt file server" in comment_a  # per-minion keys on the file server
    for ret in (ret_a, ret_b):
        for key_file in (tls / "serverkey.pem", per_host / "serverkey.pem"):
            body = key_file.read_text().splitlines()[1]
            assert body not in ret.stdout + ret.stderr


def test_libvirtd_accepts_tls_with_scram_from_the_formulas_files(applied, tls_libvirtd):
    env = applied[0]
    sasl_conf = (env.base / "b" / "sasl2" / "libvirt.conf").read_text()
    assert "mech_list: SCRAM-SHA-256" in sasl_conf
    xml = env.base / "b" / "tls-guest.xml"
    xml.write_text(domain_xml("tls-guest"))
    tls_libvirtd.virsh("define", str(xml))
    tls_libvirtd.virsh("start", "tls-guest")
    ret = list_domains(env, "b")
    assert ret.returncode == 0, ret.stdout
    assert [d["name"] for d in ret.data if d["active"]] == ["tls-guest"]
    wrong = list_domains(env, "b", f"uri=qemu+tls://localhost:{PORT}/system", "authname=kolla", "password=wrong",
                         f"pkipath={env.base / 'b' / 'kolla' / 'nova-compute'}")
    assert wrong.returncode != 0 and "SASL authentication failed" in wrong.stdout


def _foreign_client_pair(directory, real_ca):
    """A client pair from another CA. The client trusts both CAs (so its own check passes); the server only its own."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public_key, signing_key, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    foreign_ca = cert("foreign CA", "foreign CA", ca_key.public_key(), ca_key, True)
    client = cert("intruder", "foreign CA", key.public_key(), ca_key, False)
    pem = serialization.Encoding.PEM
    (directory / "cacert.pem").write_bytes(real_ca.read_bytes() + foreign_ca.public_bytes(pem))
    (directory / "clientcert.pem").write_bytes(client.public_bytes(pem))
    (directory / "clientkey.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(directory / "clientkey.pem", 0o600)


def test_client_certificate_from_another_ca_is_refused(applied, tls_libvirtd, tmp_path):
    env = applied[0]
    _foreign_client_pair(tmp_path, env.tls_dir / "cacert.pem")
    refusals = tls_libvirtd.log().count("Failed to verify peer's certificate")
    ret = list_domains(env, "b", f"uri=qemu+tls://localhost:{PORT}/system", "authname=kolla",
                       f"password={PASSWORD}", f"pkipath={tmp_path}")
    assert ret.returncode != 0
    assert "cannot use libvirt" in ret.stdout
    assert "failed validation against" not in ret.stdout  # refused by the server, not by the client
    assert tls_libvirtd.log().count("Failed to verify peer's certificate") > refusals


def test_server_certificate_without_the_hosts_san_is_refused(applied, tls_libvirtd):
    env = applied[0]
    # 127.0.0.1 is not in the shared certificate's SAN (DNS names only).
    ret = list_domains(env, "b", f"uri=qemu+tls://127.0.0.1:{PORT}/system", "authname=kolla",
                       f"password={PASSWORD}", f"pkipath={env.base / 'b' / 'kolla' / 'nova-compute'}")
    assert ret.returncode != 0
    assert "TLS verification failed" in ret.stdout


def _served_certificate(port):
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_second_apply_changes_nothing_and_transfers_nothing(applied, tls_libvirtd):
    env = applied[0]
    for key, sls in (("a", "nova_libvirt.config"), ("b", "nova_libvirt")):
        before = tree_snapshot(env.base / key)
        ret = env.apply(key, sls)
        assert ret.returncode == 0
        assert {k: v for k, v in minion_states(ret).items() if v["changes"]} == {}
        after = tree_snapshot(env.base / key)
        assert {k: v for k, v in after.items() if "log" not in k} == {k: v for k, v in before.items() if "log" not in k}


def test_certificate_change_is_taken_without_stopping_the_guest(applied, tls_libvirtd):
    env = applied[0]
    guest_before = {d["name"]: d for d in list_domains(env, "b").data}["tls-guest"]
    old_serial = _served_certificate(PORT).serial_number
    # A new host reissues the shared certificate (the runner keeps the CA).
    ret = env.run.run(
        "nova_libvirt.generate_certificates", "hosts=localhost,cmp-a.example.test,cmp-c.example.test", f"dest={env.tls_dir}"
    )
    assert ret.returncode == 0
    new_cert = x509.load_pem_x509_certificate((env.tls_dir / "servercert.pem").read_bytes())
    assert new_cert.serial_number != old_serial

    preview = env.apply("b", test=True)
    tls_state = minion_states(preview)["nova_libvirt-tls-files-managed"]
    assert tls_state["result"] is None and tls_state["changes"]
    assert _served_certificate(PORT).serial_number == old_serial  # test=True changed nothing

    ret = env.apply("b")
    result = minion_states(ret)
    assert result["nova_libvirt-tls-daemon-updated"]["changes"]["libvirtd"].startswith("libvirtd reloaded")
    assert "nova-compute" in result["nova_libvirt-tls-files-managed"]["changes"]
    assert _served_certificate(PORT).serial_number == new_cert.serial_number
    guest_after = {d["name"]: d for d in list_domains(env, "b").data}["tls-guest"]
    assert guest_after["id"] == guest_before["id"] and guest_after["state"] == "running"


def _bad_material(env, case):
    """Replace one shared file with a real defect; return the text the state must report."""
    tls = env.tls_dir
    if case == "mismatched key":
        other = ec.generate_private_key(ec.SECP256R1())
        (tls / "clientkey.pem").write_bytes(
            other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return "clientkey.pem"
    if case == "garbage":
        (tls / "servercert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        return "servercert.pem"
    if case == "missing":
        (tls / "cacert.pem").unlink()
        return "cacert.pem: not found"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["mismatched key", "garbage", "missing"])
def test_invalid_material_fails_and_writes_nothing(applied, tls_libvirtd, tmp_path, case):
    env = applied[0]
    saved = tmp_path / "saved"
    shutil.copytree(env.tls_dir, saved)
    try:
        expected = _bad_material(env, case)
        before = tree_snapshot(env.base / "b")
        ret = env.apply("b")
        assert ret.returncode != 0
        tls_state = minion_states(ret)["nova_libvirt-tls-files-managed"]
        assert tls_state["result"] is False
        assert "nothing was written" in tls_state["comment"] and expected in tls_state["comment"]
        after = tree_snapshot(env.base / "b")
        assert {k: v for k, v in after.items() if "log" not in k} == {k: v for k, v in before.items() if "log" not in k}
    finally:
        shutil.rmtree(env.tls_dir)
        shutil.copytree(saved, env.tls_dir)


def test_externally_managed_certs_are_checked_not_written(applied, tls_libvirtd):
    env = applied[0]
    env.pillars["b"]["tls"]["manage_certs"] = False
    try:
        client_key = env.base / "b" / "kolla" / "nova-compute" / "clientkey.pem"
        saved = client_key.read_bytes()
        client_key.unlink()
        ret = env.apply("b")
        tls_state = minion_states(ret)["nova_libvirt-tls-files-managed"]
        assert tls_state["result"] is False
        assert f"clientkey.pem: missing at {client_key}" in tls_state["comment"]
        assert not client_key.exists()
        client_key.write_bytes(saved)
        os.chmod(client_key, 0o600)
        ret = env.apply("b")
        tls_state = minion_states(ret)["nova_libvirt-tls-files-managed"]
        assert tls_state["result"] is True and "files in place are valid" in tls_state["comment"]
        assert minion_states(ret)["nova_libvirt-tls-daemon-updated"]["changes"] == {}

        # Someone else renews the server certificate: the running daemon still takes it.
        renewed = env.run.run("nova_libvirt.generate_certificates", "hosts=localhost,cmp-d.example.test",
                              f"dest={env.tls_dir}")
        assert renewed.returncode == 0
        shutil.copy(env.tls_dir / "servercert.pem", env.base / "b" / "pki" / "libvirt" / "servercert.pem")
        new_serial = x509.load_pem_x509_certificate((env.tls_dir / "servercert.pem").read_bytes()).serial_number
        assert _served_certificate(PORT).serial_number != new_serial
        ret = env.apply("b")
        updated = minion_states(ret)["nova_libvirt-tls-daemon-updated"]
        assert updated["changes"]["libvirtd"].startswith("libvirtd reloaded its TLS files"), updated
        assert _served_certificate(PORT).serial_number == new_serial
    finally:
        env.pillars["b"]["tls"]["manage_certs"] = True
    

def test_generated_certificates_pass_openssl_and_virt_pki_validate_checks(applied):
    env = applied[0]
    tls = env.tls_dir
    for cert in ("servercert.pem", "clientcert.pem", f"{env.ids['a']}/servercert.pem"):
        subprocess.run(["openssl", "verify", "-CAfile", str(tls / "cacert.pem"), str(tls / cert)], check=True,
                       capture_output=True)
